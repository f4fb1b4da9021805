# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Stopping rules: what to do after each exit, per example.

Every rule is a small callable `rule(obs) -> torch.BoolTensor` of shape `(batch_size,)` ("stop here"), where `obs` is
an [`ExitObservation`] of the rows still running. The model builds one observation per evaluated exit with
[`observe`], using the previous exit's observation of the same rows as history, so a rule sees exactly the same
numbers in a live batched forward as in the offline simulation that [`simulate_exits`] runs during calibration.

Rules (names as in `model.set_stopping_rule(name, **params)`):

- `none`: full depth (only the final head runs).
- `static(layer)`: stop at the first exit at or after 0-based layer `layer` (only that head runs).
- `entropy(threshold)`: stop when the entropy (nats) of the exit's distribution is <= threshold (DeeBERT).
- `confidence(threshold)`: stop when the max probability is >= threshold.
- `patience(patience)`: stop once the prediction has stayed the same for `patience` consecutive exits (PABEE).
- `asti_bound(cost)`: the diminishing-returns bound of the paper's theorem. The next block is expected to move the
  pooled state by about r_l * rho_l (relative), so the head's logits by at most K_l * ||pool(h_l)|| * r_l * rho_l with
  K_l the head's spectral norm; stop when that bound is <= cost * (compute of the next exit). Needs no calibration.
