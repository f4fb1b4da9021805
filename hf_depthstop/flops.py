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


def patch_embedding_flops(
    num_patches: torch.Tensor, num_channels: int, patch_area: int, hidden_size: int
) -> torch.Tensor:
    """FLOPs of a ViT patch embedding: a conv with kernel = stride = patch size, i.e. one linear map per patch.

    Args:
        num_patches (`torch.Tensor` of shape `(batch_size,)`): patches per image ((H / p_h) * (W / p_w)).
        num_channels (`int`): input channels C.
        patch_area (`int`): p_h * p_w pixels per patch.
        hidden_size (`int`): model width d.

    Returns:
        `torch.Tensor` of shape `(batch_size,)`, float64: 2 N C p_h p_w d (the [CLS] token and position embeddings
        are additions, ignored).
    """
    return 2.0 * num_patches.double() * float(num_channels * patch_area) * float(hidden_size)


# ----------------------------------------------------------------------------------------------------------------
# Convolutional nets (ResNet). Convolutions and linear layers count 2 FLOPs per multiply-add; batch norms, ReLUs, the
# stem's max pool (comparisons) and the residual additions are ignored (elementwise, a few percent at most); an
# average pool counts one addition per input element it reads. Plain Python floats: every image of a batch has
# the same size, so the numbers are the same for every row.
# ----------------------------------------------------------------------------------------------------------------
def conv_output_size(size: int, stride: int) -> int:
    """Output length of a convolution or pooling with an odd kernel k, padding k // 2 and `stride` (every conv and
    pool of a ResNet): floor((size - 1) / stride) + 1."""
    return (size - 1) // stride + 1


def conv2d_flops(in_channels: int, out_channels: int, kernel_size: int, out_height: int, out_width: int) -> float:
    """FLOPs of a k x k convolution without groups: 2 k^2 C_in C_out H_out W_out (the bias, if any, ignored)."""
    return 2.0 * kernel_size * kernel_size * in_channels * out_channels * out_height * out_width


def adaptive_avg_pool_flops(channels: int, height: int, width: int, output_size: int) -> float:
    """Additions of `nn.AdaptiveAvgPool2d(output_size)` on a (channels, height, width) map: the sum of its window
    sizes (PyTorch's windows [floor(i H / p), ceil((i + 1) H / p)); equal to C H W when p divides H and W, more
    when the map is smaller than p x p and windows overlap)."""

    def windows(n: int) -> int:
        return sum(-(-(i + 1) * n // output_size) - (i * n // output_size) for i in range(output_size))

    return float(channels * windows(height) * windows(width))


def pooled_linear_head_flops(channels: int, height: int, width: int, pool_size: int, num_labels: int) -> float:
    """FLOPs of a CNN exit head: adaptive average pool to pool_size x pool_size, flatten, linear to `num_labels`."""
    pool = adaptive_avg_pool_flops(channels, height, width, pool_size)
    return pool + 2.0 * channels * pool_size * pool_size * num_labels


def resnet_flops(
    height: int,
    width: int,
    num_channels: int,
    embedding_size: int,
    hidden_sizes: list[int],
    depths: list[int],
    layer_type: str,
    downsample_in_first_stage: bool = False,
    downsample_in_bottleneck: bool = False,
) -> tuple[float, list[float], list[tuple[int, int, int]]]:
    """FLOPs of a Hugging Face ResNet ([`ResNetModel`]) on one `height x width` image, per part.

    Stem: 7x7 stride-2 conv `num_channels -> embedding_size`, then a 3x3 stride-2 max pool (not counted). Stage s has
    `depths[s]` blocks; its first block has stride 2 (stage 0: only with `downsample_in_first_stage`) and a 1x1
    projection shortcut when the stride is 2 or the channels change (counted). A `basic` block is two 3x3 convs; a
    `bottleneck` block is 1x1 (to C_out / 4), 3x3, 1x1 (to C_out), the stride on the 3x3 conv, or on the first 1x1
    with `downsample_in_bottleneck`.

    Returns:
        `(stem, blocks, shapes)`: the stem's FLOPs; a list with the FLOPs of each residual block in 0-based flat
        order (stages concatenated); and each block's output shape `(channels, height, width)`.
    """
    if layer_type not in ("basic", "bottleneck"):
        raise ValueError(f"layer_type must be 'basic' or 'bottleneck', got layer_type={layer_type!r}")
    h, w = conv_output_size(height, 2), conv_output_size(width, 2)
    stem = conv2d_flops(num_channels, embedding_size, 7, h, w)
    h, w = conv_output_size(h, 2), conv_output_size(w, 2)  # max pool
    blocks, shapes = [], []
    in_channels = embedding_size
    for stage, (out_channels, depth) in enumerate(zip(hidden_sizes, depths)):
        for index in range(depth):
            stride = (2 if stage > 0 or downsample_in_first_stage else 1) if index == 0 else 1
            ho, wo = conv_output_size(h, stride), conv_output_size(w, stride)
            if layer_type == "basic":
                flops = conv2d_flops(in_channels, out_channels, 3, ho, wo) + conv2d_flops(
                    out_channels, out_channels, 3, ho, wo
                )
            else:
                reduced = out_channels // 4
                h1, w1 = (ho, wo) if downsample_in_bottleneck else (h, w)  # where the first 1x1 conv's output lives
                flops = (
                    conv2d_flops(in_channels, reduced, 1, h1, w1)
                    + conv2d_flops(reduced, reduced, 3, ho, wo)
                    + conv2d_flops(reduced, out_channels, 1, ho, wo)
                )
            if in_channels != out_channels or stride != 1:  # projection shortcut
                flops += conv2d_flops(in_channels, out_channels, 1, ho, wo)
            blocks.append(flops)
            shapes.append((out_channels, ho, wo))
            in_channels, h, w = out_channels, ho, wo
    return stem, blocks, shapes
