# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Training arguments of [`DepthStopTrainer`]: every knob of the exit losses and of L_depth."""

import os
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from .losses import DEFAULT_EXIT_GRADIENT, DEPTH_TERMS, EXIT_WEIGHTINGS, DepthLossSpec, parse_exit_gradient


# The defaults below are the winner of the L_depth ablation (benchmarks/ablation_ldepth.py, results in
# benchmarks/results/ablation_ldepth.md): see README "Choosing the default".
_DEFAULTS = DepthLossSpec()

logger = logging.get_logger(__name__)


def _has_accelerator() -> bool:
    """Whether torch sees a CUDA, XPU or MPS device."""
    xpu = getattr(torch, "xpu", None)
    mps = getattr(torch.backends, "mps", None)
    return (
        torch.cuda.is_available()
        or (xpu is not None and xpu.is_available())
        or (mps is not None and mps.is_available())
    )


@dataclass
class DepthStopTrainingArguments(TrainingArguments):
    r"""
    [`TrainingArguments`] plus the early-exit training loss.

    > Exit losses

    exit_weighting, early_exit_weight, exit_gradient, exit_head_learning_rate

    > The depth regularizer L_depth (total loss = sum_l w_l CE_l + depth_loss_weight * L_depth)

    depth_loss_weight, depth_terms, compute_cost, stop_sharpness, stop_threshold, distill_temperature

    See [`hf_depthstop.losses`] for the formulas.
    """

    exit_weighting: str = field(
        default=_DEFAULTS.exit_weighting,
        metadata={
            "help": "Weights of the per-exit cross-entropies: uniform, linear (proportional to depth, PABEE), "
            "final_heavy (final exit 1, others early_exit_weight) or final_only (plain fine-tuning).",
            "choices": list(EXIT_WEIGHTINGS),
        },
    )
    early_exit_weight: float = field(
        default=_DEFAULTS.early_exit_weight,
        metadata={"help": "Weight of each non-final exit's cross-entropy under exit_weighting=final_heavy."},
    )
    exit_gradient: str = field(
        default=DEFAULT_EXIT_GRADIENT,
        metadata={
            "help": "How non-final exits' losses reach the backbone: full (joint training), detach (exit heads train "
            "on frozen features; the backbone gets only the final loss: two-stage training run concurrently) or "
            "equilibrium (gradient equilibrium: rescale each exit's gradient into the shared trunk), or a number alpha "
            "in [0, 1] scaling the early exits' gradient into the backbone (0 = detach, 1 = full).",
        },
    )
    exit_head_learning_rate: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the exits' own parameters (classifier exit heads `exit_heads.*`, LM exit adapters "
            "`exit_adapters.*`), which start from scratch while the backbone is fine-tuned. None: learning_rate."
        },
    )
    depth_loss_weight: float = field(
        default=_DEFAULTS.depth_loss_weight,
        metadata={"help": "lambda, the weight of L_depth. 0 gives plain multi-exit training."},
    )
    depth_terms: str = field(
        default=",".join(_DEFAULTS.depth_terms),
        metadata={
            "help": f"Comma-separated L_depth terms among {', '.join(DEPTH_TERMS)} ('none' for no term): stop = soft "
            "optimal-stopping cost, distill = KL from the final exit to earlier exits, dr = diminishing-returns "
            "penalty on the relative residual norms."
        },
    )
    compute_cost: float = field(
        default=_DEFAULTS.compute_cost,
        metadata={"help": "c, the price of the full model's compute in loss units (used by the stop term)."},
    )
    stop_sharpness: float = field(
        default=_DEFAULTS.stop_sharpness,
        metadata={"help": "kappa of the soft stop probability sigmoid(kappa * (confidence - stop_threshold))."},
    )
    stop_threshold: float = field(
        default=_DEFAULTS.stop_threshold, metadata={"help": "Confidence at which the soft stop probability is 1/2."}
    )
    distill_temperature: float = field(
        default=_DEFAULTS.distill_temperature, metadata={"help": "Softmax temperature of the distill term."}
    )

    def __post_init__(self):
        if not self.use_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # Launched with several processes (accelerate launch / torchrun) on a machine without an accelerator:
            # stock TrainingArguments would then build a non-distributed state in every process (each rank training
            # alone on all the data); CPU ranks need `use_cpu=True` to become DDP ranks on gloo.
            logger.info("several processes and no accelerator: use_cpu=True (DDP on CPU, gloo)")
            self.use_cpu = True
        super().__post_init__()
        parse_exit_gradient(self.exit_gradient)
        lr = self.exit_head_learning_rate
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0):
            raise ValueError(f"exit_head_learning_rate must be a positive number or None, got {lr!r}")
        self.depth_loss_spec()  # validates every loss field, naming the field and value

    def depth_loss_spec(self) -> DepthLossSpec:
        """The [`DepthLossSpec`] these arguments describe."""
        return DepthLossSpec(
            exit_weighting=self.exit_weighting,
            early_exit_weight=self.early_exit_weight,
            depth_loss_weight=self.depth_loss_weight,
            depth_terms=self.depth_terms,
            compute_cost=self.compute_cost,
            stop_sharpness=self.stop_sharpness,
            stop_threshold=self.stop_threshold,
            distill_temperature=self.distill_temperature,
        )
