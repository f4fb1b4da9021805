# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Early-exit ViT for image classification.

The model holds a stock [`ViTModel`] as `vit` and the stock final `classifier`, so every ViT checkpoint (current
`vit.layers.*` keys, or legacy `vit.encoder.layer.*` keys, which transformers renames on load) loads with
`from_pretrained` and only the exit heads are new. The layer loop with exits is written out below, twice: the
training path (every layer, every exit head, every image) and the inference path (images that stop leave the batch,
so the remaining layers run on fewer images: real compute savings, not masking).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import ViTModel, ViTPreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging

from ...flops import patch_embedding_flops, transformer_layer_flops
from ...hub import DepthStopHubMixin
from ...losses import DEFAULT_EXIT_GRADIENT, DepthLossSpec, ScaleGradient, depth_stop_loss, parse_exit_gradient
from ...modeling_common import DepthStopClassifierMixin
from ...modeling_outputs import DepthStopImageClassifierOutput
from ...peft_utils import DepthStopPeftMixin
from ...stopping import observe, validate_rule
from .configuration_depthstop_vit import DepthStopViTConfig, _pair


logger = logging.get_logger(__name__)


class DepthStopViTExitHead(nn.Module):
    """A non-final exit: layernormed [CLS] state (batch_size, hidden_size) -> [dense -> tanh] -> dropout -> linear ->
    (batch_size, num_labels). The dense layer exists when `config.exit_head_hidden_size > 0`; the dropout rate is
    `config.hidden_dropout_prob` (0 by default, as ViT)."""

    def __init__(self, config: DepthStopViTConfig):
        super().__init__()
        hidden = config.exit_head_hidden_size
        self.dense = nn.Linear(config.hidden_size, hidden) if hidden else None
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(hidden or config.hidden_size, config.num_labels)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.dense is not None:
            pooled = torch.tanh(self.dense(pooled))
        return self.classifier(self.dropout(pooled))

    def lipschitz(self) -> float:
        """An upper bound of the head's Lipschitz constant (spectral norms; tanh is 1-Lipschitz)."""
        bound = torch.linalg.matrix_norm(self.classifier.weight.float(), ord=2).item()
        if self.dense is not None:
            bound *= torch.linalg.matrix_norm(self.dense.weight.float(), ord=2).item()
        return bound


