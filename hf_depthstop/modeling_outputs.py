# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Output dataclasses. Every field is declared: DDP rebuilds outputs with `type(out)(**out)`."""

from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast, ImageClassifierOutput, SequenceClassifierOutput


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


@dataclass
class DepthStopImageClassifierOutput(ImageClassifierOutput):
    r"""
    Output of the early-exit image classifiers (ViT, ResNet). Same fields and meaning as
    [`DepthStopSequenceClassifierOutput`], per image; `exit_layer` is the 0-based index of the block (ViT layer, or
    ResNet residual block counted across stages) whose exit produced `logits`, and `compute_fraction` is FLOPs used /
    FLOPs of the full model (stem/embeddings, all blocks, the final head).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*), logits (`(batch_size, num_labels)`),
        exit_logits (`(batch_size, num_exits, num_labels)`, training path), exit_residual_ratios,
        exit_compute_fractions, exit_state_norms (`(batch_size, num_exits)`, training path),
        exit_layer (`torch.LongTensor` of shape `(batch_size,)`), compute_fraction (`(batch_size,)`).
    """

    exit_logits: torch.FloatTensor | None = None
    exit_residual_ratios: torch.FloatTensor | None = None
    exit_compute_fractions: torch.FloatTensor | None = None
    exit_state_norms: torch.FloatTensor | None = None
    exit_layer: torch.LongTensor | None = None
    compute_fraction: torch.FloatTensor | None = None


@dataclass
class DepthStopCausalLMOutputWithPast(CausalLMOutputWithPast):
    r"""
    Output of the early-exit decoder LMs (`DepthStopLlamaForCausalLM`, `DepthStopGPT2LMHeadModel`).

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            With `labels`. Training path: sum_k w_k * CE_k + lambda * L_depth (next-token cross-entropy of every exit,
            computed inside the model exit by exit). Inference path: the final exit's next-token cross-entropy.
        logits (`torch.FloatTensor` of shape `(batch_size, seq_len, vocab_size)`):
            The final exit's logits, or, in a decoding step with a stopping rule, each row's logits at the exit it
            used (`seq_len` = 1).
        cache (`Cache`, *optional*): the key/value cache (every layer has the same length after every step).
        exit_logits (`torch.FloatTensor` of shape `(batch_size, seq_len, num_exits, vocab_size)`, *optional*):
            Every exit's logits; only with `output_exit_logits=True` and no `labels` (short inputs: it is large).
        exit_losses (`torch.FloatTensor` of shape `(num_exits,)`, *optional*): next-token CE of each exit (training
            path with `labels`), mean over non-ignored tokens.
        exit_token_accuracies (`torch.FloatTensor` of shape `(num_exits,)`, *optional*): next-token top-1 accuracy of
            each exit over non-ignored tokens (training path with `labels`).
        exit_residual_ratios (`torch.FloatTensor` of shape `(batch_size, seq_len, num_exits)`, *optional*):
            r_l = ||h_l - h_{l-1}|| / ||h_{l-1}|| per token at each exit layer l (training path).
        depth_loss (`torch.FloatTensor` of shape `()`, *optional*): the L_depth part, before the lambda weight.
        exit_layer (`torch.LongTensor` of shape `(batch_size,)`, *optional*): in a decoding step with a stopping rule,
            the 0-based layer whose exit produced each row's logits.
    """

    exit_logits: torch.FloatTensor | None = None
    exit_losses: torch.FloatTensor | None = None
    exit_token_accuracies: torch.FloatTensor | None = None
    exit_residual_ratios: torch.FloatTensor | None = None
    depth_loss: torch.FloatTensor | None = None
    exit_layer: torch.LongTensor | None = None


@dataclass
class DepthStopGenerateOutput(GenerateDecoderOnlyOutput):
    r"""
    [`GenerateDecoderOnlyOutput`] of the early-exit decoder LMs' `generate(..., return_dict_in_generate=True)`, plus:

    Args:
        exit_layers (`torch.LongTensor` of shape `(batch_size, num_new_tokens)`):
            0-based layer whose exit produced each new token (`num_hidden_layers - 1` = full depth; the first new
            token always comes from the full-depth prefill). Lossless mode reports the draft's exit layer for tokens
            the verifier accepted and `num_hidden_layers - 1` for the verifier's own tokens. Positions after a row
            finished hold -1.
        num_verify_passes (`int`, *optional*): lossless mode: how many full-depth verification passes ran.
    """

    exit_layers: torch.LongTensor | None = None
    num_verify_passes: int | None = None