- `asti(cost)`: Adaptive Stopping-Time Inference. A per-exit logistic model estimates P(the prediction at this exit
  equals the final exit's prediction) from cheap features of the exits so far ([`asti_features`]); stopping now
  loses at most 1 - P (the chance that a later block still changes the answer) and continuing costs the rest of the
  network, priced at `cost`: stop iff 1 - P <= cost. Fitted by [`hf_depthstop.calibrate`]; the coefficients live in
  `config.calibration`.

Confidence-based rules read temperature-scaled probabilities when the model is calibrated (per-exit temperatures
fitted on the calibration split). Exit positions (`exit_index`) and layers (`layer_index`) are 0-based.

Source of `asti` / `asti_bound`: "Optimal Depth of Neural Networks" (arXiv 2506.16862); the paper's full text was not
available to us, so these rules are this project's own derivation from its stated theorem.
"""

import math
from dataclasses import dataclass, fields

import torch


STOPPING_RULES = ("none", "static", "entropy", "confidence", "patience", "asti_bound", "asti")
# The keyword parameter each rule takes (one each); `none` takes none.
RULE_PARAMETERS = {
    "none": None,
    "static": "layer",
    "entropy": "threshold",
    "confidence": "threshold",
    "patience": "patience",
    "asti_bound": "cost",
    "asti": "cost",
}


@dataclass
class ExitObservation:
    """What is known at one exit about the rows still running. Tensors have `batch_size` = active rows.

    Args:
        exit_index (`int`): 0-based position of this exit in `config.exit_layers`.
        layer_index (`int`): 0-based layer after which this exit sits.
        probs (`torch.Tensor` of shape `(batch_size, num_labels)`): temperature-scaled softmax.
        prev_probs (`torch.Tensor` of shape `(batch_size, num_labels)`): the previous exit's (uniform at the first).
        max_prob, margin, entropy (`torch.Tensor` of shape `(batch_size,)`): of `probs` (margin = top1 - top2).
        prediction (`torch.LongTensor` of shape `(batch_size,)`): argmax.
        agree_count (`torch.LongTensor` of shape `(batch_size,)`): consecutive earlier exits with the same argmax.
        residual_ratio (`torch.Tensor` of shape `(batch_size,)`): r_l, relative change of the pooled state over
            this exit's layer.
        rho (`torch.Tensor` of shape `(batch_size,)`): r_l / r at the previous exit (1 at the first exit).
        state_norm (`torch.Tensor` of shape `(batch_size,)`): ||pool(h_l)||.
        next_compute (`torch.Tensor` of shape `(batch_size,)`): compute fraction from here to the next exit
            (0 at the final exit).
    """

    exit_index: int
    layer_index: int
    probs: torch.Tensor
    prev_probs: torch.Tensor
    max_prob: torch.Tensor
    margin: torch.Tensor
    entropy: torch.Tensor
    prediction: torch.Tensor
    agree_count: torch.Tensor
    residual_ratio: torch.Tensor
    rho: torch.Tensor
    state_norm: torch.Tensor
    next_compute: torch.Tensor

    def select(self, rows: torch.Tensor) -> "ExitObservation":
        """The observation restricted to `rows` (a bool mask or index tensor over the batch)."""
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v[rows] if isinstance(v, torch.Tensor) else v
        return ExitObservation(**values)


def observe(
    exit_index: int,
    layer_index: int,
    logits: torch.Tensor,
    temperature: float,
    previous: ExitObservation | None,
    residual_ratio: torch.Tensor,
    state_norm: torch.Tensor,
    next_compute: torch.Tensor,
) -> ExitObservation:
    """Build the observation at one exit from its logits and the previous exit's observation of the same rows.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_labels)`).
        temperature (`float`): per-exit temperature (1.0 when uncalibrated).
        previous ([`ExitObservation`] or `None`): the same rows at the previous exit; `None` at the first.
        residual_ratio, state_norm, next_compute (`torch.Tensor` of shape `(batch_size,)`).
    """
    probs = (logits.float() / temperature).softmax(-1)
    top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values
    max_prob = top2[:, 0]
    margin = top2[:, 0] - top2[:, 1] if top2.shape[-1] > 1 else top2[:, 0]
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
    prediction = probs.argmax(-1)
    r = residual_ratio.float()
    if previous is None:
        prev_probs = torch.full_like(probs, 1.0 / probs.shape[-1])
        agree_count = torch.zeros_like(prediction)
        rho = torch.ones_like(r)
    else:
        prev_probs = previous.probs
        same = prediction == previous.prediction
        agree_count = torch.where(same, previous.agree_count + 1, torch.zeros_like(previous.agree_count))
        rho = r / previous.residual_ratio.clamp_min(1e-8)
    return ExitObservation(
        exit_index=exit_index,
        layer_index=layer_index,
        probs=probs,
        prev_probs=prev_probs,
        max_prob=max_prob,
        margin=margin,
        entropy=entropy,
        prediction=prediction,
        agree_count=agree_count,
        residual_ratio=r,
        rho=rho,
        state_norm=state_norm.float(),
        next_compute=next_compute.float(),
    )


ASTI_FEATURE_SETS = ("full", "compact")


def asti_features(obs: ExitObservation, features: str = "full") -> torch.Tensor:
    """Features of the ASTI estimator at one exit.

    Args:
        features (`str`, defaults to `"full"`): `"full"` includes both probability vectors (right for a few classes);
            `"compact"` drops them (right for a large vocabulary, e.g. decoder LMs). Stored in the ASTI model dict as
            `"features"` (absent means `"full"`, so older calibrations keep working).

    Returns:
        `torch.Tensor` of shape `(batch_size, 2 * num_labels + 7)` (`full`) or `(batch_size, 7)` (`compact`): the
        probability vector and the previous exit's (`full` only), max prob, margin, entropy, whether the argmax equals
        the previous exit's, the agreement streak divided by the exit position + 1, the change of max prob since the
        previous exit, and log(r_l).
    """
    if features not in ASTI_FEATURE_SETS:
        raise ValueError(f"ASTI features must be one of {ASTI_FEATURE_SETS}, got {features!r}")
    prev_pred = obs.prev_probs.argmax(-1)
    agree_prev = (obs.prediction == prev_pred).float() if obs.exit_index > 0 else torch.zeros_like(obs.max_prob)
    delta_conf = obs.max_prob - obs.prev_probs.amax(-1)
    vectors = [obs.probs, obs.prev_probs] if features == "full" else []
    return torch.cat(
        [
            *vectors,
            obs.max_prob[:, None],
            obs.margin[:, None],
            obs.entropy[:, None],
            agree_prev[:, None],
            (obs.agree_count.float() / (obs.exit_index + 1))[:, None],
            delta_conf[:, None],
            obs.residual_ratio.clamp_min(1e-6).log()[:, None],
        ],
        dim=-1,
    )


class StoppingRule:
    """Base of the rules: `rule(obs)` returns `torch.BoolTensor` of shape `(batch_size,)`, "stop here".

    `needs_all_heads`: the rule reads every exit (otherwise the model runs only the head where rows stop).
    `needs_residuals`: the rule reads r_l and ||pool(h_l)|| (otherwise the model skips computing them).
    """

    needs_all_heads = True
    needs_residuals = False

    def __call__(self, obs: ExitObservation) -> torch.Tensor:
        raise NotImplementedError


class NoStop(StoppingRule):
    """Full depth: never stop before the final exit."""

    needs_all_heads = False

    def __call__(self, obs: ExitObservation) -> torch.Tensor:
        return torch.zeros_like(obs.prediction, dtype=torch.bool)


class StaticStop(StoppingRule):
    """Stop at the first exit whose 0-based layer index is >= `layer`."""

    needs_all_heads = False

    def __init__(self, layer: int):
        self.layer = int(layer)

    def __call__(self, obs: ExitObservation) -> torch.Tensor:
        return torch.full_like(obs.prediction, obs.layer_index >= self.layer, dtype=torch.bool)


class EntropyStop(StoppingRule):
    """Stop when the entropy (nats) of the exit's distribution is <= `threshold` (DeeBERT)."""


    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def __call__(self, obs: ExitObservation) -> torch.Tensor:
        return obs.entropy <= self.threshold


class ConfidenceStop(StoppingRule):
    """Stop when the max probability is >= `threshold`."""


    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def __call__(self, obs: ExitObservation) -> torch.Tensor:
        return obs.max_prob >= self.threshold


class PatienceStop(StoppingRule):
    """Stop once the argmax has been the same at `patience` consecutive earlier exits (PABEE)."""


    def __init__(self, patience: int):
        self.patience = int(patience)

    def __call__(self, obs: ExitObservation) -> torch.Tensor:
        return obs.agree_count >= self.patience


class AstiBoundStop(StoppingRule):
    """Stop when K_l * ||pool(h_l)|| * r_l * rho_l <= cost * next_compute (the diminishing-returns bound).

    Args:
        cost (`float`): price of the whole model's compute, in logit units.
        lipschitz (`list[float]`): K_l per exit position, the spectral norm of the next exit head's weight.
    """

    needs_residuals = True

    def __init__(self, cost: float, lipschitz: list[float]):
        self.cost = float(cost)
        self.lipschitz = list(lipschitz)

    @staticmethod
    def bound(obs: ExitObservation, lipschitz: list[float]) -> torch.Tensor:
        """K_l * ||pool(h_l)|| * r_l * min(rho_l, 1): what the next block can move the logits by, `(batch_size,)`."""
        return lipschitz[obs.exit_index] * obs.state_norm * obs.residual_ratio * obs.rho.clamp(max=1.0)

    def __call__(self, obs: ExitObservation) -> torch.Tensor:
        return self.bound(obs, self.lipschitz) <= self.cost * obs.next_compute


class AstiStop(StoppingRule):
    """Stop iff 1 - P(prediction here == final prediction) <= `cost`, P from the fitted per-exit logistic models.

    Args:
        cost (`float`): in [0, 1]; 0 never stops early, 1 always stops at the first exit.
        model (`dict`): `config.calibration["asti"]` with per-exit `mean`, `std`, `coef` (lists of length F) and
            `intercept` (float), one entry per non-final exit position.
    """

    needs_residuals = True

    def __init__(self, cost: float, model: dict):
        self.cost = float(cost)
        self.features = model.get("features", "full")
        # float64: the same arithmetic as the calibration's offline scoring. The standardisation is folded into the
        # weights once: z = ((x - mean) / std) @ coef + b = x @ (coef / std) + (b - mean @ (coef / std)).
        self.weight, self.bias = [], []
        for mean, std, coef, intercept in zip(model["mean"], model["std"], model["coef"], model["intercept"]):
            w = torch.tensor(coef, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)
            self.weight.append(w)
            self.bias.append(float(intercept) - float(torch.tensor(mean, dtype=torch.float64) @ w))

    def logit_same(self, obs: ExitObservation) -> torch.Tensor:
        """The logit z of P(prediction here == final prediction), shape `(batch_size,)`, float64 (+inf at the final
        exit, which is the final prediction)."""
        k = obs.exit_index
        if k >= len(self.weight):
            return torch.full_like(obs.max_prob, math.inf, dtype=torch.float64)
        x = asti_features(obs, self.features).double()
        return x @ self.weight[k].to(x.device) + self.bias[k]

    def probability_same(self, obs: ExitObservation) -> torch.Tensor:
        """P(prediction at this exit == final prediction), shape `(batch_size,)`, float64."""
        return torch.sigmoid(self.logit_same(obs))

    def __call__(self, obs: ExitObservation) -> torch.Tensor:
        return 1.0 - self.probability_same(obs) <= self.cost


def validate_exit_fields(
    config, default_exits: list[int] | None = None, allowed: list[int] | None = None, unit: str = "layer",
    allowed_reason: str = "exit_layers entries must be among",
) -> None:
    """Normalise `config.exit_layers` in place (0-based indices, sorted, the last block added: it is the full model)
    and validate `config.stopping_rule` / `config.stopping_params` against it. Shared by every `DepthStop*` config.

    Args:
        config: has `num_hidden_layers`, `exit_layers`, `stopping_rule`, `stopping_params`, `calibration`.
        default_exits (`list[int]`, *optional*): exits when `exit_layers` is None (default: every block).
        allowed (`list[int]`, *optional*): the only indices an exit may take (e.g. ResNet stage ends), and
            `allowed_reason` the start of the error message when another index is given.
        unit (`str`): what an index counts, for the error messages ("layer", "residual block").

    Raises:
        `ValueError` naming the field and the value: an index out of range, not allowed, or duplicated.
    """
    num_layers = config.num_hidden_layers
    if config.exit_layers is None:
        config.exit_layers = list(range(num_layers)) if default_exits is None else list(default_exits)
    layers = list(config.exit_layers)
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise ValueError(
                f"exit_layers entries must be 0-based {unit} indices in [0, {num_layers - 1}] "
                f"({num_layers} {unit}s), got {layer!r} in exit_layers={layers}"
            )
        if allowed is not None and layer not in allowed:
            raise ValueError(f"{allowed_reason} {list(allowed)}, got {layer!r} in exit_layers={layers}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"exit_layers must not contain duplicates, got exit_layers={layers}")
    layers = sorted(layers)
    if not layers or layers[-1] != num_layers - 1:
        layers.append(num_layers - 1)
    config.exit_layers = layers
    config.stopping_params = validate_rule(
        config.stopping_rule, dict(config.stopping_params or {}), config.exit_layers, config.calibration
    )


def validate_rule(name: str, params: dict, exit_layers: list[int], calibration: dict | None) -> dict:
    """Check a rule name and its parameters; return the normalised parameters.

    Raises:
        `ValueError` naming the field and the value for an unknown rule, a missing, unknown or out-of-range
        parameter, or `asti` without calibration.
    """
    if name not in STOPPING_RULES:
        raise ValueError(f"stopping_rule must be one of {STOPPING_RULES}, got {name!r}")
    expected = RULE_PARAMETERS[name]
    unknown = set(params) - ({expected} if expected else set())
    if unknown:
        raise ValueError(f"stopping rule {name!r} takes {expected or 'no parameter'}, got {sorted(unknown)}")
    if expected is None:
        return {}
    if expected not in params:
        if name == "asti" and calibration and "asti" in calibration.get("settings", {}):
            params = dict(calibration["settings"]["asti"])
        else:
            raise ValueError(f"stopping rule {name!r} needs the parameter {expected!r}")
    value = params[expected]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ValueError(f"{name}({expected}=...) must be a number, got {value!r}")
    if name == "static":
        if int(value) != value or not 0 <= value < exit_layers[-1] + 1:
            raise ValueError(f"static(layer=...) must be a 0-based layer index in [0, {exit_layers[-1]}], got {value!r}")
        value = int(value)
    elif name == "patience":
        if int(value) != value or value < 1:
            raise ValueError(f"patience(patience=...) must be an integer >= 1, got {value!r}")
        value = int(value)
    elif name in ("asti", "asti_bound"):
        if value < 0:
            raise ValueError(f"{name}(cost=...) must be >= 0, got {value!r}")
        if name == "asti" and (calibration is None or "asti" not in calibration):
            raise ValueError(
                "stopping rule 'asti' needs calibration: run hf_depthstop.calibrate(model, dataset, ...) first "
                "(or use 'asti_bound', which needs none)"
            )
    elif name == "entropy" and value < 0:
        raise ValueError(f"entropy(threshold=...) must be >= 0, got {value!r}")
    elif name == "confidence" and not 0.0 <= value <= 1.0:
        raise ValueError(f"confidence(threshold=...) must be in [0, 1], got {value!r}")
    return {expected: value}


def build_rule(name: str, params: dict, calibration: dict | None = None, lipschitz: list[float] | None = None):
    """Instantiate a (validated) rule. `lipschitz` is needed by `asti_bound`."""
    if name == "none":
        return NoStop()
    if name == "static":
        return StaticStop(params["layer"])
    if name == "entropy":
        return EntropyStop(params["threshold"])
    if name == "confidence":
        return ConfidenceStop(params["threshold"])
    if name == "patience":
        return PatienceStop(params["patience"])
    if name == "asti_bound":
        return AstiBoundStop(params["cost"], lipschitz)
    if name == "asti":
        return AstiStop(params["cost"], calibration["asti"])
    raise ValueError(f"stopping_rule must be one of {STOPPING_RULES}, got {name!r}")


def simulate_exits(rule, observations: list[ExitObservation]) -> torch.Tensor:
    """Offline: the exit position each example stops at, given full-depth observations at every exit.

    Args:
        rule: a stopping rule.
        observations (`list[ExitObservation]`): one per exit position, all rows (built with [`observe`] in order).

    Returns:
        `torch.LongTensor` of shape `(batch_size,)`: 0-based exit position (the last one when no exit fired).
    """
    n = observations[0].prediction.shape[0]
    num_exits = len(observations)
    exit_pos = torch.full((n,), num_exits - 1, dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    for k, obs in enumerate(observations[:-1]):
        stop = rule(obs) & ~done
        exit_pos[stop] = k
        done |= stop
    return exit_pos
