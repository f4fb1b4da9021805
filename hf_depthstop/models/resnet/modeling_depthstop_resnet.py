# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Early-exit ResNet for image classification.

The model holds a stock [`ResNetModel`] as `resnet` (`resnet.embedder`, `resnet.encoder.stages[i].layers[j]`,
`resnet.pooler`) and the stock `classifier`, so every ResNet checkpoint loads with `from_pretrained` and only the exit
heads are new. Residual blocks are numbered 0-based across stages ("flat" index). The block loop with exits is written
out below, twice: the training path (every block, every exit head, every image) and the inference path (images that
stop leave the batch, so the remaining blocks run on fewer images: real compute savings, not masking).

Exit heads read the block's output directly. Hugging Face ResNet blocks are post-activation (`ReLU(F(x) + s(x))`), so
those features are already normalised by the blocks' batch norms and non-negative: the BN + ReLU that a head needs on
a pre-activation network would add nothing here, and the heads are a spatial average pool + one linear layer.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetModel, ResNetPreTrainedModel
from transformers.utils import logging

from ...flops import pooled_linear_head_flops, resnet_flops
from ...hub import DepthStopHubMixin
from ...losses import DEFAULT_EXIT_GRADIENT, DepthLossSpec, ScaleGradient, depth_stop_loss, parse_exit_gradient
from ...modeling_common import DepthStopClassifierMixin
from ...modeling_outputs import DepthStopImageClassifierOutput
from ...peft_utils import DepthStopPeftMixin
from ...stopping import observe, validate_rule
from .configuration_depthstop_resnet import DepthStopResNetConfig


logger = logging.get_logger(__name__)


