# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""L_depth, the optimal-stopping depth regularizer, as pure functions of the exits' outputs.

Source: "Optimal Depth of Neural Networks" (arXiv 2506.16862, https://huggingface.co/papers/2506.16862). The paper's
full text was not available to us: the terms below are this project's own derivation from its stated theorem (the
forward pass as an optimal stopping problem with payoff Y_l = -loss_l - c * C_l), not formulas copied from it.

Total loss = sum_l w_l * CE_l + lambda * L_depth, with L_depth a sum of the selected terms:

- `stop`: soft stopping cost. s_l = sigmoid(kappa * (maxprob_l - t)) is the stop probability of a confidence rule
  relaxed; q_l = s_l * prod_{k<l} (1 - s_k) (the last exit takes the remainder) is a distribution over exits, and
  L_stop = E_b[sum_l q_l * (CE_l + c * C_l)] is the differentiable optimal-stopping objective E[loss_tau + c C_tau].
- `distill`: consistency, sum_{l<L} v_l * KL(p_L.detach() || p_l) with v_l = 1 / (num_exits - 1).
- `dr`: diminishing returns, sum_l (l / L) * r_l^2 with r_l the relative change of the pooled state at layer l.

Exit indices below are 0-based positions in `config.exit_layers`; the last position is the final exit.
"""

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F


EXIT_WEIGHTINGS = ("uniform", "linear", "final_heavy", "final_only")
EXIT_GRADIENT_MODES = ("full", "detach", "equilibrium")
# Default of how exit losses reach the backbone (see the model's `exit_gradient`), chosen with the defaults of
# `DepthLossSpec` by the L_depth ablation (benchmarks/results/ablation_ldepth.md).
DEFAULT_EXIT_GRADIENT = "detach"


def parse_exit_gradient(value) -> str | float:
    """Validate an `exit_gradient` setting: `full`, `detach`, `equilibrium`, or a number alpha in [0, 1] (also as a
    string, e.g. from the command line) that scales the early exits' gradient into the backbone (0 = `detach`,
    1 = `full`)."""
    if isinstance(value, str) and value in EXIT_GRADIENT_MODES:
        return value
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        alpha = float("nan")
    if isinstance(value, bool) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"exit_gradient must be one of {EXIT_GRADIENT_MODES} or a number in [0, 1], got {value!r}")
    return alpha
DEPTH_TERMS = ("stop", "distill", "dr")


@dataclass
class DepthLossSpec:
    """Every knob of the training loss. `DepthStopTrainingArguments` builds one of these from its fields.

    The defaults are the winner of the ablation in benchmarks/results/ablation_ldepth.md (`detach_mlp_distill`),
    used with `exit_gradient="detach"` and dense+tanh exit heads (`exit_head_hidden_size`, default `hidden_size`):
    the backbone is trained by the final exit alone (so the final exit stays a plain fine-tune, up to the shared
    gradient clipping) while every exit head learns from its own cross-entropy plus the `distill` term.

    Args:
        exit_weighting (`str`, defaults to `"final_heavy"`): one of `uniform` (w_l = 1/E), `linear` (w_l proportional
            to l + 1, PABEE), `final_heavy` (w_final = 1, others `early_exit_weight`), `final_only` (w_final = 1).
        early_exit_weight (`float`, defaults to 1.0): weight of each non-final exit under `final_heavy`.
        depth_loss_weight (`float`, defaults to 1.0): lambda; 0 gives plain multi-exit training.
        depth_terms (`tuple[str]`, defaults to `("distill",)`): subset of `stop`, `distill`, `dr`.
        compute_cost (`float`, defaults to 0.1): c, the price of the whole model's compute in loss units (`stop`).
        stop_sharpness (`float`, defaults to 10.0): kappa of the soft stop probability (`stop`).
        stop_threshold (`float`, defaults to 0.7): t, the confidence where the soft stop probability is 1/2 (`stop`).
        distill_temperature (`float`, defaults to 1.0): softmax temperature of the `distill` term.
    """

    exit_weighting: str = "final_heavy"
    early_exit_weight: float = 1.0
    depth_loss_weight: float = 1.0
    depth_terms: tuple[str, ...] = field(default=("distill",))
    compute_cost: float = 0.1
    stop_sharpness: float = 10.0
    stop_threshold: float = 0.7
    distill_temperature: float = 1.0

    def __post_init__(self):
        if isinstance(self.depth_terms, str):
            self.depth_terms = tuple(t for t in self.depth_terms.replace("+", ",").split(",") if t and t != "none")
        self.depth_terms = tuple(self.depth_terms)
        if self.exit_weighting not in EXIT_WEIGHTINGS:
            raise ValueError(f"exit_weighting must be one of {EXIT_WEIGHTINGS}, got {self.exit_weighting!r}")
        for term in self.depth_terms:
            if term not in DEPTH_TERMS:
                raise ValueError(f"depth_terms entries must be in {DEPTH_TERMS}, got {term!r}")
        for name in ("early_exit_weight", "depth_loss_weight", "compute_cost", "stop_sharpness"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def exit_loss_weights(num_exits: int, scheme: str, early_exit_weight: float = 0.06) -> torch.Tensor:
    """Weights w of the per-exit cross-entropies.

    Returns:
        `torch.Tensor` of shape `(num_exits,)`. `uniform` and `linear` sum to 1; `final_heavy` is not renormalised
        (final 1, others `early_exit_weight`), so the final exit keeps the plain fine-tune's loss scale.
    """
    if num_exits < 1:
        raise ValueError(f"num_exits must be >= 1, got {num_exits}")
    if scheme == "uniform":
        w = torch.full((num_exits,), 1.0 / num_exits)
    elif scheme == "linear":
        w = torch.arange(1, num_exits + 1, dtype=torch.float32)
        w = w / w.sum()
    elif scheme == "final_heavy":
        w = torch.full((num_exits,), float(early_exit_weight))
        w[-1] = 1.0
    elif scheme == "final_only":
        w = torch.zeros(num_exits)
        w[-1] = 1.0
    else:
        raise ValueError(f"exit_weighting must be one of {EXIT_WEIGHTINGS}, got {scheme!r}")
    return w


def per_exit_cross_entropy(exit_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every exit for every example.

    Args:
        exit_logits (`torch.Tensor` of shape `(batch_size, num_exits, num_labels)`).
        labels (`torch.LongTensor` of shape `(batch_size,)`).

    Returns:
        `torch.Tensor` of shape `(batch_size, num_exits)`.
    """
    b, e, c = exit_logits.shape
    ce = F.cross_entropy(exit_logits.reshape(b * e, c).float(), labels.repeat_interleave(e), reduction="none")
    return ce.view(b, e)


