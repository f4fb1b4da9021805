# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Calibration of the stopping rules on a labelled split, and the results that travel in `model.config.calibration`.

[`calibrate`] runs the model once at full depth with every exit on the calibration split, then, offline:

1. fits one temperature per exit (negative log-likelihood), used by every confidence-based rule;
2. fits the ASTI estimator: per non-final exit, a logistic model of P(prediction here == final prediction) on
   [`hf_depthstop.stopping.asti_features`], with 2-fold cross-fitting (the out-of-fold probabilities choose the
   cost; the stored model is refitted on the whole split). `asti_estimator="longstaff_schwartz"` instead regresses
   the stop-now payoff and the continuation value backwards (Longstaff-Schwartz) on the same features;
3. sweeps every rule's parameter, simulating exits with the same rule code the model runs live, and picks for each
   rule the setting that meets the target with the least compute:
   - `target_type="max_accuracy_drop"`: accuracy >= full-depth accuracy - target (target 0.01 = 1 point);
   - `target_type="compute_budget"`: the most accurate setting with mean compute fraction <= target;
   - `target_type="risk_controlled"`: Learn-then-Test. Settings are tested from the most conservative to the
     most aggressive with an exact binomial test of H0: P(full model right and rule wrong) > target, at level
     `epsilon`, stopping at the first failure; the last rejected setting has accuracy drop <= target with
     probability >= 1 - epsilon (that event upper-bounds the drop). The guarantee is exact for the fixed rules;
     for `asti` the tests score the cross-fitted probabilities, so it holds only approximately for the refitted
     estimator that is stored;
4. reports the oracle floor: the compute if each example stopped at the first exit after which its prediction
   never changes (full-depth accuracy, exactly).

Everything is stored in `model.config.calibration` (JSON) and the model's rule is set to `rule` at its setting.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.stats import binom
from sklearn.linear_model import LinearRegression, LogisticRegression
from transformers.utils import logging

from .stopping import (
    RULE_PARAMETERS,
    STOPPING_RULES,
    AstiBoundStop,
    AstiStop,
    ExitObservation,
    asti_features,
    build_rule,
    observe,
    simulate_exits,
)


logger = logging.get_logger(__name__)

TARGET_TYPES = ("max_accuracy_drop", "compute_budget", "risk_controlled")
ASTI_ESTIMATORS = ("same_prediction", "longstaff_schwartz")
CALIBRATED_RULES = ("static", "entropy", "confidence", "patience", "asti_bound", "asti")


@dataclass
class ExitRecords:
    """Full-depth outputs of every exit on a labelled split (CPU tensors).

    Args:
        exit_logits (`(n, num_exits, num_labels)`), exit_residual_ratios, exit_state_norms, exit_compute_fractions
        (`(n, num_exits)`), labels (`(n,)`), single_head_fractions (`(n, num_exits)`: compute when only that exit's
        head runs, as for `static`).
    """

    exit_logits: torch.Tensor
    exit_residual_ratios: torch.Tensor
    exit_state_norms: torch.Tensor
    exit_compute_fractions: torch.Tensor
    single_head_fractions: torch.Tensor
    labels: torch.Tensor
    exit_layers: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return self.labels.shape[0]


def _label_column(dataset) -> str:
    for name in ("labels", "label"):
        if name in dataset.column_names:
            return name
    raise ValueError(f"calibration needs a labelled dataset: no 'label' or 'labels' column in {dataset.column_names}")


