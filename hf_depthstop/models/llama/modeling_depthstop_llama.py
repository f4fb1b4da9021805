# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Early-exit Llama-family causal LM (Llama, SmolLM2, TinyLlama, ...).

Holds a stock [`LlamaModel`] as `model` and the LM head as `lm_head`, as [`LlamaForCausalLM`] does, so every
Llama-architecture checkpoint loads with `from_pretrained` and no weight is new: every exit reads the shared final norm
+ LM head. What is Llama-specific is written out here: the layer loop of the training path, one decoder layer on the
running rows of a decoding step, and the K/V fill of skipped layers (input RMSNorm + k_proj / v_proj + rotary
embedding at the token's position). The rest (loss, decoding loop, `generate`, lossless mode) is in
[`hf_depthstop.generation`].
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, LlamaModel, LlamaPreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import rotate_half
from transformers.utils import logging

from ...generation import DepthStopCausalLMMixin
from ...hub import DepthStopHubMixin
from ...losses import DEFAULT_EXIT_GRADIENT, DepthLossSpec
from ...modeling_outputs import DepthStopCausalLMOutputWithPast
from ...peft_utils import DepthStopPeftMixin
from .configuration_depthstop_llama import DepthStopLlamaConfig


logger = logging.get_logger(__name__)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of `x` `(batch, heads, 1, head_dim)` with `cos`, `sin` `(batch, 1, head_dim)`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class DepthStopLlamaForCausalLM(
    DepthStopHubMixin, DepthStopPeftMixin, DepthStopCausalLMMixin, LlamaPreTrainedModel, GenerationMixin
):
    r"""
    Llama causal LM with an exit after each layer in `config.exit_layers` (shared final norm + LM head) and per-token
    early exits in `generate`.

    - **training path** (`model.training` or `output_exit_logits=True`): all layers and exits on every token. With
      `labels` the loss sum_k w_k CE_k + lambda * L_depth is computed inside, exit by exit ([`DepthLossSpec`]).
    - **inference forward**: full depth, equal to [`LlamaForCausalLM`] (per-token exits need K/V filling, which
      happens in `generate`).
    - **generate**: see [`DepthStopCausalLMMixin.generate`] (`depthstop_mode="early_exit"` or `"lossless"`).

    Example:

    ```python
    >>> model = DepthStopLlamaForCausalLM.from_pretrained(path, exit_layers=[7, 15, 23])
    >>> model.set_stopping_rule("confidence", threshold=0.9)
    >>> out = model.generate(**tok(prompts, return_tensors="pt", padding=True), max_new_tokens=32,
    ...                      return_dict_in_generate=True)
    >>> out.exit_layers  # (batch, new tokens), 0-based
    ```
    """

    config_class = DepthStopLlamaConfig
    config: DepthStopLlamaConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _exit_head_modules = ("exit_adapters",)  # saved with a PEFT adapter when config.exit_adapter is set
    accepts_loss_kwargs = False  # the loss is computed here; Trainer must not inject num_items_in_batch

    def __init__(self, config: DepthStopLlamaConfig):
        config.validate_exits()
        super().__init__(config)
        self.model = LlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._ds_init_exit_heads()
        self._ds_state = None
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_exit_logits: bool | None = None,
        exit_gradient: str | float = DEFAULT_EXIT_GRADIENT,
        depth_loss_spec: DepthLossSpec | None = None,
        stopping_rule: str | None = None,
        stopping_params: dict | None = None,
        cache=None,
        **kwargs,
    ) -> DepthStopCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, seq_len)`), attention_mask (`(batch_size,
                past + seq_len)`), position_ids, inputs_embeds, use_cache, logits_to_keep: as [`LlamaForCausalLM`].
            past_key_values / cache ([`Cache`], *optional*): the key/value cache (`cache` is transformers 5's name).
            labels (`torch.LongTensor` of shape `(batch_size, seq_len)`, *optional*): next-token targets, shifted
                inside; -100 is ignored.
            output_exit_logits (`bool`, *optional*): force the training path in eval mode; without `labels` the
                output then has `exit_logits` `(batch_size, seq_len, num_exits, vocab_size)` (short inputs only).
            exit_gradient (`str` or `float`, defaults to `"detach"`): how non-final exits' losses reach the backbone:
                `full`, `detach`, `equilibrium`, or alpha in [0, 1] (see the BERT model). The shared final norm and
                LM head always receive every exit's gradient.
            depth_loss_spec ([`DepthLossSpec`], *optional*): the training loss; defaults to `DepthLossSpec()`.
            stopping_rule, stopping_params: accepted for symmetry with `generate`; a plain forward runs full depth.
        """
        return self._depthstop_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds, labels=labels,
            use_cache=use_cache, logits_to_keep=logits_to_keep, output_exit_logits=output_exit_logits,
            exit_gradient=exit_gradient, depth_loss_spec=depth_loss_spec, stopping_rule=stopping_rule,
            stopping_params=stopping_params, **kwargs,
        )

    # ----------------------------------------------------------------------------------------------------------
    # Architecture pieces used by the shared machinery
    # ----------------------------------------------------------------------------------------------------------
    def _ds_backbone(self) -> LlamaModel:
        return self.model

    def _ds_layers(self) -> nn.ModuleList:
        return self.model.layers

    def _ds_norm(self) -> nn.Module:
        return self.model.norm

    def _ds_flops(self) -> tuple[float, float]:
        """Per-token FLOPs (2 per multiply-add) of one decoder layer's projections + MLP, and of the LM head."""
        c = self.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        attn = c.hidden_size * head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
        mlp = 3 * c.hidden_size * c.intermediate_size
        return 2.0 * (attn + mlp), 2.0 * c.hidden_size * c.vocab_size

    def _ds_embed(self, input_ids, inputs_embeds, position_ids) -> torch.Tensor:
        return inputs_embeds if inputs_embeds is not None else self.model.embed_tokens(input_ids)

    def _ds_full_context(self, hidden, attention_mask, position_ids) -> dict:
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
            position_ids=position_ids,
        )
        return {
            "attention_mask": mask,
            "position_embeddings": self.model.rotary_emb(hidden, position_ids=position_ids),
            "position_ids": position_ids,
        }

    def _ds_run_layer(self, layer, hidden, context) -> torch.Tensor:
        return layer(hidden, **context)

    def _ds_decode_context(self, hidden, position_ids) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.rotary_emb(hidden, position_ids=position_ids)  # cos, sin: (batch, 1, head_dim)

    def _ds_decode_layer(self, index, hidden, active, source, context, cache, mask) -> torch.Tensor:
        """Decoder layer `index` (0-based) on the running rows of a decoding step.

        Args:
            hidden (`torch.Tensor` of shape `(running, 1, hidden_size)`): the running rows' states.
            active (`torch.LongTensor` of shape `(running,)` or `None`): their rows in the batch (`None`: all rows).
            source (`torch.Tensor` of shape `(batch_size, 1, hidden_size)` or `None`): every row's K/V source; rows
                that stopped hold their exited state (their keys/values for this layer are filled from it).
            context: `(cos, sin)` of the batch; cache: the [`DynamicCache`]; mask (`(batch_size, 1, 1, keys)` bool).

        Returns:
            `torch.Tensor` of shape `(running, 1, hidden_size)`.
        """
        layer = self.model.layers[index]
        attn = layer.self_attn
        x = hidden if active is None else source.index_copy(0, active, hidden)
        normed = layer.input_layernorm(x)  # (batch, 1, hidden)
        batch, running = x.shape[0], hidden.shape[0]
        cos, sin = context
        key = attn.k_proj(normed).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        value = attn.v_proj(normed).view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        key = _rotate(key, cos, sin)
        keys, values = cache.update(key, value, index)  # every row's entry: running or filled
        q_in = normed if active is None else normed[active]
        query = attn.q_proj(q_in).view(running, 1, -1, attn.head_dim).transpose(1, 2)
        if active is None:
            query = _rotate(query, cos, sin)
        else:
            query = _rotate(query, cos[active], sin[active])
            keys, values = keys[active], values[active]
            mask = mask[active] if mask is not None else None
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, scale=attn.scaling,
            enable_gqa=query.shape[1] != keys.shape[1],
        )
        out = attn.o_proj(out.transpose(1, 2).reshape(running, 1, -1))
        hidden = hidden + out
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    def _ds_fill_weights(self) -> tuple:
        """Every layer's K/V projection with its input RMSNorm gain folded in, stacked: `(num_layers, hidden, 2 *
        kv_dim)` and the biases `(num_layers, 1, 2 * kv_dim)` (or `None`), so filling all skipped layers of a row is
        one batched matmul."""
        weights, biases = [], []
        for layer in self.model.layers:
            attn, gain = layer.self_attn, layer.input_layernorm.weight
            w = torch.cat([attn.k_proj.weight, attn.v_proj.weight], 0) * gain[None, :]  # (2 kv, hidden)
            weights.append(w.t())
            if attn.k_proj.bias is not None:
                biases.append(torch.cat([attn.k_proj.bias, attn.v_proj.bias])[None])
        return torch.stack(weights).detach(), (torch.stack(biases).detach() if biases else None)

    def _ds_fill(self, first, source, context, cache, fill) -> None:
        """Fill layers `first .. num_layers - 1` (0-based) of the cache from `source` `(batch, 1, hidden)`:
        K_j = rotary(k_proj_j(input_layernorm_j(h))), V_j = v_proj_j(input_layernorm_j(h))."""
        num_layers = self.config.num_hidden_layers
        if first >= num_layers:
            return
        weights, biases = fill
        norm = self.model.layers[first].input_layernorm
        x = source[:, 0].float()
        x = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).to(source.dtype)
        kv = torch.matmul(x, weights[first:])  # (layers, batch, 2 kv)
        if biases is not None:
            kv = kv + biases[first:]
        head_dim = self.model.layers[0].self_attn.head_dim
        key, value = kv.view(kv.shape[0], kv.shape[1], 2, -1, head_dim).unbind(2)  # (layers, batch, kv heads, d)
        cos, sin = context  # (batch, 1, head_dim): broadcast over layers and heads
        key = key * cos + rotate_half(key) * sin
        for j in range(kv.shape[0]):
            cache.update(key[j].unsqueeze(2), value[j].unsqueeze(2), first + j)


__all__ = ["DepthStopLlamaForCausalLM"]
