# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Live evaluation of stopping rules: accuracy, exits, compute and measured wall-clock, side by side in one run."""

import time

import numpy as np
import torch
from tqdm.auto import tqdm

from .calibration import CALIBRATED_RULES, iterate_batches
from .stopping import RULE_PARAMETERS


def rules_from_calibration(model, include_none: bool = True) -> dict[str, dict]:
    """`{rule: params}` for every calibrated rule of `model` (plus `none`)."""
    calibration = model.config.calibration or {}
    rules = {"none": {}} if include_none else {}
    settings = calibration.get("settings", {})
    rules.update({name: dict(settings[name]) for name in CALIBRATED_RULES if name in settings})
    return rules


@torch.no_grad()
def run_rule(model, dataset, rule: str, params: dict, batch_size: int = 64, sort_by_length: bool = False) -> dict:
    """Run `model` with one rule over `dataset` (tokenized, labelled); return per-example results and the time.

    Returns:
        `dict` with `predictions`, `labels`, `exit_layer`, `compute_fraction` (numpy arrays of shape `(n,)`) and
        `seconds` (model time only: batches are built before the clock starts).
    """
    model.eval()
    device = next(model.parameters()).device
    pad = getattr(model.config, "pad_token_id", None) or 0
    batches = list(iterate_batches(dataset, batch_size, pad, device, sort_by_length=sort_by_length))
    n = len(dataset)
    preds, labels = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    exit_layer, compute = np.zeros(n, dtype=np.int64), np.zeros(n)
    seconds = 0.0
    for rows, batch in batches:
        y = batch.pop("labels", None)
        start = time.perf_counter()
        out = model(**batch, stopping_rule=rule, stopping_params=params)
        seconds += time.perf_counter() - start
        preds[rows] = out.logits.argmax(-1).cpu().numpy()
        if y is not None:
            labels[rows] = y.cpu().numpy()
        exit_layer[rows] = out.exit_layer.cpu().numpy()
        compute[rows] = out.compute_fraction.cpu().numpy()
    return {"predictions": preds, "labels": labels, "exit_layer": exit_layer, "compute_fraction": compute, "seconds": seconds}


def compare_rules(
    model, dataset, rules: dict[str, dict], batch_size: int = 64, repeats: int = 3, progress: bool = False
) -> list[dict]:
    """Evaluate every rule on `dataset`, timing them alternately (`repeats` rounds, rotated order, median seconds).

    Each rule first runs one untimed warm-up pass over up to 4 batches, so no rule pays the cold start.

    Returns:
        One row per rule: `rule`, `setting`, `accuracy`, `mean_exit_layer` (0-based), `compute_fraction`,
        `seconds` (median), `speedup` (median seconds of `none` / this rule's; present when `none` is in `rules`).
    """
    names = list(rules)
    times = {name: [] for name in names}
    results = {}
    warmup = dataset.select(range(min(len(dataset), 4 * batch_size)))
    for name in names:
        run_rule(model, warmup, name, rules[name], batch_size)
    bar = tqdm(total=repeats * len(names), disable=not progress, desc=f"rules (batch {batch_size})")
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            res = run_rule(model, dataset, name, rules[name], batch_size)
            times[name].append(res["seconds"])
            results[name] = res
            bar.update(1)
    bar.close()
    base = float(np.median(times["none"])) if "none" in times else None
    rows = []
    for name in names:
        res = results[name]
        param = RULE_PARAMETERS[name]
        seconds = float(np.median(times[name]))
        rows.append(
            {
                "rule": name,
                "setting": rules[name].get(param) if param else None,
                "accuracy": float((res["predictions"] == res["labels"]).mean()),
                "mean_exit_layer": float(res["exit_layer"].mean()),
                "compute_fraction": float(res["compute_fraction"].mean()),
                "seconds": seconds,
                "speedup": base / seconds if base else None,
            }
        )
    return rows


def rules_table_markdown(rows: list[dict], reference_accuracy: float | None = None) -> str:
    """A markdown table of [`compare_rules`] rows; `reference_accuracy` adds a "vs reference" column (points)."""
    head = "| rule | setting | accuracy | mean exit layer | compute | measured speed-up |"
    sep = "|---|---|---|---|---|---|"
    if reference_accuracy is not None:
        head = head.replace("| accuracy |", "| accuracy | vs ref (pts) |")
        sep += "---|"
    lines = [head, sep]
    for row in rows:
        setting = "" if row["setting"] is None else f"{row['setting']:.4g}"
        cells = [row["rule"], setting, f"{100 * row['accuracy']:.2f}"]
        if reference_accuracy is not None:
            cells.append(f"{100 * (row['accuracy'] - reference_accuracy):+.2f}")
        speed = "" if row.get("speedup") is None else f"{row['speedup']:.2f}x"
        cells += [f"{row['mean_exit_layer']:.2f}", f"{row['compute_fraction']:.3f}", speed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
