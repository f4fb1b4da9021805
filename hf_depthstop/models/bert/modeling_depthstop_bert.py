# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Early-exit BERT for sequence classification.

The model holds a stock [`BertModel`] as `bert`, so every BERT checkpoint loads with `from_pretrained` and only the
exit heads are new. The layer loop with exits is written out below, twice: the training path (every layer, every
exit head, every row) and the inference path (rows that stop leave the batch, so the remaining layers run on fewer
rows and fewer padding columns: real compute savings, not masking).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, BertPreTrainedModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.utils import logging

from ...flops import classification_head_flops, transformer_layer_flops
from ...hub import DepthStopHubMixin
from ...losses import DEFAULT_EXIT_GRADIENT, DepthLossSpec, ScaleGradient, depth_stop_loss, parse_exit_gradient
from ...modeling_common import DepthStopClassifierMixin
from ...modeling_outputs import DepthStopSequenceClassifierOutput
from ...peft_utils import DepthStopPeftMixin
from ...stopping import observe, validate_rule
from .configuration_depthstop_bert import DepthStopBertConfig


logger = logging.get_logger(__name__)


class DepthStopExitHead(nn.Module):
    """A non-final exit: pooled state (batch_size, hidden_size) -> [dense -> tanh] -> dropout -> linear ->
    (batch_size, num_labels). The dense layer exists when `config.exit_head_hidden_size > 0`."""

    def __init__(self, config: DepthStopBertConfig):
        super().__init__()
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        hidden = config.exit_head_hidden_size
        self.dense = nn.Linear(config.hidden_size, hidden) if hidden else None
        self.dropout = nn.Dropout(dropout)
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