def iterate_batches(dataset, batch_size: int, pad_token_id: int, device, sort_by_length: bool = True):
    """Yield `(row_indices, batch_dict)` over a labelled dataset.

    Text (`input_ids` column): right-padded `input_ids` / `attention_mask` (+ `token_type_ids`), sorted by length when
    asked. Images (`pixel_values` column): stacked `pixel_values` of shape `(batch, channels, height, width)`, in
    dataset order. Rows of a batch do not influence each other's results (see the models' docstrings), so sorting
    only saves time.
    """
    label_col = next((c for c in ("labels", "label") if c in dataset.column_names), None)
    if "pixel_values" in dataset.column_names:
        for start in range(0, len(dataset), batch_size):
            rows = np.arange(start, min(start + batch_size, len(dataset)))
            items = dataset[start : start + batch_size]
            batch = {"pixel_values": torch.as_tensor(np.asarray(items["pixel_values"]), dtype=torch.float32).to(device)}
            if label_col is not None:
                batch["labels"] = torch.as_tensor(items[label_col]).to(device)
            yield rows, batch
        return
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"dataset needs an 'input_ids' or a 'pixel_values' column, got {dataset.column_names}")
    lengths = [len(x) for x in dataset["input_ids"]]
    order = np.argsort(lengths, kind="stable") if sort_by_length else np.arange(len(lengths))
    has_tt = "token_type_ids" in dataset.column_names
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        items = dataset.select(rows.tolist())
        width = max(lengths[i] for i in rows)
        ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        tt = torch.zeros((len(rows), width), dtype=torch.long)
        for j, item in enumerate(items):
            n = len(item["input_ids"])
            ids[j, :n] = torch.as_tensor(item["input_ids"])
            mask[j, :n] = 1
            if has_tt:
                tt[j, :n] = torch.as_tensor(item["token_type_ids"])
        batch = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if has_tt:
            batch["token_type_ids"] = tt.to(device)
        if label_col is not None:
            batch["labels"] = torch.as_tensor(items[label_col]).to(device)
        yield rows, batch


@torch.no_grad()
def collect_exit_records(model, dataset, batch_size: int = 64, progress: bool = False) -> ExitRecords:
    """Run `model` at full depth with every exit on `dataset` (labelled; text or images) and gather [`ExitRecords`].

    `model` is any `DepthStop*` classifier: it returns the training-path fields with `output_exit_logits=True` and
    has `_exit_fractions(batch)` giving `(all_heads, single_head)` compute fractions, both `(batch, num_exits)`.
    """
    from tqdm.auto import tqdm

    if len(dataset) == 0:
        raise ValueError("calibration dataset is empty (0 rows)")
    _label_column(dataset)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(dataset)
    num_exits = len(model.config.exit_layers)
    logits = torch.zeros(n, num_exits, model.config.num_labels)
    ratios = torch.zeros(n, num_exits)
    norms = torch.zeros(n, num_exits)
    fractions = torch.zeros(n, num_exits)
    single = torch.zeros(n, num_exits)
    labels = torch.zeros(n, dtype=torch.long)
    pad = getattr(model.config, "pad_token_id", None) or 0
    batches = iterate_batches(dataset, batch_size, pad, device)
    for rows, batch in tqdm(batches, total=math.ceil(n / batch_size), disable=not progress, desc="exit outputs"):
        y = batch.pop("labels")
        out = model(**batch, output_exit_logits=True)
        idx = torch.as_tensor(rows, dtype=torch.long)
        logits[idx] = out.exit_logits.float().cpu()
        ratios[idx] = out.exit_residual_ratios.float().cpu()
        norms[idx] = out.exit_state_norms.float().cpu()
        fractions[idx] = out.exit_compute_fractions.float().cpu()
        single[idx] = model._exit_fractions(batch)[1].float().cpu()
        labels[idx] = y.cpu()
    model.train(was_training)
    return ExitRecords(logits, ratios, norms, fractions, single, labels, list(model.config.exit_layers))


def fit_temperatures(exit_logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """One temperature per exit minimising the NLL of softmax(logits / T), by a log-spaced grid on [0.05, 20]."""
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 241)
    temps = []
    for k in range(exit_logits.shape[1]):
        logp = (exit_logits[:, k].float()[None] / grid[:, None, None]).log_softmax(-1)  # (grid, n, C)
        nll = -logp.gather(2, labels[None, :, None].expand(len(grid), -1, 1)).mean((1, 2))
        temps.append(float(grid[int(nll.argmin())]))
    return temps


def build_observations(records: ExitRecords, temperatures: list[float]) -> list[ExitObservation]:
    """The observation at every exit for every row, exactly as the live model builds them."""
    obs, previous = [], None
    num_exits = records.exit_logits.shape[1]
    for k in range(num_exits):
        if k + 1 < num_exits:
            next_compute = records.exit_compute_fractions[:, k + 1] - records.exit_compute_fractions[:, k]
        else:
            next_compute = torch.zeros(len(records))
        previous = observe(
            k, records.exit_layers[k], records.exit_logits[:, k], temperatures[k], previous,
            records.exit_residual_ratios[:, k], records.exit_state_norms[:, k], next_compute,
        )
        obs.append(previous)
    return obs