class DepthStopViTForImageClassification(
    DepthStopHubMixin, DepthStopPeftMixin, DepthStopClassifierMixin, ViTPreTrainedModel
):

    r"""
    ViT with an exit head after each layer in `config.exit_layers` and a stopping rule run inside `forward()`.

    Modules: `vit` (stock [`ViTModel`] without pooler, as in [`ViTForImageClassification`]), `exit_heads` (one
    [`DepthStopViTExitHead`] per non-final exit, in `exit_layers` order), and the final exit `classifier`, named as in
    [`ViTForImageClassification`] so its fine-tuned checkpoints load completely. Every exit reads the [CLS] token
    through the backbone's final `vit.layernorm` (shared), as the stock head does after the last layer.

    Statistics per exit at layer l (0-based), on the [CLS] token h_l[:, 0] (shape `(batch_size, hidden_size)`):
    - `exit_residual_ratios` r_l = ||h_l[:, 0] - h_{l-1}[:, 0]|| / ||h_{l-1}[:, 0]||, on the residual stream *before*
      the final layer norm (h_{-1} is the embedding output), so that h_l - h_{l-1} is exactly the block's residual
      update f_l(h_{l-1}) of the diminishing-returns theorem. A layer norm would rescale each state to a fixed norm
      and hide that decay.
    - `exit_state_norms` ||layernorm(h_l[:, 0])||: the norm of what the exit head reads, so that
      K * ||layernorm(h_l)|| * r_l approximates how far the next block can move that head's input (the layer norm
      is scale-invariant, so relative changes carry through it). `asti_bound` uses this product.

    Two paths:
    - **training path** (`model.training`, or `output_exit_logits=True`): all layers, all exits, all images. Returns
      `exit_logits` `(batch_size, num_exits, num_labels)`, the final exit's `logits`, and with `labels` the full loss
      (weighted exit cross-entropies + lambda * L_depth, see [`hf_depthstop.losses`]).
    - **inference path** (eval mode): the stopping rule decides per image after each exit; stopped images leave the
      batch. `logits` are those of the exit each image used; `exit_layer` (0-based layer index) and
      `compute_fraction` (FLOPs used / full-model FLOPs) are per image. An image's result does not depend on the
      other images of its batch. With rule `none` only the final head runs: the stock model's computation.

    Example:

    ```python
    >>> model = DepthStopViTForImageClassification.from_pretrained(path)  # e.g. a saved ViTForImageClassification
    >>> model.set_stopping_rule("confidence", threshold=0.9)
    >>> model.eval(); out = model(pixel_values); out.exit_layer, out.compute_fraction
    ```
    """

    _head_architecture = "ImageClassification"  # stock *ImageClassification checkpoints carry a head
    config_class = DepthStopViTConfig
    config: DepthStopViTConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    accepts_loss_kwargs = False  # the loss is computed here; Trainer must not inject num_items_in_batch
    _can_compile_fullgraph = False  # the inference path's batch shrinks with data-dependent stops

    def __init__(self, config: DepthStopViTConfig):
        config.validate_exits()
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.exit_heads = nn.ModuleList([DepthStopViTExitHead(config) for _ in config.exit_layers[:-1]])
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------
    # Lipschitz constants of the heads (asti_bound); loading and the rule: DepthStopClassifierMixin
    # ----------------------------------------------------------------------------------------------------------
    def _exit_lipschitz(self) -> list[float]:
        """K_k for `asti_bound`: spectral norm of the head of exit k + 1 (the head whose logits the next block moves),
        from the layernormed state (the shared layer norm is accounted for by `exit_state_norms`, see the class
        docstring); 0 after the final exit."""
        norms = [head.lipschitz() for head in self.exit_heads]
        norms.append(torch.linalg.matrix_norm(self.classifier.weight.float(), ord=2).item())
        return norms[1:] + [0.0]

    # ----------------------------------------------------------------------------------------------------------
    # Pieces of the exit computation (inputs, layer norm, heads, FLOPs)
    # ----------------------------------------------------------------------------------------------------------
    def _check_inputs(self, pixel_values, interpolate_pos_encoding) -> int:
        """Validate `pixel_values` before any work; return the number of patches per image."""
        if pixel_values is None:
            raise ValueError("pixel_values is required: a tensor of shape (batch_size, num_channels, height, width)")
        if not isinstance(pixel_values, torch.Tensor):
            raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values must have shape (batch_size, num_channels, height, width), got {tuple(pixel_values.shape)}"
            )
        _, channels, height, width = pixel_values.shape
        if channels != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels (shape {tuple(pixel_values.shape)}) but the model expects "
                f"num_channels={self.config.num_channels}"
            )
        patch_h, patch_w = _pair(self.config.patch_size)
        if height % patch_h or width % patch_w:
            raise ValueError(
                f"pixel_values image size {height}x{width} is not divisible by patch_size={self.config.patch_size!r}"
            )
        image_h, image_w = _pair(self.config.image_size)
        if not interpolate_pos_encoding and (height, width) != (image_h, image_w):
            raise ValueError(
                f"pixel_values image size {height}x{width} does not match image_size={self.config.image_size!r}; "
                "resize the images or pass interpolate_pos_encoding=True"
            )
        return (height // patch_h) * (width // patch_w)

    def _exit_norm(self, cls_state: torch.Tensor, backbone_grad: str | float | None = None) -> torch.Tensor:
        """The shared final layer norm on the [CLS] state (batch, hidden) -> (batch, hidden).

        `backbone_grad` (training path, non-final exits): the layer norm belongs to the backbone, so its weights get
        the same treatment as the hidden state: `"detach"` (no gradient from this exit), a float alpha (gradient
        scaled by alpha), or `None` (full gradient)."""
        norm = self.vit.layernorm
        if backbone_grad is None:
            return norm(cls_state)
        weight, bias = norm.weight, norm.bias
        if backbone_grad == "detach":
            weight, bias = weight.detach(), bias.detach()
        else:
            weight, bias = ScaleGradient.apply(weight, backbone_grad), ScaleGradient.apply(bias, backbone_grad)
        return F.layer_norm(cls_state, norm.normalized_shape, weight, bias, norm.eps)

    def _head(self, exit_index: int, pooled: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_labels) of exit position `exit_index` (0-based) from the layernormed [CLS] state."""
        if exit_index < len(self.exit_heads):
            return self.exit_heads[exit_index](pooled)
        return self.classifier(pooled)

    def _flops(self, num_patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image FLOPs (float64, shape (batch,)): the patch embedding, one layer, one non-final head, the final
        head. `num_patches` has shape (batch,); the sequence is num_patches + 1 tokens ([CLS])."""
        c = self.config
        patch_h, patch_w = _pair(c.patch_size)
        embed = patch_embedding_flops(num_patches, c.num_channels, patch_h * patch_w, c.hidden_size)
        layer = transformer_layer_flops(num_patches + 1, c.hidden_size, c.intermediate_size)
        width = c.exit_head_hidden_size
        head_cost = (
            2.0 * c.hidden_size * width + 2.0 * width * c.num_labels if width else 2.0 * c.hidden_size * c.num_labels
        )
        head = torch.full_like(layer, head_cost)
        final = torch.full_like(layer, 2.0 * c.hidden_size * c.num_labels)
        return embed, layer, head, final

    def _num_patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patches per image, shape (batch,), from the shape of `pixel_values` (batch, channels, height, width)."""
        batch, _, height, width = pixel_values.shape
        patch_h, patch_w = _pair(self.config.patch_size)
        return torch.full((batch,), (height // patch_h) * (width // patch_w), device=pixel_values.device)

    def _fractions(self, embed, layer, head, final) -> torch.Tensor:
        """C_k (batch, num_exits), float32, from per-image FLOPs (see `_flops`) when every head up to exit k runs."""
        full = embed + self.config.num_hidden_layers * layer + final
        fractions = []
        for k, layer_index in enumerate(self.config.exit_layers):
            heads = k * head + (final if k == len(self.exit_heads) else head)
            fractions.append((embed + (layer_index + 1) * layer + heads) / full)
        return torch.stack(fractions, dim=1).float()

    def exit_compute_fractions(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """C_k per image and exit when every head up to exit k runs: shape (batch, num_exits), float32.

        Only the shape of `pixel_values` (batch, channels, height, width) is read."""
        return self._fractions(*self._flops(self._num_patches(pixel_values)))

    def _exit_fractions(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute fractions per image and exit for the batch dict `inputs` (`{"pixel_values": (B, C, H, W)}`).

        Returns:
            `(all_heads, single_head)`, both float32 of shape `(batch, num_exits)`: C_k when every head up to exit k
            ran (what rules that read every exit pay), and C_k when only exit k's head ran (what `static` pays).
        """
        embed, layer, head, final = self._flops(self._num_patches(inputs["pixel_values"]))
        all_heads = self._fractions(embed, layer, head, final)
        full = embed + self.config.num_hidden_layers * layer + final
        earlier = (
            torch.arange(all_heads.shape[1], dtype=full.dtype, device=full.device)[None, :] * (head / full)[:, None]
        )
        return all_heads, (all_heads.double() - earlier).float()

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------
    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
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
                [`ViTForImageClassification`]; height and width must be `image_size` (or, with
                `interpolate_pos_encoding=True`, any multiple of `patch_size`).
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class indices.
            interpolate_pos_encoding (`bool`, *optional*): interpolate the position embeddings to the input size.
            output_exit_logits (`bool`, *optional*): force the training path (all exits) in eval mode.
            stopping_rule (`str`, *optional*), stopping_params (`dict`, *optional*): override the configured rule
                for this call only.
            exit_gradient (`str`, defaults to `"detach"`): training path only. How non-final exits' losses reach the
                backbone (the layers, the embeddings and the shared final layer norm): `full` (joint training),
                `detach` (exit heads train on frozen features: the backbone sees only the final exit's loss),
                `equilibrium` (gradient equilibrium: the gradient into the trunk at exit k is rescaled by
                1 / (exits from k on)), or a number alpha in [0, 1]: the non-final exits' gradient into the backbone
                is scaled by alpha (heads learn at full strength).
            depth_loss_spec ([`DepthLossSpec`], *optional*): the training loss; defaults to `DepthLossSpec()`.
        """
        num_patches = self._check_inputs(pixel_values, interpolate_pos_encoding)
        exit_gradient = parse_exit_gradient(exit_gradient)
        pixel_values = pixel_values.to(self.vit.embeddings.patch_embeddings.projection.weight.dtype)
        hidden = self.vit.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        if self.training or output_exit_logits:
            out = self._forward_all_exits(hidden, pixel_values, labels, exit_gradient, depth_loss_spec)
        else:
            out = self._forward_with_stopping(hidden, num_patches, labels, stopping_rule, stopping_params)
        return out if return_dict is not False else out.to_tuple()

    def _forward_all_exits(self, hidden, pixel_values, labels, exit_gradient, depth_loss_spec):
        """Training path: every layer and every exit head on every image."""
        config = self.config
        exit_layers = config.exit_layers
        num_exits = len(exit_layers)
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=None)
        exit_logits, ratios, norms = [], [], []
        k = 0
        for layer_index, layer in enumerate(self.vit.layers):
            is_exit = layer_index == exit_layers[k]
            if is_exit:
                cls_prev = hidden[:, 0]  # h_{l-1}[:, 0], before the final layer norm
            hidden = layer(hidden, mask)  # (batch, seq, hidden)
            if not is_exit:
                continue
            branch, norm_grad = hidden, None
            if k < num_exits - 1:
                if exit_gradient == "detach":
                    branch, cls_prev, norm_grad = hidden.detach(), cls_prev.detach(), "detach"
                elif isinstance(exit_gradient, float):
                    branch = ScaleGradient.apply(hidden, exit_gradient)
                    cls_prev = ScaleGradient.apply(cls_prev, exit_gradient)
                    norm_grad = exit_gradient
                elif exit_gradient == "equilibrium":
                    # gradient equilibrium: the k-th exit and the trunk after it share the gradient into layer k
                    branch = ScaleGradient.apply(hidden, 1.0 / (num_exits - k))
                    hidden = ScaleGradient.apply(hidden, (num_exits - k - 1) / (num_exits - k))
            cls_state = branch[:, 0]  # (batch, hidden)
            ratios.append((cls_state - cls_prev).norm(dim=-1) / cls_prev.norm(dim=-1).clamp_min(1e-6))  # (batch,)
            pooled = self._exit_norm(cls_state, norm_grad)
            norms.append(pooled.detach().norm(dim=-1))
            exit_logits.append(self._head(k, pooled))
            k += 1
        exit_logits = torch.stack(exit_logits, dim=1)  # (batch, num_exits, num_labels)
        ratios = torch.stack(ratios, dim=1)  # (batch, num_exits)
        fractions = self.exit_compute_fractions(pixel_values)  # (batch, num_exits)
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

    def _forward_with_stopping(self, hidden, num_patches, labels, stopping_rule, stopping_params):
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
        patches = torch.full((batch,), num_patches, device=device)  # every image of a batch has the same size
        embed_f, layer_f, head_f, final_f = self._flops(patches)  # (batch,) each, float64
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

        if rule.needs_all_heads:  # compute fraction from each exit to the next, per image: (batch, num_exits - 1)
            # as `exit_compute_fractions` computes it (what calibration records)
            next_fraction = self._fractions(embed_f, layer_f, head_f, final_f).diff(dim=1)
        active = torch.arange(batch, device=device)  # original row of each running image
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=None)
        obs = None
        for layer_index, layer in enumerate(self.vit.layers):
            k = exit_position.get(layer_index)
            evaluate = k is not None and k in evaluated
            if evaluate and rule.needs_residuals:
                cls_prev = hidden[:, 0]
            hidden = layer(hidden, mask)
            if not evaluate:
                continue
            cls_state = hidden[:, 0]
            pooled = self.vit.layernorm(cls_state)  # (active, hidden)
            logits = self._head(k, pooled)  # (active, num_labels)
            if k == last_evaluated:
                stop = torch.ones(logits.shape[0], dtype=torch.bool, device=device)
            else:
                next_f = next_fraction[:, k]
                if rule.needs_residuals:
                    ratio = (cls_state - cls_prev).norm(dim=-1) / cls_prev.norm(dim=-1).clamp_min(1e-6)
                    norm = pooled.norm(dim=-1)
                else:  # the rule never reads them
                    ratio = norm = torch.ones_like(next_f)
                obs = observe(k, layer_index, logits, temperatures[k], obs, ratio, norm, next_f)
                stop = rule(obs)
            rows = active[stop]
            out_logits[rows] = logits[stop].to(out_logits.dtype)
            out_layer[rows] = layer_index
            out_position[rows] = k
            if bool(stop.all()):
                break
            keep = ~stop
            if not bool(keep.all()):  # stopped images leave the batch
                active, hidden = active[keep], hidden[keep]
                obs, next_fraction = obs.select(keep), next_fraction[keep]
                if mask is not None:
                    mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=None)

        # FLOPs used per image: the embedding, the layers it ran, the head it stopped at, and (rules that look at every
        # exit) the heads of the earlier exits.
        at_final = out_position == num_exits - 1
        used_f = embed_f + (out_layer + 1) * layer_f + torch.where(at_final, final_f, head_f)
        if rule.needs_all_heads:
            used_f = used_f + out_position * head_f
        full_f = embed_f + config.num_hidden_layers * layer_f + final_f
        loss = F.cross_entropy(out_logits, labels) if labels is not None else None
        return DepthStopImageClassifierOutput(
            loss=loss,
            logits=out_logits,
            exit_layer=out_layer,
            compute_fraction=(used_f / full_f).float(),
        )


__all__ = ["DepthStopViTExitHead", "DepthStopViTForImageClassification"]