class DepthStopResNetExitHead(nn.Module):
    """A non-final exit: feature map (batch_size, channels, height, width) -> adaptive average pool to
    (batch_size, channels, p, p) -> flatten -> linear -> (batch_size, num_labels), with p = `config.exit_pool_size`."""

    def __init__(self, config: DepthStopResNetConfig, channels: int):
        super().__init__()
        p = config.exit_pool_size
        self.pooler = nn.AdaptiveAvgPool2d(p)
        self.classifier = nn.Linear(channels * p * p, config.num_labels)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """(batch, channels, height, width) -> (batch, channels * p * p), channel-major as `flatten(1)` orders it."""
        return self.pooler(features).flatten(1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.classifier(pooled)

    def lipschitz(self) -> float:
        """Lipschitz constant of the head on its pooled input: the spectral norm of the linear layer."""
        return torch.linalg.matrix_norm(self.classifier.weight.float(), ord=2).item()


class DepthStopResNetForImageClassification(
    DepthStopHubMixin, DepthStopPeftMixin, DepthStopClassifierMixin, ResNetPreTrainedModel
):

    r"""
    ResNet with an exit head after each residual block in `config.exit_layers` and a stopping rule run inside
    `forward()`.

    Modules: `resnet` (stock [`ResNetModel`]), `exit_heads` (one [`DepthStopResNetExitHead`] per non-final exit, in
    `exit_layers` order), and the final exit: the stock global average pool `resnet.pooler` and `classifier`
    (Flatten + Linear), named as in [`ResNetForImageClassification`] so its checkpoints load completely.

    Two paths:
    - **training path** (`model.training`, or `output_exit_logits=True`): all blocks, all exits, all images. Returns
      `exit_logits` `(batch_size, num_exits, num_labels)`, the final exit's `logits`, and with `labels` the full loss
      (weighted exit cross-entropies + lambda * L_depth, see [`hf_depthstop.losses`]).
    - **inference path** (eval mode): the stopping rule decides per image after each exit; stopped images leave the
      batch. `logits` are those of the exit each image used; `exit_layer` (0-based flat block index) and
      `compute_fraction` (FLOPs used / full-model FLOPs) are per image. An image's result does not depend on the other
      images of its batch (batch norm runs on its running statistics in eval mode). With rule `none` only the final
      head runs: the stock model's computation.

    The residual ratio of block l is r_l = ||F_l(h)|| / ||s_l(h)|| per image, over all of C x H x W: F_l is the
    residual branch (`block.layer`, before the addition) and s_l the shortcut (`block.shortcut`, identity or the 1x1
    projection), the two terms the stock block adds before its activation. The state norm read by `asti_bound` is
    ||pooled features|| of the exit's head input.

    Images of any size work (every map is at least 1 x 1 pixel: each conv and pool maps n pixels to
    floor((n - 1) / stride) + 1); an exit's pool replicates a map smaller than p x p into its cells.

    Example:

    ```python
    >>> model = DepthStopResNetForImageClassification.from_pretrained(path)  # a ResNetForImageClassification
    >>> model.set_stopping_rule("confidence", threshold=0.9)
    >>> model.eval(); out = model(pixel_values); out.exit_layer, out.compute_fraction
    ```
    """

    _head_architecture = "ImageClassification"  # stock *ImageClassification checkpoints carry a head
    config_class = DepthStopResNetConfig
    config: DepthStopResNetConfig
    base_model_prefix = "resnet"
    accepts_loss_kwargs = False  # the loss is computed here; Trainer must not inject num_items_in_batch

    def __init__(self, config: DepthStopResNetConfig):
        config.validate_exits()
        super().__init__(config)
        self.num_labels = config.num_labels
        self.resnet = ResNetModel(config)
        channels = [size for size, depth in zip(config.hidden_sizes, config.depths) for _ in range(depth)]
        self.exit_heads = nn.ModuleList(
            [DepthStopResNetExitHead(config, channels[layer]) for layer in config.exit_layers[:-1]]
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(config.hidden_sizes[-1], config.num_labels))
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------
    # Lipschitz constants of the heads (asti_bound); loading and the rule: DepthStopClassifierMixin
    # ----------------------------------------------------------------------------------------------------------
    def _exit_lipschitz(self) -> list[float]:
        """K_k for `asti_bound`: spectral norm of the head of exit k + 1 (the head whose logits the next block moves)."""
        norms = [head.lipschitz() for head in self.exit_heads]
        norms.append(torch.linalg.matrix_norm(self.classifier[1].weight.float(), ord=2).item())
        return norms[1:] + [0.0]

    # ----------------------------------------------------------------------------------------------------------
    # Pieces of the exit computation (blocks, pooling, heads, FLOPs)
    # ----------------------------------------------------------------------------------------------------------
    def _blocks(self) -> list[nn.Module]:
        """The residual blocks in 0-based flat order (stages concatenated)."""
        return [block for stage in self.resnet.encoder.stages for block in stage.layers]

    @staticmethod
    def _block_branches(block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stock block's forward, step by step: `(output, residual, shortcut)`, with `residual` = F(h) (the
        branch before the addition), `shortcut` = s(h) and `output` = activation(F(h) + s(h)), all (batch, C, H, W)."""
        residual = block.layer(hidden)
        shortcut = block.shortcut(hidden)
        return block.activation(residual + shortcut), residual, shortcut

    @staticmethod
    def _residual_ratio(residual: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        """r_l = ||F(h)|| / ||s(h)|| per image over C x H x W: shape (batch,)."""
        return residual.flatten(1).norm(dim=-1) / shortcut.flatten(1).norm(dim=-1).clamp_min(1e-6)

    def _pool(self, exit_index: int, features: torch.Tensor) -> torch.Tensor:
        """The head input of exit position `exit_index` (0-based): (batch, C, H, W) -> (batch, C * p * p) for a
        non-final exit, (batch, C) (the stock global average pool) for the final one."""
        if exit_index < len(self.exit_heads):
            return self.exit_heads[exit_index].pool(features)
        return self.resnet.pooler(features).flatten(1)

    def _head(self, exit_index: int, pooled: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_labels) of exit position `exit_index` (0-based) from its pooled features."""
        if exit_index < len(self.exit_heads):
            return self.exit_heads[exit_index](pooled)
        return self.classifier(pooled)

    def _flops(self, height: int, width: int) -> tuple[list[float], list[float], float]:
        """FLOPs of one `height x width` image, per exit position k: `reach[k]` (stem + blocks up to exit k's block)
        and `head[k]` (exit k's head; the last is the final pool + classifier); and the full stock model's FLOPs."""
        c = self.config
        stem, blocks, shapes = resnet_flops(
            height,
            width,
            c.num_channels,
            c.embedding_size,
            list(c.hidden_sizes),
            list(c.depths),
            c.layer_type,
            c.downsample_in_first_stage,
            c.downsample_in_bottleneck,
        )
        reach, head = [], []
        for k, layer in enumerate(c.exit_layers):
            reach.append(stem + sum(blocks[: layer + 1]))
            pool = c.exit_pool_size if k < len(c.exit_layers) - 1 else 1
            head.append(pooled_linear_head_flops(*shapes[layer], pool, c.num_labels))
        return reach, head, stem + sum(blocks) + head[-1]

    def _exit_fractions(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute fractions of a batch dict (`pixel_values` of shape (batch, channels, height, width) read):
        `(all_heads, single_head)`, each float32 `(batch, num_exits)`: C_k when every head up to exit k ran (rules
        reading all exits), and when only exit k's head ran (`static`). The same for every image of the batch."""
        pixel_values = inputs["pixel_values"]
        c = self.config
        height, width = pixel_values.shape[-2], pixel_values.shape[-1]
        # counted once per image size and exit layout (the forward pass asks on every call)
        key = (height, width, tuple(c.exit_layers), c.exit_pool_size, c.num_labels, pixel_values.device)
        cache = self.__dict__.setdefault("_fractions_cache", {})
        if key not in cache:
            reach, head, full = self._flops(height, width)
            reach_t = torch.tensor(reach, dtype=torch.float64)
            head_t = torch.tensor(head, dtype=torch.float64)
            both = torch.stack([reach_t + head_t.cumsum(0), reach_t + head_t]) / full  # (2, num_exits)
            cache[key] = both.float().to(pixel_values.device)
        both = cache[key][:, None].expand(-1, pixel_values.shape[0], -1)
        return both[0], both[1]

    def exit_compute_fractions(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """C_k per image and exit when every head up to exit k runs: shape (batch, num_exits), float32."""
        return self._exit_fractions({"pixel_values": pixel_values})[0]

    def _check_inputs(self, pixel_values: torch.Tensor | None) -> None:
        if pixel_values is None:
            raise ValueError("pixel_values is required: a (batch_size, num_channels, height, width) tensor")
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = (
                tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            )
            raise ValueError(f"pixel_values must have shape (batch_size, num_channels, height, width), got {shape}")
        if not pixel_values.is_floating_point():
            raise TypeError(f"pixel_values must be a floating-point tensor, got dtype={pixel_values.dtype}")
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the model expects "
                f"num_channels={self.config.num_channels} (pixel_values shape {tuple(pixel_values.shape)})"
            )
        if pixel_values.shape[0] == 0 or pixel_values.shape[2] == 0 or pixel_values.shape[3] == 0:
            raise ValueError(f"pixel_values must not be empty, got shape {tuple(pixel_values.shape)}")

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_exit_logits: bool | None = None,
        stopping_rule: str | None = None,
        stopping_params: dict | None = None,
        exit_gradient: str | float = DEFAULT_EXIT_GRADIENT,
        depth_loss_spec: DepthLossSpec | None = None,
        return_dict: bool | None = None,
    ) -> DepthStopImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): as in
                [`ResNetForImageClassification`]; any height and width.
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class indices.
            output_exit_logits (`bool`, *optional*): force the training path (all exits) in eval mode.
            stopping_rule (`str`, *optional*), stopping_params (`dict`, *optional*): override the configured rule
                for this call only.
            exit_gradient (`str`, defaults to `"detach"`): training path only. How non-final exits' losses reach the
                backbone: `full` (joint training), `detach` (exit heads train on frozen features: the backbone sees
                only the final exit's loss), `equilibrium` (gradient equilibrium: the gradient into the trunk at exit
                k is rescaled by 1 / (exits from k on)), or a number alpha in [0, 1]: the non-final exits' gradient
                into the backbone is scaled by alpha (heads learn at full strength). The residual ratio r_l of a
                non-final exit is treated as part of that exit (detached / scaled the same way).
            depth_loss_spec ([`DepthLossSpec`], *optional*): the training loss; defaults to `DepthLossSpec()`.
        """
        self._check_inputs(pixel_values)
        exit_gradient = parse_exit_gradient(exit_gradient)
        hidden = self.resnet.embedder(pixel_values)  # stem: (batch, embedding_size, H / 4, W / 4)
        fractions, single = self._exit_fractions({"pixel_values": pixel_values})  # (batch, num_exits) each
        if self.training or output_exit_logits:
            out = self._forward_all_exits(hidden, labels, exit_gradient, depth_loss_spec, fractions)
        else:
            out = self._forward_with_stopping(hidden, labels, stopping_rule, stopping_params, fractions, single)
        return out if return_dict is not False else out.to_tuple()

    def _forward_all_exits(self, hidden, labels, exit_gradient, depth_loss_spec, fractions):
        """Training path: every block and every exit head on every image."""
        config = self.config
        exit_layers = config.exit_layers
        num_exits = len(exit_layers)
        exit_logits, ratios, norms = [], [], []
        k = 0
        for block_index, block in enumerate(self._blocks()):
            hidden, residual, shortcut = self._block_branches(block, hidden)  # (batch, C, H, W) each
            if block_index != exit_layers[k]:
                continue
            features = hidden
            if k < num_exits - 1:
                if exit_gradient == "detach":
                    features, residual, shortcut = hidden.detach(), residual.detach(), shortcut.detach()
                elif isinstance(exit_gradient, float):
                    features, residual, shortcut = (
                        ScaleGradient.apply(t, exit_gradient) for t in (hidden, residual, shortcut)
                    )
                elif exit_gradient == "equilibrium":
                    # gradient equilibrium: the k-th exit and the trunk after it share the gradient into block k
                    share = 1.0 / (num_exits - k)
                    features, residual, shortcut = (
                        ScaleGradient.apply(t, share) for t in (hidden, residual, shortcut)
                    )
                    hidden = ScaleGradient.apply(hidden, 1.0 - share)
            ratios.append(self._residual_ratio(residual, shortcut))  # (batch,)
            pooled = self._pool(k, features)
            norms.append(pooled.detach().norm(dim=-1))
            exit_logits.append(self._head(k, pooled))
            k += 1
        exit_logits = torch.stack(exit_logits, dim=1)  # (batch, num_exits, num_labels)
        ratios = torch.stack(ratios, dim=1)  # (batch, num_exits)
        loss = None
        if labels is not None:
            loss, _ = depth_stop_loss(
                exit_logits,
                labels,
                depth_loss_spec or DepthLossSpec(),
                fractions,
                ratios,
                exit_layers,
                config.num_hidden_layers,
            )
        batch = exit_logits.shape[0]
        return DepthStopImageClassifierOutput(
            loss=loss,
            logits=exit_logits[:, -1],
            exit_logits=exit_logits,
            exit_residual_ratios=ratios,
            exit_compute_fractions=fractions,
            exit_state_norms=torch.stack(norms, dim=1),
            exit_layer=torch.full((batch,), exit_layers[-1], dtype=torch.long, device=exit_logits.device),
            compute_fraction=fractions[:, -1],
        )

    def _forward_with_stopping(self, hidden, labels, stopping_rule, stopping_params, fractions, single):
        """Inference path: after each evaluated exit, the images that stop leave the batch."""
        config = self.config
        exit_layers = config.exit_layers
        num_exits = len(exit_layers)
        name = stopping_rule if stopping_rule is not None else config.stopping_rule
        if stopping_rule is not None or stopping_params is not None:
            params = validate_rule(name, dict(stopping_params or {}), exit_layers, config.calibration)
        else:
            params = config.stopping_params
        rule = self._rule(name, params)
        temperatures = self._exit_temperatures()

        batch, device = hidden.shape[0], hidden.device
        out_logits = hidden.new_zeros(batch, config.num_labels)
        out_layer = torch.full((batch,), exit_layers[-1], dtype=torch.long, device=device)
        out_position = torch.full((batch,), num_exits - 1, dtype=torch.long, device=device)  # exit position used

        # Exits whose heads run: all of them for rules that look at every exit; for `none` / `static` only the one
        # exit every image stops at (no other head is worth its FLOPs).
        if rule.needs_all_heads:
            evaluated = set(range(num_exits))
        elif name == "static":
            evaluated = {next(k for k, layer in enumerate(exit_layers) if layer >= params["layer"])}
        else:
            evaluated = {num_exits - 1}
        last_evaluated = max(evaluated)
        exit_position = {layer: k for k, layer in enumerate(exit_layers)}
        next_fraction = fractions.diff(dim=1)  # compute from each exit to the next: (batch, num_exits - 1)

        active = torch.arange(batch, device=device)  # original row of each running image
        obs = None
        for block_index, block in enumerate(self._blocks()):
            k = exit_position.get(block_index)
            evaluate = k is not None and k in evaluated
            if evaluate and rule.needs_residuals:
                hidden, residual, shortcut = self._block_branches(block, hidden)
            else:
                hidden = block(hidden)  # the stock block's own forward
            if not evaluate:
                continue
            pooled = self._pool(k, hidden)
            logits = self._head(k, pooled)  # (active, num_labels)
            if k == last_evaluated:
                stop = torch.ones(logits.shape[0], dtype=torch.bool, device=device)
            else:
                next_f = next_fraction[:, k]
                if rule.needs_residuals:
                    ratio, norm = self._residual_ratio(residual, shortcut), pooled.norm(dim=-1)
                else:  # the rule never reads them
                    ratio = norm = torch.ones_like(next_f)
                obs = observe(k, block_index, logits, temperatures[k], obs, ratio, norm, next_f)
                stop = rule(obs)
            rows = active[stop]
            out_logits[rows] = logits[stop].to(out_logits.dtype)
            out_layer[rows] = block_index
            out_position[rows] = k
            if bool(stop.all()):
                break
            keep = ~stop
            if not bool(keep.all()):
                active, hidden, next_fraction = active[keep], hidden[keep], next_fraction[keep]
                obs = obs.select(keep)

        # FLOPs used per image: stem, the blocks it ran, the head it stopped at, and (rules that look at every exit)
        # the heads of the earlier exits.
        table = fractions if rule.needs_all_heads else single  # (batch, num_exits)
        compute_fraction = table.gather(1, out_position[:, None]).squeeze(1)
        loss = F.cross_entropy(out_logits, labels) if labels is not None else None
        return DepthStopImageClassifierOutput(
            loss=loss,
            logits=out_logits,
            exit_layer=out_layer,
            compute_fraction=compute_fraction,
        )


__all__ = ["DepthStopResNetExitHead", "DepthStopResNetForImageClassification"]
