# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Early-exit GPT-2 causal LM.

Holds a stock [`GPT2Model`] as `transformer` and the (tied) LM head as `lm_head`, as [`GPT2LMHeadModel`] does, so every
GPT-2 checkpoint loads with `from_pretrained`; every exit reads the shared `ln_f` + LM head. GPT-2-specific here: the
layer loop of the training path, one block on the running rows of a decoding step, and the K/V fill of skipped
blocks (`ln_1`, then the K and V thirds of `c_attn`; positions are learned and enter through the embedding, so there
is no rotary step). The rest is in [`hf_depthstop.generation`].
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, GPT2Model, GPT2PreTrainedModel
from transformers.masking_utils import create_causal_mask
from transformers.utils import logging

from ...generation import DepthStopCausalLMMixin
from ...hub import DepthStopHubMixin
from ...losses import DEFAULT_EXIT_GRADIENT, DepthLossSpec
from ...modeling_outputs import DepthStopCausalLMOutputWithPast
from ...peft_utils import DepthStopPeftMixin
from .configuration_depthstop_gpt2 import DepthStopGPT2Config


logger = logging.get_logger(__name__)


class DepthStopGPT2LMHeadModel(
    DepthStopHubMixin, DepthStopPeftMixin, DepthStopCausalLMMixin, GPT2PreTrainedModel, GenerationMixin
):
    r"""
    GPT-2 with an exit after each block in `config.exit_layers` (shared `ln_f` + LM head) and per-token early exits in
    `generate`. Same paths and arguments as [`DepthStopLlamaForCausalLM`].

    Example:

    ```python
    >>> model = DepthStopGPT2LMHeadModel.from_pretrained(path)
    >>> model.set_stopping_rule("entropy", threshold=1.0)
    >>> model.generate(input_ids, max_new_tokens=16, depthstop_mode="lossless")
    ```
    """

    config_class = DepthStopGPT2Config
    config: DepthStopGPT2Config
    base_model_prefix = "transformer"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _exit_head_modules = ("exit_adapters",)  # saved with a PEFT adapter when config.exit_adapter is set
    accepts_loss_kwargs = False

    def __init__(self, config: DepthStopGPT2Config):
        config.validate_exits()
        super().__init__(config)
        self.transformer = GPT2Model(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
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
        token_type_ids: torch.LongTensor | None = None,
        **kwargs,
    ) -> DepthStopCausalLMOutputWithPast:
        r"""
        Args: as [`DepthStopLlamaForCausalLM.forward`] (`input_ids` `(batch_size, seq_len)`, `labels` shifted inside,
        -100 ignored). `token_type_ids` is not supported with exits (GPT-2 checkpoints do not use it).
        """
        if token_type_ids is not None:
            raise ValueError("DepthStopGPT2LMHeadModel does not support token_type_ids, got a tensor")
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
    def _ds_backbone(self) -> GPT2Model:
        return self.transformer

    def _ds_layers(self) -> nn.ModuleList:
        return self.transformer.h

    def _ds_norm(self) -> nn.Module:
        return self.transformer.ln_f

    def _ds_flops(self) -> tuple[float, float]:
        c = self.config
        inner = c.n_inner if c.n_inner is not None else 4 * c.n_embd
        return 2.0 * (4 * c.n_embd * c.n_embd + 2 * c.n_embd * inner), 2.0 * c.n_embd * c.vocab_size

    def _ds_embed(self, input_ids, inputs_embeds, position_ids) -> torch.Tensor:
        embeds = inputs_embeds if inputs_embeds is not None else self.transformer.wte(input_ids)
        return self.transformer.drop(embeds + self.transformer.wpe(position_ids).to(embeds.device))

    def _ds_full_context(self, hidden, attention_mask, position_ids) -> dict:
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None,
            position_ids=position_ids,
        )
        return {"attention_mask": mask, "position_ids": position_ids}

    def _ds_run_layer(self, layer, hidden, context) -> torch.Tensor:
        return layer(hidden, None, context["attention_mask"], position_ids=context["position_ids"])

    def _ds_decode_context(self, hidden, position_ids):
        return None

    def _ds_decode_layer(self, index, hidden, active, source, context, cache, mask) -> torch.Tensor:
        """Block `index` (0-based) on the running rows of a decoding step; arguments as in the Llama model."""
        block = self.transformer.h[index]
        attn = block.attn
        x = hidden if active is None else source.index_copy(0, active, hidden)
        batch, running = x.shape[0], hidden.shape[0]
        query, key, value = attn.c_attn(block.ln_1(x)).split(attn.split_size, dim=2)
        key = key.view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        value = value.view(batch, 1, -1, attn.head_dim).transpose(1, 2)
        keys, values = cache.update(key, value, index)
        if active is not None:
            query, keys, values = query[active], keys[active], values[active]
            mask = mask[active] if mask is not None else None
        query = query.view(running, 1, -1, attn.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=attn.scaling)
        out = attn.c_proj(out.transpose(1, 2).reshape(running, 1, -1))
        hidden = hidden + out
        return hidden + block.mlp(block.ln_2(hidden))

    def _ds_fill_weights(self) -> tuple:
        """Every block's K/V part of `c_attn` with `ln_1` folded in: weights `(num_layers, hidden, 2 hidden)`, biases
        `(num_layers, 1, 2 hidden)` (LayerNorm: K = ((h - mu) / sigma) (g * W_k) + (b W_k + b_k))."""
        weights, biases = [], []
        d = self.config.n_embd
        for block in self.transformer.h:
            w, b = block.attn.c_attn.weight[:, d:], block.attn.c_attn.bias[d:]  # Conv1D: (in, out)
            weights.append(block.ln_1.weight[:, None] * w)
            biases.append((block.ln_1.bias @ w + b)[None])
        return torch.stack(weights).detach(), torch.stack(biases).detach()

    def _ds_fill(self, first, source, context, cache, fill) -> None:
        """Fill blocks `first .. n_layer - 1` (0-based) of the cache from `source` `(batch, 1, hidden)`."""
        num_layers = self.config.num_hidden_layers
        if first >= num_layers:
            return
        weights, biases = fill
        eps = self.transformer.h[first].ln_1.eps
        x = source[:, 0]
        x = F.layer_norm(x, x.shape[-1:], eps=eps)  # (batch, hidden), gain and bias folded into the weights
        kv = torch.matmul(x, weights[first:]) + biases[first:]  # (layers, batch, 2 hidden)
        head_dim = self.transformer.h[0].attn.head_dim
        key, value = kv.view(kv.shape[0], kv.shape[1], 2, -1, head_dim).unbind(2)
        for j in range(kv.shape[0]):
            cache.update(key[j].unsqueeze(2), value[j].unsqueeze(2), first + j)


__all__ = ["DepthStopGPT2LMHeadModel"]
