# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""The L_depth ablation (DESIGN.md section 3) on the quickstart task; it picks the default training loss.

    python benchmarks/ablation_ldepth.py                      # all variants (about 6 min each on 2 CPU cores)
    python benchmarks/ablation_ldepth.py --variants plain,detach_distill
    python benchmarks/ablation_ldepth.py --analyse_only        # tables from the cached exit outputs

Every variant: same seed, data (8k/2k/2k tweets), model (all-MiniLM-L6-v2, mean pooling) and budget (2 epochs,
AdamW 5e-5, batch 32) as the quickstart; only the loss differs. After training, every exit's outputs on the
validation and test splits are cached in benchmarks/results/ablation_cache/ (re-runs skip trained variants).

Reported: final-exit accuracy against the plain fine-tune (final exit only: what users would otherwise deploy), with
the paired standard error; per-exit accuracy; the oracle floor; and, for tolerances 0 / 0.5 / 1 point below the
plain fine-tune's *validation* accuracy, the setting each rule picks on validation and what it gives on test.
The default is chosen on validation only: among variants whose validation final-exit accuracy is within 0.3 points of
the plain fine-tune's, the one needing the least validation compute at the 1-point tolerance under its best rule.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "recipes"))

from train_classifier import build_trainer, parse_args  # noqa: E402

from hf_depthstop.calibration import ExitRecords, calibrate_records, collect_exit_records, evaluate_records  # noqa: E402


RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(RESULTS, "ablation_cache")
CONFIG = os.path.join(HERE, "..", "recipes", "configs", "quickstart.yaml")

# name -> DepthStopTrainingArguments overrides (flags). Everything else is the quickstart config.
VARIANTS = {
    "plain": ["--exit_head_hidden_size", "0", "--exit_gradient", "full", "--exit_weighting", "final_only", "--depth_loss_weight", "0"],
    "detach_distill": ["--exit_head_hidden_size", "0", "--exit_gradient", "detach", "--exit_weighting", "final_heavy", "--early_exit_weight", "1.0",
                       "--depth_terms", "distill", "--depth_loss_weight", "1.0"],
    "final_heavy_distill": ["--exit_head_hidden_size", "0", "--exit_gradient", "full", "--exit_weighting", "final_heavy", "--early_exit_weight", "0.06",
                            "--depth_terms", "distill", "--depth_loss_weight", "1.0"],
    "joint": ["--exit_head_hidden_size", "0", "--exit_gradient", "full", "--exit_weighting", "linear", "--depth_loss_weight", "0"],
    "final_heavy": ["--exit_head_hidden_size", "0", "--exit_gradient", "full", "--exit_weighting", "final_heavy", "--early_exit_weight", "0.06", "--depth_loss_weight", "0"],
    "equilibrium_distill": ["--exit_head_hidden_size", "0", "--exit_gradient", "equilibrium", "--exit_weighting", "linear",
                            "--depth_terms", "distill", "--depth_loss_weight", "1.0"],
    "final_heavy_stop_distill": ["--exit_head_hidden_size", "0", "--exit_gradient", "full", "--exit_weighting", "final_heavy", "--early_exit_weight", "0.06",
                                 "--depth_terms", "stop,distill", "--depth_loss_weight", "1.0", "--compute_cost", "0.1"],
    "final_heavy_dr": ["--exit_head_hidden_size", "0", "--exit_gradient", "full", "--exit_weighting", "final_heavy", "--early_exit_weight", "0.06",
                       "--depth_terms", "dr", "--depth_loss_weight", "0.1"],
    "detach_mlp_distill": ["--exit_gradient", "detach", "--exit_weighting", "final_heavy", "--early_exit_weight", "1.0",
                           "--depth_terms", "distill", "--depth_loss_weight", "1.0", "--exit_head_hidden_size", "384"],
    "scaled0.1_distill": ["--exit_head_hidden_size", "0", "--exit_gradient", "0.1", "--exit_weighting", "final_heavy", "--early_exit_weight", "1.0",
                          "--depth_terms", "distill", "--depth_loss_weight", "1.0"],
}
TOLERANCES = (0.0, 0.005, 0.01)
RULES = ("confidence", "entropy", "patience", "asti_bound", "asti")


def train_variant(name: str, extra: list[str]) -> dict:
    path = os.path.join(CACHE, f"{name}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    script_args, training_args = parse_args(
        ["--config", CONFIG, *VARIANTS[name], *extra, "--output_dir", os.path.join(CACHE, f"run_{name}"),
         "--disable_tqdm", "true"]
    )
    trainer, tokenized = build_trainer(script_args, training_args)
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start
    model = trainer.model.eval()
    blob = {
        "name": name,
        "flags": VARIANTS[name],
        "train_seconds": train_seconds,
        "lipschitz": model._exit_lipschitz(),
        "val": collect_exit_records(model, tokenized["validation"]).__dict__,
        "test": collect_exit_records(model, tokenized["test"]).__dict__,
    }
    os.makedirs(CACHE, exist_ok=True)
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)  # never a half-written cache file
    return blob


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = a.astype(float) - b.astype(float)
    return 100 * d.mean(), 100 * d.std(ddof=1) / np.sqrt(len(d))