def _fit_logistic(x: np.ndarray, y: np.ndarray) -> dict:
    mean, std = x.mean(0), x.std(0) + 1e-6
    if y.min() == y.max():  # one class only: a constant model
        p = float(np.clip(y.mean(), 1e-4, 1 - 1e-4))
        return {"mean": mean.tolist(), "std": std.tolist(), "coef": [0.0] * x.shape[1], "intercept": math.log(p / (1 - p))}
    clf = LogisticRegression(C=1.0, max_iter=2000).fit((x - mean) / std, y)
    return {"mean": mean.tolist(), "std": std.tolist(), "coef": clf.coef_[0].tolist(), "intercept": float(clf.intercept_[0])}


def _fit_longstaff_schwartz(features: list[np.ndarray], correct: np.ndarray, fractions: np.ndarray, cost: float) -> dict:
    """Backward induction: regress the realised continuation value V_{k+1} on features at k, stop iff the regressed
    stop-now payoff Y_k = 1[correct_k] - cost * C_k >= the regressed continuation value. Returned as a logistic-like
    linear score (stop iff score >= 0) so it runs through the same `AstiStop` code with cost 0.5."""
    num_exits = correct.shape[1]
    value = correct[:, -1] - cost * fractions[:, -1]
    models = [None] * (num_exits - 1)
    for k in range(num_exits - 2, -1, -1):
        x = features[k]
        mean, std = x.mean(0), x.std(0) + 1e-6
        xs = (x - mean) / std
        payoff = correct[:, k] - cost * fractions[:, k]
        cont = LinearRegression().fit(xs, value)
        now = LinearRegression().fit(xs, payoff)
        coef = now.coef_ - cont.coef_
        intercept = float(now.intercept_ - cont.intercept_)
        # a sigmoid of a large multiple of (payoff_hat - continuation_hat): >= 0.5 iff stop
        models[k] = {"mean": mean.tolist(), "std": std.tolist(), "coef": (50.0 * coef).tolist(), "intercept": 50.0 * intercept}
        stop = xs @ coef + intercept >= 0
        value = np.where(stop, payoff, value)
    return {
        "mean": [m["mean"] for m in models],
        "std": [m["std"] for m in models],
        "coef": [m["coef"] for m in models],
        "intercept": [m["intercept"] for m in models],
    }