def soft_stopping_distribution(exit_logits: torch.Tensor, sharpness: float, threshold: float) -> torch.Tensor:
    """q_l = s_l * prod_{k<l}(1 - s_k), s_l = sigmoid(sharpness * (maxprob_l - threshold)); the last exit takes the rest.

    Args:
        exit_logits (`torch.Tensor` of shape `(batch_size, num_exits, num_labels)`).

    Returns:
        `torch.Tensor` of shape `(batch_size, num_exits)`, each row sums to 1.
    """
    conf = exit_logits.float().softmax(-1).amax(-1)
    s = torch.sigmoid(sharpness * (conf - threshold))
    s = torch.cat([s[:, :-1], torch.ones_like(s[:, -1:])], dim=1)  # the final exit always stops
    survive = torch.cumprod(torch.cat([torch.ones_like(s[:, :1]), 1.0 - s[:, :-1]], dim=1), dim=1)
    return s * survive


def stop_loss(
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    exit_compute_fractions: torch.Tensor,
    compute_cost: float,
    sharpness: float,
    threshold: float,
    per_exit_ce: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_stop = mean_b sum_l q_l * (CE_l + c * C_l): the soft optimal-stopping objective.

    Args:
        exit_compute_fractions (`torch.Tensor` of shape `(batch_size, num_exits)` or `(num_exits,)`): C_l.

    Returns:
        Scalar `torch.Tensor`.
    """
    ce = per_exit_cross_entropy(exit_logits, labels) if per_exit_ce is None else per_exit_ce
    q = soft_stopping_distribution(exit_logits, sharpness, threshold)
    cost = compute_cost * exit_compute_fractions.to(ce.dtype).expand_as(ce)
    return (q * (ce + cost)).sum(1).mean()


def distill_loss(exit_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """sum_{l<L} KL(p_L.detach() || p_l) / (num_exits - 1), batch mean, scaled by temperature^2.

    Returns:
        Scalar `torch.Tensor` (0 when there is a single exit).
    """
    num_exits = exit_logits.shape[1]
    if num_exits < 2:
        return exit_logits.new_zeros(())
    t = temperature
    teacher = (exit_logits[:, -1:].detach().float() / t).log_softmax(-1)  # (B, 1, C)
    student = (exit_logits[:, :-1].float() / t).log_softmax(-1)  # (B, E-1, C)
    kl = (teacher.exp() * (teacher - student)).sum(-1)  # (B, E-1)
    return kl.mean(0).sum() / (num_exits - 1) * t * t


def diminishing_returns_loss(exit_residual_ratios: torch.Tensor, exit_layers: list[int], num_layers: int) -> torch.Tensor:
    """sum_l ((l + 1) / L) * r_l^2, batch mean, over the exit layers l (0-based).

    Args:
        exit_residual_ratios (`torch.Tensor` of shape `(batch_size, num_exits)`).
        exit_layers (`list[int]`): 0-based layer index of each exit.
        num_layers (`int`): L.
    """
    depth = torch.tensor([(layer + 1) / num_layers for layer in exit_layers], device=exit_residual_ratios.device)
    return (exit_residual_ratios.float().pow(2) * depth).sum(1).mean()


def depth_stop_loss(
    exit_logits: torch.Tensor,
    labels: torch.Tensor,
    spec: DepthLossSpec,
    exit_compute_fractions: torch.Tensor | None = None,
    exit_residual_ratios: torch.Tensor | None = None,
    exit_layers: list[int] | None = None,
    num_layers: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The full training loss: sum_l w_l CE_l + lambda * (sum of the selected L_depth terms).

    Args:
        exit_logits (`torch.Tensor` of shape `(batch_size, num_exits, num_labels)`).
        labels (`torch.LongTensor` of shape `(batch_size,)`).
        spec ([`DepthLossSpec`]).
        exit_compute_fractions (`torch.Tensor` of shape `(batch_size, num_exits)`, *optional*): needed by `stop`.
        exit_residual_ratios (`torch.Tensor` of shape `(batch_size, num_exits)`, *optional*): needed by `dr`.
        exit_layers, num_layers: needed by `dr`.

    Returns:
        `(loss, parts)`: the scalar loss and a dict of detached scalars (`exit_ce`, `ce_<k>` per exit position k,
        `depth_loss` and each active term) for logging.
    """
    num_exits = exit_logits.shape[1]
    ce = per_exit_cross_entropy(exit_logits, labels)  # (B, E)
    weights = exit_loss_weights(num_exits, spec.exit_weighting, spec.early_exit_weight).to(ce.device)
    exit_ce = (ce.mean(0) * weights).sum()
    parts = {"exit_ce": exit_ce.detach()}
    for k in range(num_exits):
        parts[f"ce_{k}"] = ce[:, k].mean().detach()
    depth = exit_logits.new_zeros((), dtype=torch.float32)
    if spec.depth_loss_weight > 0:
        for term in spec.depth_terms:
            if term == "stop":
                if exit_compute_fractions is None:
                    raise ValueError("the 'stop' term needs exit_compute_fractions")
                value = stop_loss(
                    exit_logits, labels, exit_compute_fractions, spec.compute_cost, spec.stop_sharpness,
                    spec.stop_threshold, per_exit_ce=ce,
                )
            elif term == "distill":
                value = distill_loss(exit_logits, spec.distill_temperature)
            else:  # "dr"
                if exit_residual_ratios is None or exit_layers is None or num_layers is None:
                    raise ValueError("the 'dr' term needs exit_residual_ratios, exit_layers and num_layers")
                value = diminishing_returns_loss(exit_residual_ratios, exit_layers, num_layers)
            parts[term] = value.detach()
            depth = depth + value
    parts["depth_loss"] = depth.detach()
    loss = exit_ce + spec.depth_loss_weight * depth
    return loss, parts


class ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` backward. Used by the models' `exit_gradient` modes
    (`equilibrium`, a number alpha): `ScaleGradient.apply(x, scale)`, `x` of any shape."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None
