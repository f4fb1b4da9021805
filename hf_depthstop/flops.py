# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Analytic FLOP counts (pure functions of the config and the true sequence length).

A multiply-add counts as 2 FLOPs. Embedding look-ups, layer norms, softmax and activations are ignored: they are a few
percent of a transformer layer and the same for every stopping rule. Counting is done per example at its true
(unpadded) length, so a `compute_fraction` does not depend on what else is in the batch.
"""

import torch


def transformer_layer_flops(seq_len: torch.Tensor, hidden_size: int, intermediate_size: int) -> torch.Tensor:
    """FLOPs of one encoder layer (Q/K/V/O projections, attention scores and mixing, the MLP).

    Args:
        seq_len (`torch.Tensor` of shape `(batch_size,)`): number of real tokens per example.
        hidden_size (`int`): model width d.
        intermediate_size (`int`): MLP width d_ff.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, float64: 2T(4d^2 + 2 d d_ff) + 4 T^2 d.
    """
    t = seq_len.double()
    d = float(hidden_size)
    return 2.0 * t * (4.0 * d * d + 2.0 * d * intermediate_size) + 4.0 * t * t * d


def classification_head_flops(
    seq_len: torch.Tensor, hidden_size: int, num_labels: int, pooling: str, dense_pooler: bool
) -> torch.Tensor:
    """FLOPs of one exit head: pooling, the optional dense+tanh pooler, the linear classifier.

    Args:
        seq_len (`torch.Tensor` of shape `(batch_size,)`): number of real tokens per example.
        hidden_size (`int`): model width d.
        num_labels (`int`): number of classes.
        pooling (`str`): `"cls"` (free) or `"mean"` (T*d additions).
        dense_pooler (`bool`): whether a d x d dense layer runs before the classifier.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, float64.
    """
    t = seq_len.double()
    d = float(hidden_size)
    flops = torch.full_like(t, 2.0 * d * num_labels)
    if pooling == "mean":
        flops = flops + t * d
    if dense_pooler:
        flops = flops + 2.0 * d * d
    return flops