def fit_asti(observations: list[ExitObservation], folds: int = 2, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Fit the ASTI estimator; return `(model, oof)` with `oof` `(n, num_exits - 1)` cross-fitted P(same as final)."""
    final_pred = observations[-1].prediction.numpy()
    feats = [asti_features(o).double().numpy() for o in observations[:-1]]
    targets = [(o.prediction.numpy() == final_pred).astype(int) for o in observations[:-1]]
    n = final_pred.shape[0]
    rng = np.random.default_rng(seed)
    fold_of = rng.permutation(n) % folds
    oof = np.zeros((n, len(feats)))
    for k, (x, y) in enumerate(zip(feats, targets)):
        for f in range(folds):
            train, test = fold_of != f, fold_of == f
            m = _fit_logistic(x[train], y[train])
            z = ((x[test] - np.array(m["mean"])) / np.array(m["std"])) @ np.array(m["coef"]) + m["intercept"]
            oof[test, k] = 1.0 / (1.0 + np.exp(-z))
    fitted = [_fit_logistic(x, y) for x, y in zip(feats, targets)]
    model = {key: [m[key] for m in fitted] for key in ("mean", "std", "coef", "intercept")}
    model["estimator"] = "same_prediction"
    return model, oof


class _PrecomputedAsti(AstiStop):
    """ASTI with precomputed (out-of-fold) probabilities, for choosing the cost without in-sample optimism."""

    def __init__(self, cost: float, probabilities: np.ndarray):
        self.cost = float(cost)
        self.probabilities = torch.as_tensor(probabilities, dtype=torch.float64)

    def probability_same(self, obs: ExitObservation) -> torch.Tensor:
        if obs.exit_index >= self.probabilities.shape[1]:
            return torch.ones_like(obs.max_prob, dtype=torch.float64)
        return self.probabilities[:, obs.exit_index]


def _outcome(records: ExitRecords, exit_pos: torch.Tensor, single_head: bool) -> dict:
    rows = torch.arange(len(records))
    pred = records.exit_logits[rows, exit_pos].argmax(-1)
    fractions = records.single_head_fractions if single_head else records.exit_compute_fractions
    return {
        "correct": (pred == records.labels).numpy(),
        "accuracy": float((pred == records.labels).float().mean()),
        "mean_exit_layer": float(torch.tensor(records.exit_layers)[exit_pos].float().mean()),
        "compute_fraction": float(fractions[rows, exit_pos].mean()),
        "exit_pos": exit_pos,
    }


def _candidates(name: str, observations: list[ExitObservation], oof: np.ndarray | None, lipschitz, exit_layers):
    """Parameter grids, ordered from the most conservative (most compute) to the most aggressive."""
    if name == "static":
        return [float(layer) for layer in reversed(exit_layers)]
    if name == "patience":
        return [float(p) for p in range(len(exit_layers) - 1, 0, -1)]
    if name == "confidence":
        vals = torch.cat([o.max_prob for o in observations[:-1]]).numpy()
        grid = np.unique(np.concatenate([np.quantile(vals, np.linspace(0, 1, 301)), [1.0]]))
        return [float(v) for v in grid[::-1]]
    if name == "entropy":
        vals = torch.cat([o.entropy for o in observations[:-1]]).numpy()
        grid = np.unique(np.concatenate([np.quantile(vals, np.linspace(0, 1, 301)), [0.0]]))
        return [float(v) for v in grid]
    if name == "asti":
        grid = np.unique(np.concatenate([np.quantile(1.0 - oof, np.linspace(0, 1, 301)), [0.0]]))
        return [float(v) for v in grid]
    if name == "asti_bound":
        ratios = []
        for o in observations[:-1]:
            ratios.append(AstiBoundStop.bound(o, lipschitz) / o.next_compute.clamp_min(1e-12))
        vals = torch.cat(ratios).numpy()
        grid = np.unique(np.concatenate([np.quantile(vals, np.linspace(0, 1, 301)), [0.0]]))
        return [float(v) for v in grid]
    raise ValueError(name)


@dataclass
class CalibrationReport:
    """What [`calibrate`] measured on the calibration split. `table` rows: rule, setting, accuracy, accuracy_drop,
    mean_exit_layer (0-based), compute_fraction, flops_speedup; `oracle_floor` as a row of its own."""

    rule: str
    target_type: str
    target: float
    full_accuracy: float
    table: list[dict]
    settings: dict
    oracle_floor: dict
    temperatures: list[float]

    def to_markdown(self) -> str:
        lines = [
            "| rule | setting | accuracy | drop (pts) | mean exit layer | compute | FLOPs speed-up |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in [*self.table, self.oracle_floor]:
            setting = "" if row["setting"] is None else f"{row['setting']:.4g}"
            lines.append(
                f"| {row['rule']} | {setting} | {100 * row['accuracy']:.2f} | {100 * row['accuracy_drop']:+.2f} | "
                f"{row['mean_exit_layer']:.2f} | {row['compute_fraction']:.3f} | {row['flops_speedup']:.2f}x |"
            )
        return "\n".join(lines)


def _row(rule: str, setting, outcome: dict, full_accuracy: float) -> dict:
    return {
        "rule": rule,
        "setting": setting,
        "accuracy": outcome["accuracy"],
        "accuracy_drop": full_accuracy - outcome["accuracy"],
        "mean_exit_layer": outcome["mean_exit_layer"],
        "compute_fraction": outcome["compute_fraction"],
        "flops_speedup": 1.0 / outcome["compute_fraction"],
    }


def calibrate(
    model,
    dataset,
    target: float = 0.01,
    target_type: str = "max_accuracy_drop",
    rule: str = "asti",
    epsilon: float = 0.1,
    asti_estimator: str = "same_prediction",
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
    reference_accuracy: float | None = None,
) -> CalibrationReport:
    """Calibrate every stopping rule of `model` on `dataset` and switch the model to `rule` at its setting.

    Args:
        model: a `DepthStop*` classifier with trained exit heads.
        dataset (`datasets.Dataset`): tokenized (`input_ids`, `attention_mask`, optional `token_type_ids`) with a
            `label` or `labels` column. Use a validation split, never the test split.
        target (`float`, defaults to 0.01): the accuracy drop (a fraction: 0.01 = 1 point) for `max_accuracy_drop`
            and `risk_controlled`, or the mean compute fraction in (0, 1] for `compute_budget`.
        target_type (`str`, defaults to `"max_accuracy_drop"`): see the module docstring.
        rule (`str`, defaults to `"asti"`): the rule the model uses afterwards (any of `STOPPING_RULES`).
        epsilon (`float`, defaults to 0.1): `risk_controlled` only: the allowed probability of missing the target.
        asti_estimator (`str`, defaults to `"same_prediction"`): or `"longstaff_schwartz"`.
        batch_size (`int`, defaults to 64), seed (`int`, defaults to 0): cross-fitting folds' seed.
        progress (`bool`, defaults to `False`): show a progress bar.
        reference_accuracy (`float`, *optional*): the accuracy `max_accuracy_drop` is measured from (e.g. a plain
            fine-tune's accuracy on the same split); defaults to the model's own full-depth accuracy.

    Returns:
        [`CalibrationReport`]; the same numbers are stored in `model.config.calibration`.
    """
    if target_type not in TARGET_TYPES:
        raise ValueError(f"target_type must be one of {TARGET_TYPES}, got {target_type!r}")
    if rule not in STOPPING_RULES:
        raise ValueError(f"rule must be one of {STOPPING_RULES}, got {rule!r}")
    if asti_estimator not in ASTI_ESTIMATORS:
        raise ValueError(f"asti_estimator must be one of {ASTI_ESTIMATORS}, got {asti_estimator!r}")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or math.isnan(target):
        raise ValueError(f"target must be a number, got {target!r}")
    if target_type == "compute_budget" and not 0 < target <= 1:
        raise ValueError(f"target (a mean compute fraction) must be in (0, 1] for compute_budget, got {target!r}")
    if target_type != "compute_budget" and not 0 <= target < 1:
        raise ValueError(f"target (an accuracy drop, 0.01 = 1 point) must be in [0, 1), got {target!r}")
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon!r}")
    if len(model.config.exit_layers) < 2:
        raise ValueError(f"calibration needs at least 2 exits, got exit_layers={model.config.exit_layers}")

    records = collect_exit_records(model, dataset, batch_size=batch_size, progress=progress)
    calibration = calibrate_records(
        records, model._exit_lipschitz(), target=target, target_type=target_type, epsilon=epsilon,
        asti_estimator=asti_estimator, seed=seed, reference_accuracy=reference_accuracy,
    )
    model.config.calibration = calibration
    if rule == "none":
        model.set_stopping_rule("none")
    else:
        model.set_stopping_rule(rule, **calibration["settings"][rule])
    logger.info(f"calibrated on {len(records)} examples; rule {rule} at {calibration['settings'].get(rule)}")
    return CalibrationReport(
        rule, target_type, float(target), calibration["full_accuracy"], calibration["table"],
        calibration["settings"], calibration["oracle_floor"], calibration["temperatures"],
    )


def calibrate_records(
    records: ExitRecords,
    lipschitz: list[float],
    target: float = 0.01,
    target_type: str = "max_accuracy_drop",
    epsilon: float = 0.1,
    asti_estimator: str = "same_prediction",
    seed: int = 0,
    reference_accuracy: float | None = None,
) -> dict:
    """[`calibrate`] on already collected [`ExitRecords`]; returns the `config.calibration` dict.

    `reference_accuracy` (e.g. a plain fine-tune's accuracy on the same split) replaces the model's own full-depth
    accuracy as the reference of `max_accuracy_drop`.
    """
    temperatures = fit_temperatures(records.exit_logits, records.labels)
    observations = build_observations(records, temperatures)
    full = _outcome(records, torch.full((len(records),), len(records.exit_layers) - 1), single_head=True)
    full_accuracy = full["accuracy"]
    reference = dict(full, accuracy=reference_accuracy) if reference_accuracy is not None else full

    if asti_estimator == "same_prediction":
        asti_model, oof = fit_asti(observations, seed=seed)
    else:
        correct = np.stack([(o.prediction == records.labels).numpy() for o in observations], 1).astype(float)
        feats = [asti_features(o).double().numpy() for o in observations[:-1]]
        # the payoff's price of compute: the tolerated drop per full model
        ls_cost = max(target, 1e-3) if target_type != "compute_budget" else 0.01
        asti_model = _fit_longstaff_schwartz(feats, correct, records.exit_compute_fractions.numpy(), ls_cost)
        asti_model["estimator"] = "longstaff_schwartz"
        probe = AstiStop(0.0, asti_model)
        oof = np.stack([probe.probability_same(o).numpy() for o in observations[:-1]], 1)

    table, settings = [], {}
    for name in CALIBRATED_RULES:
        if name == "asti" and asti_estimator == "longstaff_schwartz":
            grid = [0.5]  # the LS rule has its cost inside the regressions; it stops iff payoff >= continuation
        else:
            grid = _candidates(name, observations, oof, lipschitz, records.exit_layers)
        outcomes = []
        for value in grid:
            if name == "asti":
                stopper = _PrecomputedAsti(value, oof)
            else:
                stopper = build_rule(name, {RULE_PARAMETERS[name]: value}, None, lipschitz)
            outcomes.append(_outcome(records, simulate_exits(stopper, observations), single_head=name == "static"))
        chosen = _choose(outcomes, reference, target, target_type, epsilon)
        value = grid[chosen]
        if name in ("static", "patience"):
            value = int(value)
        settings[name] = {RULE_PARAMETERS[name]: value}
        table.append(_row(name, value, outcomes[chosen], full_accuracy))

    none_row = _row("none", None, full, full_accuracy)
    oracle_row = _row("oracle floor", None, _oracle_floor(records, observations), full_accuracy)
    return {
        "target_type": target_type,
        "target": float(target),
        "epsilon": float(epsilon),
        "reference_accuracy": reference["accuracy"],
        "num_examples": len(records),
        "full_accuracy": full_accuracy,
        "temperatures": temperatures,
        "asti": asti_model,
        "settings": settings,
        "table": [none_row, *table],
        "oracle_floor": oracle_row,
    }


def evaluate_records(records: ExitRecords, calibration: dict, lipschitz: list[float], rule: str, params: dict) -> dict:
    """Offline outcome of one rule on (held-out) records, with the calibration's temperatures and ASTI model.

    Returns:
        `dict` with `accuracy`, `mean_exit_layer`, `compute_fraction`, `correct` (per example) and `exit_pos`.
    """
    observations = build_observations(records, calibration["temperatures"])
    if rule == "oracle floor":
        return _oracle_floor(records, observations)
    if rule == "none":
        return _outcome(records, torch.full((len(records),), len(records.exit_layers) - 1), single_head=True)
    stopper = build_rule(rule, params, calibration, lipschitz)
    return _outcome(records, simulate_exits(stopper, observations), single_head=rule == "static")


def _choose(outcomes: list[dict], full: dict, target: float, target_type: str, epsilon: float) -> int:
    """Index of the chosen setting (outcomes ordered from most conservative to most aggressive)."""
    compute = np.array([o["compute_fraction"] for o in outcomes])
    accuracy = np.array([o["accuracy"] for o in outcomes])
    if target_type == "max_accuracy_drop":
        ok = accuracy >= full["accuracy"] - target - 1e-12
        if not ok.any():
            return int(np.argmax(accuracy))
        idx = np.flatnonzero(ok)
        return int(idx[np.argmin(compute[idx])])
    if target_type == "compute_budget":
        ok = compute <= target + 1e-12
        if not ok.any():
            logger.warning(f"no setting reaches mean compute <= {target}; using the cheapest")
            return int(np.argmin(compute))
        idx = np.flatnonzero(ok)
        best = accuracy[idx].max()
        idx = idx[accuracy[idx] >= best - 1e-12]
        return int(idx[np.argmin(compute[idx])])
    # risk_controlled: fixed-sequence testing, conservative -> aggressive
    n = len(full["correct"])
    chosen = None
    for i, o in enumerate(outcomes):
        losses = int((full["correct"] & ~o["correct"]).sum())
        p_value = binom.cdf(losses, n, target)
        if p_value > epsilon:
            break
        chosen = i
    if chosen is None:
        logger.warning(f"risk control: no setting certified at drop <= {target} w.p. >= {1 - epsilon}; using full depth")
        return int(np.argmax(compute))
    return chosen


def _oracle_floor(records: ExitRecords, observations: list[ExitObservation]) -> dict:
    """Stop at the first exit after which the prediction never changes (with every earlier head run)."""
    preds = torch.stack([o.prediction for o in observations], 1)  # (n, num_exits)
    same_after = torch.flip(torch.cumprod(torch.flip(preds == preds[:, -1:], [1]).int(), 1), [1]).bool()
    exit_pos = same_after.int().argmax(1)  # first position from which every later exit agrees with the final
    return _outcome(records, exit_pos, single_head=False)