class DepthStopBertForSequenceClassification(
    DepthStopHubMixin, DepthStopPeftMixin, DepthStopClassifierMixin, BertPreTrainedModel
):

    r"""
    BERT with an exit head after each layer in `config.exit_layers` and a stopping rule run inside `forward()`.

    Modules: `bert` (stock [`BertModel`]; its `pooler` exists only with `exit_pooling="cls"`), `exit_heads` (one
    [`DepthStopExitHead`] per non-final exit, in `exit_layers` order), and the final exit `dropout` + `classifier`,
    named as in [`BertForSequenceClassification`] so its fine-tuned checkpoints load completely.

    Two paths:
    - **training path** (`model.training`, or `output_exit_logits=True`): all layers, all exits, all rows. Returns
      `exit_logits` `(batch_size, num_exits, num_labels)`, the final exit's `logits`, and with `labels` the full loss
      (weighted exit cross-entropies + lambda * L_depth, see [`hf_depthstop.losses`]).
    - **inference path** (eval mode): the stopping rule decides per example after each exit; stopped rows leave the
      batch. `logits` are those of the exit each example used; `exit_layer` (0-based layer index) and
      `compute_fraction` (FLOPs used / full-model FLOPs) are per example. A row's result does not depend on the
      other rows of its batch. With rule `none` only the final head runs: the stock model's computation.

    Example:

    ```python
    >>> model = DepthStopBertForSequenceClassification.from_pretrained(path, num_labels=3)
    >>> model.set_stopping_rule("confidence", threshold=0.9)
    >>> model.eval(); out = model(**batch); out.exit_layer, out.compute_fraction
    ```
    """

    _head_architecture = "SequenceClassification"  # stock *SequenceClassification checkpoints carry a head
    config_class = DepthStopBertConfig
    config: DepthStopBertConfig
    base_model_prefix = "bert"
    accepts_loss_kwargs = False  # the loss is computed here; Trainer must not inject num_items_in_batch
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: DepthStopBertConfig):
        config.validate_exits()
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=config.exit_pooling == "cls")
        self.exit_heads = nn.ModuleList([DepthStopExitHead(config) for _ in config.exit_layers[:-1]])
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    # ----------------------------------------------------------------------------------------------------------
    # Lipschitz constants of the heads (asti_bound); loading and the rule: DepthStopClassifierMixin
    # ----------------------------------------------------------------------------------------------------------
    def _exit_lipschitz(self) -> list[float]:
        """K_k for `asti_bound`: spectral norm of the head of exit k + 1 (the head whose logits the next block moves)."""
        norms = [head.lipschitz() for head in self.exit_heads]
        final = torch.linalg.matrix_norm(self.classifier.weight.float(), ord=2).item()
        if self.config.exit_pooling == "cls":  # dense + tanh (1-Lipschitz) before the classifier
            final *= torch.linalg.matrix_norm(self.bert.pooler.dense.weight.float(), ord=2).item()
        norms.append(final)
        return norms[1:] + [0.0]

    # ----------------------------------------------------------------------------------------------------------
    # Pieces of the exit computation (pooling, heads, FLOPs)
    # ----------------------------------------------------------------------------------------------------------
    def _pool_weights(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """(batch, seq) attention mask -> (batch, 1, seq) masked-mean weights; `None` for `cls` pooling."""
        if self.config.exit_pooling == "cls":
            return None
        m = mask.to(dtype)
        return (m / m.sum(-1, keepdim=True).clamp_min(1.0)).unsqueeze(1)

    def _pool(self, hidden: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, hidden): first token, or the masked mean (one batched matmul)."""
        if weights is None:
            return hidden[:, 0]
        return torch.bmm(weights, hidden).squeeze(1)

    def _head(self, exit_index: int, pooled: torch.Tensor) -> torch.Tensor:
        """Logits (batch, num_labels) of exit position `exit_index` (0-based) from the pooled state."""
        if exit_index < len(self.exit_heads):
            return self.exit_heads[exit_index](pooled)
        if self.config.exit_pooling == "cls":
            pooled = self.bert.pooler.activation(self.bert.pooler.dense(pooled))
        return self.classifier(self.dropout(pooled))

    def _flops(self, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-example FLOPs (float64, shape (batch,)): one layer, one non-final head, the final head."""
        c = self.config
        layer = transformer_layer_flops(lengths, c.hidden_size, c.intermediate_size)
        head = classification_head_flops(lengths, c.hidden_size, c.num_labels, c.exit_pooling, dense_pooler=False)
        if c.exit_head_hidden_size:  # dense d -> h, and the classifier reads h instead of d features
            head = head + 2.0 * c.hidden_size * c.exit_head_hidden_size + 2.0 * (c.exit_head_hidden_size - c.hidden_size) * c.num_labels
        final = classification_head_flops(
            lengths, c.hidden_size, c.num_labels, c.exit_pooling, dense_pooler=c.exit_pooling == "cls"
        )
        return layer, head, final

    def exit_compute_fractions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """C_k per example and exit when every head up to exit k runs: shape (batch, num_exits), float32."""
        layer, head, final = self._flops(attention_mask.sum(-1))
        full = self.config.num_hidden_layers * layer + final
        fractions = []
        for k, layer_index in enumerate(self.config.exit_layers):
            heads = k * head + (final if k == len(self.exit_heads) else head)
            fractions.append(((layer_index + 1) * layer + heads) / full)
        return torch.stack(fractions, dim=1).float()

    def _exit_fractions(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute fractions of a batch dict (`attention_mask` read): `(all_heads, single_head)`, each float32
        `(batch, num_exits)`: C_k when every head up to exit k ran (rules reading all exits), and when only exit k's
        head ran (`static`)."""
        mask = inputs["attention_mask"]
        all_heads = self.exit_compute_fractions(mask)
        layer, head, final = self._flops(mask.sum(-1))
        earlier = torch.arange(all_heads.shape[1], device=mask.device, dtype=torch.float64)[None, :] * head[:, None]
        single = all_heads.double() - earlier / (self.config.num_hidden_layers * layer + final)[:, None]
        return all_heads, single.float()

    def _check_inputs(self, input_ids, inputs_embeds, attention_mask):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        if len(shape) != 2:
            raise ValueError(f"input_ids must have shape (batch_size, seq_len), got {tuple(shape)}")
        if shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input length {shape[1]} exceeds the position table (max_position_embeddings="
                f"{self.config.max_position_embeddings}); truncate the inputs (tokenizer truncation=True)"
            )
        device = input_ids.device if input_ids is not None else inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(shape, dtype=torch.long, device=device)
        return attention_mask

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_exit_logits: bool | None = None,
        stopping_rule: str | None = None,
        stopping_params: dict | None = None,
        exit_gradient: str | float = DEFAULT_EXIT_GRADIENT,
        depth_loss_spec: DepthLossSpec | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
    ) -> DepthStopSequenceClassifierOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`), attention_mask, token_type_ids,
            position_ids, inputs_embeds: as in [`BertForSequenceClassification`]. Right padding is assumed when rows
                leave the batch (padding columns no remaining row needs are dropped).
            labels (`torch.LongTensor` of shape `(batch_size,)`, *optional*): class indices.
            output_exit_logits (`bool`, *optional*): force the training path (all exits) in eval mode.
            stopping_rule (`str`, *optional*), stopping_params (`dict`, *optional*): override the configured rule
                for this call only.
            exit_gradient (`str`, defaults to `"detach"`): training path only. How non-final exits' losses reach the
                backbone: `full` (joint training), `detach` (exit heads train on frozen features: the backbone sees
                only the final exit's loss, i.e. two-stage training run concurrently), `equilibrium` (gradient
                equilibrium: the gradient into the trunk at exit k is rescaled by 1 / (exits from k on)), or a number
                alpha in [0, 1]: the non-final exits' gradient into the backbone is scaled by alpha (heads learn at
                full strength).
            depth_loss_spec ([`DepthLossSpec`], *optional*): the training loss; defaults to `DepthLossSpec()`.
            output_attentions, output_hidden_states: accepted because PEFT's task wrappers always pass them; only
                `None` / `False` are supported (the exit loop does not collect them).
        """
        for name, value in (("output_attentions", output_attentions), ("output_hidden_states", output_hidden_states)):
            if value:
                raise ValueError(f"{name}={value!r} is not supported by {type(self).__name__}; leave it None")
        attention_mask = self._check_inputs(input_ids, inputs_embeds, attention_mask)
        exit_gradient = parse_exit_gradient(exit_gradient)
        hidden = self.bert.embeddings(
            input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids, inputs_embeds=inputs_embeds
        )
        if self.training or output_exit_logits:
            out = self._forward_all_exits(hidden, attention_mask, labels, exit_gradient, depth_loss_spec)
        else:
            out = self._forward_with_stopping(hidden, attention_mask, labels, stopping_rule, stopping_params)
        return out if return_dict is not False else out.to_tuple()

    def _forward_all_exits(self, hidden, attention_mask, labels, exit_gradient, depth_loss_spec):
        """Training path: every layer and every exit head on every row."""
        config = self.config
        exit_layers = config.exit_layers
        num_exits = len(exit_layers)
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
        weights = self._pool_weights(attention_mask, hidden.dtype)
        exit_logits, ratios, norms = [], [], []
        k = 0
        for layer_index, layer in enumerate(self.bert.encoder.layer):
            is_exit = layer_index == exit_layers[k]
            if is_exit:
                pooled_prev = self._pool(hidden, weights)
            hidden = layer(hidden, mask)  # (batch, seq, hidden)
            if not is_exit:
                continue
            branch = hidden
            if k < num_exits - 1:
                if exit_gradient == "detach":
                    branch, pooled_prev = hidden.detach(), pooled_prev.detach()
                elif isinstance(exit_gradient, float):
                    branch = ScaleGradient.apply(hidden, exit_gradient)
                    pooled_prev = ScaleGradient.apply(pooled_prev, exit_gradient)
                elif exit_gradient == "equilibrium":
                    # gradient equilibrium: the k-th exit and the trunk after it share the gradient into layer k
                    branch = ScaleGradient.apply(hidden, 1.0 / (num_exits - k))
                    hidden = ScaleGradient.apply(hidden, (num_exits - k - 1) / (num_exits - k))
            pooled = self._pool(branch, weights)
            ratios.append(
                (pooled - pooled_prev).norm(dim=-1) / pooled_prev.norm(dim=-1).clamp_min(1e-6)
            )  # (batch,)
            norms.append(pooled.detach().norm(dim=-1))
            exit_logits.append(self._head(k, pooled))
            k += 1
        exit_logits = torch.stack(exit_logits, dim=1)  # (batch, num_exits, num_labels)
        ratios = torch.stack(ratios, dim=1)  # (batch, num_exits)
        fractions = self.exit_compute_fractions(attention_mask)  # (batch, num_exits)
        loss = None
        if labels is not None:
            loss, _ = depth_stop_loss(
                exit_logits, labels, depth_loss_spec or DepthLossSpec(), fractions, ratios, exit_layers,
                config.num_hidden_layers,
            )
        batch = exit_logits.shape[0]
        return DepthStopSequenceClassifierOutput(
            loss=loss,
            logits=exit_logits[:, -1],
            exit_logits=exit_logits,
            exit_residual_ratios=ratios,
            exit_compute_fractions=fractions,
            exit_state_norms=torch.stack(norms, dim=1),
            exit_layer=torch.full((batch,), exit_layers[-1], dtype=torch.long, device=exit_logits.device),
            compute_fraction=fractions[:, -1],
        )

    def _forward_with_stopping(self, hidden, attention_mask, labels, stopping_rule, stopping_params):
        """Inference path: after each evaluated exit, the rows that stop leave the batch."""
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
        lengths = attention_mask.sum(-1)
        layer_f, head_f, final_f = self._flops(lengths)  # (batch,) each, float64
        out_logits = hidden.new_zeros(batch, config.num_labels)
        out_layer = torch.full((batch,), exit_layers[-1], dtype=torch.long, device=device)
        out_position = torch.full((batch,), num_exits - 1, dtype=torch.long, device=device)  # exit position used

        # Exits whose heads run: all of them for rules that look at every exit; for `none` / `static` only the one
        # exit every row stops at (no other head is worth its FLOPs).
        if rule.needs_all_heads:
            evaluated = set(range(num_exits))
        elif name == "static":
            evaluated = {next(k for k, layer in enumerate(exit_layers) if layer >= params["layer"])}
        else:
            evaluated = {num_exits - 1}
        last_evaluated = max(evaluated)
        exit_position = {layer: k for k, layer in enumerate(exit_layers)}

        if rule.needs_all_heads:  # compute fraction from each exit to the next, per row: (batch, num_exits - 1)
            next_fraction = self.exit_compute_fractions(attention_mask).diff(dim=1)  # as calibration computes it
        active = torch.arange(batch, device=device)  # original row of each running row
        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
        weights = self._pool_weights(attention_mask, hidden.dtype)
        obs = None
        last_pooled, last_pooled_layer = None, None  # pooled state of the last evaluated exit (reused as pool(h_{l-1}))
        for layer_index, layer in enumerate(self.bert.encoder.layer):
            k = exit_position.get(layer_index)
            evaluate = k is not None and k in evaluated
            if evaluate and rule.needs_residuals:
                reuse = last_pooled_layer == layer_index - 1
                pooled_prev = last_pooled if reuse else self._pool(hidden, weights)
            hidden = layer(hidden, mask)
            if not evaluate:
                continue
            pooled = self._pool(hidden, weights)
            last_pooled, last_pooled_layer = pooled, layer_index
            logits = self._head(k, pooled)  # (active, num_labels)
            if k == last_evaluated:
                stop = torch.ones(logits.shape[0], dtype=torch.bool, device=device)
            else:
                next_f = next_fraction[:, k]
                if rule.needs_residuals:
                    ratio = (pooled - pooled_prev).norm(dim=-1) / pooled_prev.norm(dim=-1).clamp_min(1e-6)
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
            if not bool(keep.all()):
                active, hidden, attention_mask = active[keep], hidden[keep], attention_mask[keep]
                obs, last_pooled, next_fraction = obs.select(keep), last_pooled[keep], next_fraction[keep]
                # drop padding columns no remaining row needs (right padding: a suffix), then rebuild the mask
                width = int(attention_mask.sum(-1).max())
                if width < attention_mask.shape[1] and bool(attention_mask[:, width:].eq(0).all()):
                    hidden, attention_mask = hidden[:, :width], attention_mask[:, :width]
                mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
                weights = self._pool_weights(attention_mask, hidden.dtype)

        # FLOPs used per row: the layers it ran, the head it stopped at, and (rules that look at every exit) the
        # heads of the earlier exits; counted once here rather than with per-layer bookkeeping on the hot path.
        at_final = out_position == num_exits - 1
        used_f = (out_layer + 1) * layer_f + torch.where(at_final, final_f, head_f)
        if rule.needs_all_heads:
            used_f = used_f + out_position * head_f
        full_f = config.num_hidden_layers * layer_f + final_f
        loss = F.cross_entropy(out_logits, labels) if labels is not None else None
        return DepthStopSequenceClassifierOutput(
            loss=loss,
            logits=out_logits,
            exit_layer=out_layer,
            compute_fraction=(used_f / full_f).float(),
        )


__all__ = ["DepthStopBertForSequenceClassification", "DepthStopExitHead"]