def analyse(blobs: dict) -> tuple[str, dict]:
    recs = {n: (ExitRecords(**b["val"]), ExitRecords(**b["test"])) for n, b in blobs.items()}
    p_val, p_test = recs["plain"]
    last = len(p_val.exit_layers) - 1
    full = lambda r: (r.exit_logits[:, last].argmax(-1) == r.labels).numpy()  # noqa: E731
    plain_val_acc, plain_test_acc = full(p_val).mean(), full(p_test).mean()
    summary, lines = {}, []
    lines.append("| variant | val final | test final | test vs plain (pts, paired s.e.) | test acc per exit | oracle floor (test) | train s |")
    lines.append("|---|---|---|---|---|---|---|")
    for name, (val, test) in recs.items():
        per_exit = (test.exit_logits.argmax(-1) == test.labels[:, None]).float().mean(0)
        d, se = paired(full(test), full(p_test))
        oracle = evaluate_records(test, {"temperatures": [1.0] * len(test.exit_layers)}, [], "oracle floor", {})
        summary[name] = {
            "val_final": float(full(val).mean()), "test_final": float(full(test).mean()),
            "test_vs_plain": d, "test_vs_plain_se": se, "oracle_floor_test": oracle["compute_fraction"],
            "per_exit_test": per_exit.tolist(), "train_seconds": blobs[name]["train_seconds"], "rules": {},
        }
        lines.append(
            f"| {name} | {100 * full(val).mean():.2f} | {100 * full(test).mean():.2f} | {d:+.2f} ± {se:.2f} | "
            + " / ".join(f"{100 * a:.1f}" for a in per_exit) + f" | {oracle['compute_fraction']:.3f} | "
            f"{blobs[name]['train_seconds']:.0f} |"
        )
    lines += ["", "Settings chosen on validation (accuracy >= plain fine-tune's val accuracy - tolerance), applied to "
              "test. Cells: test accuracy vs plain's test accuracy (pts) / test compute fraction (val compute).", ""]
    header = "| variant | tolerance | " + " | ".join(RULES) + " |"
    lines += [header, "|---|---|" + "---|" * len(RULES)]
    for name, (val, test) in recs.items():
        if name == "plain":
            continue  # its early heads are untrained: no rule on it is meaningful
        lips = blobs[name]["lipschitz"]
        for tol in TOLERANCES:
            cal = calibrate_records(val, lips, target=tol, reference_accuracy=float(plain_val_acc))
            cells = []
            for rule in RULES:
                row = next(r for r in cal["table"] if r["rule"] == rule)
                feasible = row["accuracy"] >= plain_val_acc - tol - 1e-12
                out = evaluate_records(test, cal, lips, rule, cal["settings"][rule])
                summary[name]["rules"][f"{rule}@{tol}"] = {
                    "setting": cal["settings"][rule], "val_accuracy": row["accuracy"], "val_compute": row["compute_fraction"],
                    "feasible_on_val": bool(feasible), "test_accuracy": out["accuracy"],
                    "test_vs_plain": 100 * (out["accuracy"] - plain_test_acc), "test_compute": out["compute_fraction"],
                }
                mark = "" if feasible else " (val infeasible)"
                cells.append(
                    f"{100 * (out['accuracy'] - plain_test_acc):+.2f} / {out['compute_fraction']:.3f} "
                    f"({row['compute_fraction']:.3f}){mark}"
                )
            lines.append(f"| {name} | {100 * tol:.1f} | " + " | ".join(cells) + " |")

    # The default: validation only.
    eligible, scores = [], {}
    for name, s in summary.items():
        if name == "plain":
            continue
        options = [v["val_compute"] for k, v in s["rules"].items()
                   if k.endswith("@0.01") and k.split("@")[0] in ("asti", "confidence") and v["feasible_on_val"]]
        scores[name] = min(options) if options else float("inf")
        if s["val_final"] >= summary["plain"]["val_final"] - 0.003:
            eligible.append(name)
    pool = eligible or [n for n in summary if n != "plain"]
    winner = min(pool, key=lambda n: scores[n])
    lines += ["", f"Eligible (val final-exit accuracy within 0.3 points of plain's {100 * plain_val_acc:.2f}): "
              f"{', '.join(eligible) or 'none'}.",
              "Validation compute at the 1-point tolerance (best of asti / confidence): "
              + ", ".join(f"{n} {v:.3f}" for n, v in sorted(scores.items(), key=lambda kv: kv[1])) + ".",
              f"**Default chosen on validation: `{winner}`** (flags: `{' '.join(VARIANTS[winner])}`)."]
    summary["_default"] = winner
    return "\n".join(lines), summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--analyse_only", action="store_true", help="only tables from cached variants")
    parser.add_argument("--extra", default="", help="extra recipe flags for every variant, e.g. '--n_train 500'")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    if "plain" not in names:
        names = ["plain", *names]
    blobs = {}
    for name in names:
        path = os.path.join(CACHE, f"{name}.pt")
        if args.analyse_only:
            if os.path.exists(path):
                blobs[name] = torch.load(path, weights_only=False)
            continue
        print(f"== variant {name}", flush=True)
        blobs[name] = train_variant(name, args.extra.split())
    if "plain" not in blobs:
        raise SystemExit("the plain fine-tune has not been trained yet: run without --analyse_only first")
    table, summary = analyse(blobs)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "ablation_ldepth.md"), "w") as f:
        f.write("# L_depth ablation (all-MiniLM-L6-v2, tweets 8k/2k/2k, seed 0)\n\n"
                "Command: `python benchmarks/ablation_ldepth.py`\n\n" + table + "\n")
    with open(os.path.join(RESULTS, "ablation_ldepth.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
