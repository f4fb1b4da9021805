# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Output dataclasses. Every field is declared: DDP rebuilds outputs with `type(out)(**out)`."""

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import SequenceClassifierOutput


@dataclass
class DepthStopSequenceClassifierOutput(SequenceClassifierOutput):
    r"""
    Output of the early-exit sequence classifiers.

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            With `labels`. Training path: the full loss (weighted exit cross-entropies + lambda * L_depth).
            Inference path: cross-entropy of the logits actually used.
        logits (`torch.FloatTensor` of shape `(batch_size, num_labels)`):
            The prediction actually used: at inference, the logits of the exit where each example stopped; on the
            training path, the final exit's logits.
        exit_logits (`torch.FloatTensor` of shape `(batch_size, num_exits, num_labels)`, *optional*):
            Logits of every exit in `config.exit_layers` order. Only on the training path (`model.training` or
            `output_exit_logits=True`).
        exit_residual_ratios (`torch.FloatTensor` of shape `(batch_size, num_exits)`, *optional*):
            r_l = ||pool(h_l) - pool(h_{l-1})|| / ||pool(h_{l-1})|| at each exit layer l (training path only).
        exit_compute_fractions (`torch.FloatTensor` of shape `(batch_size, num_exits)`, *optional*):
            C_l, the fraction of full-model FLOPs spent when stopping at each exit with every earlier head evaluated
            (training path only).
        exit_state_norms (`torch.FloatTensor` of shape `(batch_size, num_exits)`, *optional*):
            ||pool(h_l)|| at each exit layer (training path only; used by the `asti_bound` rule's calibration).
        exit_layer (`torch.LongTensor` of shape `(batch_size,)`):
            0-based index of the layer whose exit produced `logits` (`num_hidden_layers - 1` means full depth).
        compute_fraction (`torch.FloatTensor` of shape `(batch_size,)`):
            FLOPs used / FLOPs of the full model (all layers + the final head), per example at its true length.
    """

    exit_logits: torch.FloatTensor | None = None
    exit_residual_ratios: torch.FloatTensor | None = None
    exit_compute_fractions: torch.FloatTensor | None = None
    exit_state_norms: torch.FloatTensor | None = None
    exit_layer: torch.LongTensor | None = None
    compute_fraction: torch.FloatTensor | None = None
