# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Early exit for decoder LMs: the shared machinery of `DepthStopLlamaForCausalLM` and `DepthStopGPT2LMHeadModel`.

[`DepthStopCausalLMMixin`] holds what does not depend on the architecture: the training path's per-exit loss (computed
exit by exit, never materialising `(batch, seq, num_exits, vocab)`), the per-token decoding step with a stopping rule,
the integration with [`GenerationMixin.generate`] and the lossless self-speculative loop. Each model file supplies the
architecture-specific pieces (embedding, one decoder layer on the active rows of a decoding step, the K/V projections
used to fill skipped layers' cache entries).

**Per-token exits in `generate`.** Prefill runs at full depth: every prompt token's keys/values are needed by every
layer anyway (a later token attends to them there), and the prompt is processed in one batched pass, so exiting
early would save nothing and would degrade the cache. Each decoding step then runs the layers one by one; after each
evaluated exit the stopping rule decides per sequence, and sequences that stopped leave the step's batch. For every
layer a token skipped, its key/value entries are filled from its exited hidden state h_e through that layer's own
input norm and K/V projections (plus rotary embeddings at the token's position for Llama): K_j = k_proj_j(norm_j(h_e)),
V_j = v_proj_j(norm_j(h_e)) (state propagation, as in CALM). So after every step all layers' caches have the same
length and a later token can attend to this one at every layer.

**Lossless mode** (`depthstop_mode="lossless"`, greedy only): draft up to `num_draft_tokens` tokens with per-token
exits, verify them with one full-depth pass over the drafts, keep the longest agreeing prefix plus the verifier's own
next token, and crop every layer's cache back so that the draft-filled entries are replaced by the verifier's
full-depth ones. The output equals full-depth greedy decoding. With batch > 1 every row commits the length of the
shortest agreeing prefix in the batch (simple and exact; rows with longer agreement lose some speed).

Source of the stopping rules: "Optimal Depth of Neural Networks" (arXiv 2506.16862); the paper's full text was not
available to us, so the rules are this project's own derivation from its stated theorem.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers.cache_utils import DynamicCache
from transformers.utils import logging

from .configuration_common import validate_lm_exit_head_fields
from .losses import DEFAULT_EXIT_GRADIENT, DepthLossSpec, ScaleGradient, exit_loss_weights, parse_exit_gradient
from .modeling_outputs import DepthStopCausalLMOutputWithPast, DepthStopGenerateOutput
from .stopping import asti_features, build_rule, observe, validate_rule


logger = logging.get_logger(__name__)

DEPTHSTOP_MODES = ("early_exit", "lossless")
LM_CALIBRATED_RULES = ("static", "entropy", "confidence", "asti")


@dataclass
class _DecodeState:
    """What a decoding step with a stopping rule needs, prepared once per `generate` call."""

    name: str
    params: dict
    rule: object
    exit_position: dict  # 0-based layer -> 0-based exit position, for the exits whose head is evaluated
    temperatures: list
    next_compute: torch.Tensor  # (num_exits,) compute fraction from each exit to the next
    fill: tuple  # architecture-specific fused K/V weights for filling skipped layers
    exit_weight: torch.Tensor | None = None  # (len(exit_vocab), hidden): LM-head rows of the early exits' vocabulary
    exit_layers: list = field(default_factory=list)  # per decoding step: (batch,) 0-based exit layer


class ExitAdapter(nn.Linear):
    """Light adapter of one early exit of a decoder LM: `(..., hidden_size)` -> `h + h A^T + b`, same shape.

    Initialised to zero, so an untrained adapter leaves the shared head unchanged (`config.exit_adapter="affine"`)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + super().forward(hidden)


def exit_vocab_from_corpus(token_ids, size: int, always_include=()) -> list[int]:
    """The early exits' vocabulary (`config.exit_vocab`): the `size` most frequent token ids of a corpus.

    Args:
        token_ids (`torch.Tensor`, `np.ndarray` or nested lists of ints): training text, any shape (e.g. the
            `input_ids` of the training blocks). Never build it from evaluation text.
        size (`int`): how many ids to keep (ties broken towards the smaller id); fewer when the corpus has fewer
            distinct tokens.
        always_include (iterable of `int`): ids added whatever their frequency (e.g. the EOS token).

    Returns:
        `list[int]`, sorted.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got size={size!r}")
    ids = np.asarray(token_ids.cpu() if isinstance(token_ids, torch.Tensor) else token_ids, dtype=np.int64).ravel()
    if ids.size == 0:
        raise ValueError("token_ids is empty: the exit vocabulary needs training text")
    if ids.min() < 0:
        raise ValueError(f"token_ids must be non-negative token ids, got {int(ids.min())}")
    counts = np.bincount(ids)
    order = np.lexsort((np.arange(len(counts)), -counts))  # most frequent first, then smaller id
    keep = [int(t) for t in order[:size] if counts[t] > 0]
    return sorted(set(keep) | {int(t) for t in always_include})


def _crop_cache(cache, length: int) -> None:
    """Crop every layer of a [`DynamicCache`] to `length` tokens."""
    remove = cache.get_seq_length() - length
    if remove > 0:
        cache.crop(-remove)


class DepthStopCausalLMMixin:
    """Early-exit machinery shared by the decoder LMs. See the module docstring.

    The model class provides: `_ds_backbone()` (stock model), `_ds_layers()` (`nn.ModuleList`), `_ds_norm()` (final
    norm), `_ds_embed(input_ids, inputs_embeds, position_ids)`, `_ds_full_context(hidden, attention_mask,
    position_ids)` and `_ds_run_layer(layer, hidden, context)` (the plain layer loop, training path),
    `_ds_decode_context(hidden, position_ids)`, `_ds_decode_layer(...)`, `_ds_fill_weights()`, `_ds_fill(...)` (a
    decoding step) and `_ds_flops()` (per-token FLOPs of one layer and of the LM head). Its `__init__` calls
    `_ds_init_exit_heads()` before `post_init()`.

    Exit k (0-based position in `config.exit_layers`) reads `lm_head(norm(h))`; an early exit (not the last) first
    applies its [`ExitAdapter`] (`config.exit_adapter="affine"`) and predicts over `config.exit_vocab` only when set.
    """

    # ----------------------------------------------------------------------------------------------------------
    # Stopping rule
    # ----------------------------------------------------------------------------------------------------------
    def set_stopping_rule(self, name: str, **params) -> None:
        """Choose the per-token stopping rule `generate` uses, stored in `config` (saved with the model).

        Args:
            name (`str`): `none`, `static`, `entropy`, `confidence`, `patience`, `asti_bound` or `asti`.
            **params: the rule's one keyword parameter (`static(layer)` with a 0-based layer, `entropy(threshold)`,
                `confidence(threshold)`, `patience(patience)`, `asti_bound(cost)`, `asti(cost)`; `asti` without `cost`
                uses the calibrated setting and needs [`calibrate_lm`] first).
        """
        params = validate_rule(name, params, self.config.exit_layers, self.config.calibration)
        self.config.stopping_rule = name
        self.config.stopping_params = params

    def _resolve_rule(self, stopping_rule, stopping_params) -> tuple[str, dict]:
        name = stopping_rule if stopping_rule is not None else self.config.stopping_rule
        if stopping_rule is not None or stopping_params is not None:
            params = validate_rule(name, dict(stopping_params or {}), self.config.exit_layers, self.config.calibration)
        else:
            params = self.config.stopping_params
        return name, params

    # ----------------------------------------------------------------------------------------------------------
    # Exit heads
    # ----------------------------------------------------------------------------------------------------------
    def _ds_init_exit_heads(self) -> None:
        """Create `exit_adapters` (one [`ExitAdapter`] per early exit, or `None`), from `config.exit_adapter`."""
        config = self.config
        width = self.lm_head.in_features
        if config.exit_adapter == "affine":
            self.exit_adapters = nn.ModuleList(ExitAdapter(width, width) for _ in config.exit_layers[:-1])
        else:
            self.exit_adapters = None

    def _init_weights(self, module):
        if isinstance(module, ExitAdapter):  # zero: an untrained adapter is the identity
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)

    def _exit_vocab_ids(self) -> torch.Tensor | None:
        """`config.exit_vocab` as a `(len(exit_vocab),)` long tensor on the model's device, or `None`."""
        vocab = self.config.exit_vocab
        if vocab is None:
            return None
        device = self.lm_head.weight.device
        cached = getattr(self, "_ds_vocab_cache", None)
        if cached is None or cached[0] is not vocab or cached[1].device != device:
            cached = (vocab, torch.tensor(vocab, dtype=torch.long, device=device))
            self._ds_vocab_cache = cached
        return cached[1]

    def set_exit_vocab(self, token_ids) -> None:
        """Restrict the early exits' predictions to `token_ids` (see `exit_vocab` in the config), or lift the
        restriction with `None`. A calibration made with other exits is dropped (the rule falls back to `none`).

        Raises:
            `ValueError` naming the bad ids; the config is left unchanged.
        """
        previous = self.config.exit_vocab
        self.config.exit_vocab = None if token_ids is None else list(token_ids)
        try:
            validate_lm_exit_head_fields(self.config)
        except ValueError:
            self.config.exit_vocab = previous
            raise
        if self.config.calibration is not None and self.config.exit_vocab != previous:
            logger.warning("exit_vocab changed: the calibration was made with the previous exits and is dropped")
            self.config.calibration = None
            self.set_stopping_rule("none")

    def _exit_logits(self, hidden: torch.Tensor, k: int, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of exit `k` (0-based position in `config.exit_layers`).

        Args:
            hidden (`torch.Tensor` of shape `(..., hidden_size)`): the state after exit k's layer.
            weight (`torch.Tensor`, *optional*): `lm_head.weight[exit_vocab]`, when already gathered.

        Returns:
            `(..., vocab_size)` for the last exit (or without `exit_vocab`); `(..., len(exit_vocab))` for an early
            exit with `exit_vocab` set (column j is token `exit_vocab[j]`).
        """
        last = k == len(self.config.exit_layers) - 1
        if not last and self.exit_adapters is not None:
            hidden = self.exit_adapters[k](hidden)
        normed = self._ds_norm()(hidden)
        ids = None if last else self._exit_vocab_ids()
        if ids is None:
            return self.lm_head(normed)
        if weight is None:
            weight = self.lm_head.weight.index_select(0, ids)
        return F.linear(normed, weight)

    def _widen_exit_logits(self, logits: torch.Tensor, k: int) -> torch.Tensor:
        """`(..., len(exit_vocab))` logits of early exit `k` -> `(..., vocab_size)`, the lowest float elsewhere (so
        softmax gives those tokens probability 0). Unchanged when exit `k` predicts over the whole vocabulary."""
        ids = None if k == len(self.config.exit_layers) - 1 else self._exit_vocab_ids()
        if ids is None:
            return logits
        wide = logits.new_full((*logits.shape[:-1], self.lm_head.out_features), torch.finfo(logits.dtype).min)
        return wide.index_copy_(-1, ids, logits)

    def exit_head_flops(self) -> list[float]:
        """Per-token FLOPs of each exit's head (adapter + norm-free LM-head product), 0-based exit order."""
        layer_f, head_f = self._ds_flops()
        width = self.lm_head.in_features
        vocab = self.config.exit_vocab
        early = head_f if vocab is None else 2.0 * width * len(vocab)
        if self.exit_adapters is not None:
            early += 2.0 * width * width
        return [early] * (len(self.config.exit_layers) - 1) + [head_f]

    def _exit_temperatures(self) -> list[float]:
        calib = self.config.calibration
        if calib and calib.get("temperatures"):
            return [float(t) for t in calib["temperatures"]]
        return [1.0] * len(self.config.exit_layers)

    def _exit_lipschitz(self) -> list[float]:
        """K for `asti_bound`: spectral norm of the head (final norm's gain folded into the LM head rows the early
        exits use, times the adapter's `I + A` when there is one); 0 at the final exit."""
        weight = self.lm_head.weight.float()
        ids = self._exit_vocab_ids()
        if ids is not None:
            weight = weight.index_select(0, ids)
        k = torch.linalg.matrix_norm(weight * self._ds_norm().weight.float()[None, :], ord=2).item()
        out = []
        for position in range(len(self.config.exit_layers) - 1):
            scale = 1.0
            if self.exit_adapters is not None:
                a = self.exit_adapters[position].weight.float()
                scale = torch.linalg.matrix_norm(a + torch.eye(a.shape[0], device=a.device), ord=2).item()
            out.append(k * scale)
        return out + [0.0]

    def exit_compute_fractions(self) -> torch.Tensor:
        """C_k per exit for one decoded token when every head up to exit k runs: shape `(num_exits,)`, float64.
        Per-token FLOPs (projections and MLP; attention over the cache ignored), full model = all layers + 1 head;
        early heads cost what [`exit_head_flops`] says (less with `exit_vocab`)."""
        return self._compute_fractions(np.cumsum(self.exit_head_flops()))

    def single_exit_compute_fractions(self) -> torch.Tensor:
        """C_k when only exit k's head runs (rule `static`, or `none` at the last exit): `(num_exits,)`, float64."""
        return self._compute_fractions(self.exit_head_flops())

    def _compute_fractions(self, head_flops) -> torch.Tensor:
        """(layers up to exit k + `head_flops[k]`) / full model, per exit: `(num_exits,)`, float64."""
        layer_f, head_f = self._ds_flops()
        full = self.config.num_hidden_layers * layer_f + head_f
        return torch.tensor(
            [((layer + 1) * layer_f + head_flops[k]) / full for k, layer in enumerate(self.config.exit_layers)],
            dtype=torch.float64,
        )

    # ----------------------------------------------------------------------------------------------------------
    # Forward
    # ----------------------------------------------------------------------------------------------------------
    def _depthstop_forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        output_exit_logits=None,
        exit_gradient=DEFAULT_EXIT_GRADIENT,
        depth_loss_spec=None,
        stopping_rule=None,
        stopping_params=None,
        **kwargs,
    ) -> DepthStopCausalLMOutputWithPast:
        kwargs.pop("return_dict", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if self.training or output_exit_logits:
            return self._forward_all_exits(
                input_ids, inputs_embeds, attention_mask, position_ids, labels, parse_exit_gradient(exit_gradient),
                depth_loss_spec,
            )
        state = getattr(self, "_ds_state", None)
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        if state is not None and cache is not None and seq_len == 1 and cache.get_seq_length() > 0:
            return self._decode_step(input_ids, inputs_embeds, attention_mask, position_ids, cache, state)
        # Full depth: the stock computation (a single forward cannot exit early per token without K/V filling).
        out = self._ds_backbone()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
            inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs,
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return DepthStopCausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache)

    def _forward_all_exits(
        self, input_ids, inputs_embeds, attention_mask, position_ids, labels, exit_gradient, depth_loss_spec
    ) -> DepthStopCausalLMOutputWithPast:
        """Training path: every layer and every exit on every token; the loss is computed here, exit by exit."""
        config = self.config
        exit_layers = config.exit_layers
        num_exits = len(exit_layers)
        ids = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            else:
                position_ids = torch.arange(ids.shape[1], device=ids.device)[None].expand(ids.shape[0], -1)
        hidden = self._ds_embed(input_ids, inputs_embeds, position_ids)
        context = self._ds_full_context(hidden, attention_mask, position_ids)
        branches, ratios = [], []
        k = 0
        for layer_index, layer in enumerate(self._ds_layers()):
            prev = hidden
            hidden = self._ds_run_layer(layer, hidden, context)
            if layer_index != exit_layers[k]:
                continue
            branch = hidden
            if k < num_exits - 1:
                if exit_gradient == "detach":
                    branch, prev = hidden.detach(), prev.detach()
                elif isinstance(exit_gradient, float):
                    branch = ScaleGradient.apply(hidden, exit_gradient)
                    prev = ScaleGradient.apply(prev, exit_gradient)
                elif exit_gradient == "equilibrium":
                    branch = ScaleGradient.apply(hidden, 1.0 / (num_exits - k))
                    hidden = ScaleGradient.apply(hidden, (num_exits - k - 1) / (num_exits - k))
            ratios.append((branch - prev).norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-6))  # (batch, seq)
            branches.append(branch)
            k += 1
        ratios = torch.stack(ratios, dim=-1)  # (batch, seq, num_exits)
        logits = self._exit_logits(branches[-1], num_exits - 1)  # (batch, seq, vocab)
        if labels is None:
            early = [self._widen_exit_logits(self._exit_logits(b, k), k) for k, b in enumerate(branches[:-1])]
            exit_logits = torch.stack(early + [logits], dim=2)
            return DepthStopCausalLMOutputWithPast(logits=logits, exit_logits=exit_logits, exit_residual_ratios=ratios)
        return self._exit_loss(logits, branches, ratios, labels, depth_loss_spec or DepthLossSpec())

    def _exit_loss(self, logits, branches, ratios, labels, spec: DepthLossSpec) -> DepthStopCausalLMOutputWithPast:
        """sum_k w_k CE_k + lambda * L_depth over next-token predictions (labels shifted inside, -100 ignored).

        Non-final exits' logits are recomputed in backward (activation checkpointing), so at most one exit's
        `(tokens, vocab)` logits are alive at a time. With `config.exit_vocab`, an early exit's CE is taken over the
        tokens whose target is in that vocabulary (0 for the others; `exit_losses` averages over the former), and
        its distillation teacher is the final exit's distribution renormalised over that vocabulary."""
        num_exits = len(branches)
        shifted = labels[:, 1:].to(logits.device)
        valid = shifted != -100  # (batch, seq - 1)
        targets = shifted[valid]  # (n,)
        t = spec.distill_temperature
        final = logits[:, :-1][valid].float()  # (n, vocab)
        final_logp = final.log_softmax(-1)
        ids = self._exit_vocab_ids()
        distill = "distill" in spec.depth_terms
        if ids is None:
            early_targets = targets
            teacher = (final.detach() / t).log_softmax(-1) if distill else None
        else:
            column = torch.full((final.shape[-1],), -1, dtype=torch.long, device=final.device)
            column[ids] = torch.arange(len(ids), device=final.device)
            early_targets = column[targets]  # (n,) -1 where the target is outside exit_vocab
            teacher = (final.detach()[:, ids] / t).log_softmax(-1) if distill else None
        inside = early_targets >= 0  # (n,)

        def exit_terms(h, k):  # h: (n, hidden) -> per-token CE, max prob, KL to the final exit, correct
            z = self._exit_logits(h, k).float()
            logp = z.log_softmax(-1)
            ce = -logp.gather(-1, early_targets.clamp_min(0)[:, None])[:, 0] * inside
            conf = logp.amax(-1).exp()
            prediction = z.argmax(-1)
            correct = ((prediction if ids is None else ids[prediction]) == targets).float()
            if teacher is None:
                return ce, conf, torch.zeros_like(ce), correct
            student = logp if t == 1.0 else (z / t).log_softmax(-1)
            kl = (teacher.exp() * (teacher - student)).sum(-1) * (t * t)
            return ce, conf, kl, correct

        ces, confs, kls, accs = [], [], [], []
        for k, branch in enumerate(branches[:-1]):
            h = branch[:, :-1][valid]
            if torch.is_grad_enabled() and h.requires_grad:
                ce, conf, kl, correct = checkpoint(exit_terms, h, k, use_reentrant=False)
            else:
                ce, conf, kl, correct = exit_terms(h, k)
            ces.append(ce), confs.append(conf), kls.append(kl), accs.append(correct)
        ces.append(-final_logp.gather(-1, targets[:, None])[:, 0])
        confs.append(final_logp.amax(-1).exp())
        kls.append(torch.zeros_like(ces[-1]))
        accs.append((final.argmax(-1) == targets).float())
        ce = torch.stack(ces, dim=1)  # (n, num_exits)
        counts = torch.tensor([float(inside.sum())] * (num_exits - 1) + [float(len(targets))], device=ce.device)
        exit_losses = ce.sum(0) / counts.clamp_min(1.0)
        weights = exit_loss_weights(num_exits, spec.exit_weighting, spec.early_exit_weight).to(ce.device)
        loss = (exit_losses * weights).sum()
        depth = ce.new_zeros(())
        if spec.depth_loss_weight > 0:
            for term in spec.depth_terms:
                if term == "distill" and num_exits > 1:
                    depth = depth + torch.stack(kls[:-1], 1).mean(0).sum() / (num_exits - 1)
                elif term == "stop":
                    conf = torch.stack(confs, dim=1)
                    s = torch.sigmoid(spec.stop_sharpness * (conf - spec.stop_threshold))
                    s = torch.cat([s[:, :-1], torch.ones_like(s[:, -1:])], dim=1)
                    survive = torch.cumprod(torch.cat([torch.ones_like(s[:, :1]), 1.0 - s[:, :-1]], dim=1), dim=1)
                    cost = spec.compute_cost * self.exit_compute_fractions().to(ce.device, ce.dtype)
                    depth = depth + (s * survive * (ce + cost)).sum(1).mean()
                elif term == "dr":
                    r = ratios[:, :-1][valid].float()  # (n, num_exits)
                    scale = torch.tensor(
                        [(layer + 1) / self.config.num_hidden_layers for layer in self.config.exit_layers],
                        device=r.device,
                    )
                    depth = depth + (r.pow(2) * scale).sum(1).mean()
            loss = loss + spec.depth_loss_weight * depth
        return DepthStopCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            exit_losses=exit_losses.detach(),
            exit_token_accuracies=torch.stack(accs, 1).mean(0),
            exit_residual_ratios=ratios.detach(),
            depth_loss=depth.detach(),
        )

    # ----------------------------------------------------------------------------------------------------------
    # One decoding step with per-token exits
    # ----------------------------------------------------------------------------------------------------------
    def _prepare_decode_state(self, name: str, params: dict) -> _DecodeState:
        exit_layers = self.config.exit_layers
        lipschitz = self._exit_lipschitz() if name == "asti_bound" else None
        rule = build_rule(name, params, self.config.calibration, lipschitz)
        if rule.needs_all_heads:
            evaluated = list(range(len(exit_layers)))
        elif name == "static":
            evaluated = [next(k for k, layer in enumerate(exit_layers) if layer >= params["layer"])]
        else:
            evaluated = [len(exit_layers) - 1]
        device = self.lm_head.weight.device
        fractions = self.exit_compute_fractions()
        next_compute = torch.cat([fractions.diff(), fractions.new_zeros(1)]).float().to(device)
        ids = self._exit_vocab_ids()
        return _DecodeState(
            name=name,
            params=params,
            rule=rule,
            exit_position={exit_layers[k]: k for k in evaluated},
            temperatures=self._exit_temperatures(),
            next_compute=next_compute,
            fill=self._ds_fill_weights(),
            exit_weight=None if ids is None else self.lm_head.weight.index_select(0, ids),
        )

    def _decode_step(self, input_ids, inputs_embeds, attention_mask, position_ids, cache, state: _DecodeState):
        """One new token per sequence, layers run until the rule stops each sequence; skipped layers' K/V filled.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, 1)`), attention_mask (`(batch_size, past + 1)`, 1 =
            real token; left padding), position_ids (`(batch_size, 1)`), cache ([`DynamicCache`]).

        Returns:
            [`DepthStopCausalLMOutputWithPast`] with `logits` `(batch_size, 1, vocab_size)` of each row's exit and
            `exit_layer` `(batch_size,)` (0-based).
        """
        if not isinstance(cache, DynamicCache):
            raise TypeError(f"per-token exits need a DynamicCache, got cache={type(cache).__name__}")
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        if position_ids is None:
            position_ids = torch.full((batch, 1), cache.get_seq_length(), dtype=torch.long, device=self.device)
        hidden = self._ds_embed(input_ids, inputs_embeds, position_ids)  # (batch, 1, hidden)
        context = self._ds_decode_context(hidden, position_ids)
        mask = attention_mask[:, None, None, :].bool() if attention_mask is not None else None  # (batch,1,1,keys)
        num_layers = self.config.num_hidden_layers
        rule, name = state.rule, state.name
        device = hidden.device
        exit_layer = torch.full((batch,), num_layers - 1, dtype=torch.long, device=device)
        out_logits = None
        active = None  # None: every row runs; else the original row index of each running row
        source = None  # (batch, 1, hidden): K/V source; rows that stopped keep their exited state here
        obs = None
        finished = False
        for layer_index in range(num_layers):
            prev = hidden
            hidden = self._ds_decode_layer(layer_index, hidden, active, source, context, cache, mask)
            k = state.exit_position.get(layer_index)
            if k is None or layer_index == num_layers - 1:
                continue
            logits = self._exit_logits(hidden[:, 0], k, state.exit_weight)  # (active, vocab or len(exit_vocab))
            if name == "static":  # every row stops here: no observation, no sync
                stop = None
            else:
                if rule.needs_residuals:
                    ratio = (hidden - prev)[:, 0].norm(dim=-1) / prev[:, 0].norm(dim=-1).clamp_min(1e-6)
                else:
                    ratio = logits.new_ones(logits.shape[0])
                norm = torch.full_like(ratio, math.sqrt(self.config.hidden_size))  # ||h|| / rms(h): the head norms h
                obs = observe(
                    k, layer_index, logits, state.temperatures[k], obs, ratio, norm,
                    state.next_compute[k].expand(logits.shape[0]),
                )
                stop = rule(obs)
                num_stop = int(stop.sum())  # the one host sync per evaluated exit
                if num_stop == 0:
                    continue
                if num_stop == logits.shape[0]:
                    stop = None
            if out_logits is None:
                out_logits = logits.new_empty(batch, self.lm_head.out_features)
            if stop is None:  # every running row stops here
                rows = active
                if rows is None:
                    out_logits, source = self._widen_exit_logits(logits, k), hidden
                else:
                    out_logits[rows] = self._widen_exit_logits(logits, k)
                    source = source.index_copy(0, rows, hidden)
                    exit_layer[rows] = layer_index
                if active is None:
                    exit_layer.fill_(layer_index)
                self._ds_fill(layer_index + 1, source, context, cache, state.fill)
                finished = True
                break
            rows = stop.nonzero()[:, 0] if active is None else active[stop]
            out_logits[rows] = self._widen_exit_logits(logits[stop], k)
            exit_layer[rows] = layer_index
            source = hidden.clone() if active is None else source.index_copy(0, active, hidden)
            keep = ~stop
            active = keep.nonzero()[:, 0] if active is None else active[keep]
            hidden, obs = hidden[keep], obs.select(keep)
        if not finished:
            logits = self._exit_logits(hidden[:, 0], len(self.config.exit_layers) - 1)
            if active is None:
                out_logits = logits
            else:
                out_logits[active] = logits
        state.exit_layers.append(exit_layer)
        return DepthStopCausalLMOutputWithPast(logits=out_logits[:, None], cache=cache, exit_layer=exit_layer)

    # ----------------------------------------------------------------------------------------------------------
    # generate
    # ----------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        inputs=None,
        generation_config=None,
        depthstop_mode: str | None = None,
        stopping_rule: str | None = None,
        stopping_params: dict | None = None,
        num_draft_tokens: int = 4,
        **kwargs,
    ):
        r"""[`GenerationMixin.generate`] with per-token early exits.

        Args:
            depthstop_mode (`str`, *optional*, defaults to `"early_exit"`): `"early_exit"` (each new token leaves the
                layer stack where the stopping rule says; any decoding strategy `generate` supports that decodes one
                token per step: greedy, sampling, streamers, `eos_token_id`, ...), or `"lossless"` (self-speculative,
                greedy only: drafts with exits, verifies at full depth; output identical to full-depth greedy).
            stopping_rule (`str`, *optional*), stopping_params (`dict`, *optional*): override the configured rule for
                this call. With rule `none` the stock generation runs unchanged.
            num_draft_tokens (`int`, defaults to 4): lossless mode: the most tokens drafted before a verification;
                drafting also stops early when a draft token ran at full depth (the rule found no early exit).
            **kwargs: as [`GenerationMixin.generate`].

        Returns:
            As [`GenerationMixin.generate`]; with `return_dict_in_generate=True` a [`DepthStopGenerateOutput`] whose
            `exit_layers` `(batch_size, num_new_tokens)` gives each new token's 0-based exit layer. The exit layers of
            the last call are also kept in `model.last_exit_layers`.
        """
        mode = depthstop_mode if depthstop_mode is not None else "early_exit"
        if mode not in DEPTHSTOP_MODES:
            raise ValueError(f"depthstop_mode must be one of {DEPTHSTOP_MODES}, got {depthstop_mode!r}")
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
        name, params = self._resolve_rule(stopping_rule, stopping_params)
        if mode == "lossless":
            return self._generate_lossless(inputs, generation_config, name, params, num_draft_tokens, **kwargs)
        return_dict = self._wants_dict(generation_config, kwargs)
        if name != "none":
            use_cache = kwargs.get("use_cache", getattr(generation_config, "use_cache", True))
            if use_cache is False:
                raise ValueError(
                    f"per-token exits (stopping_rule={name!r}) need the key/value cache, got use_cache=False"
                )
            self._ds_state = self._prepare_decode_state(name, params)
        try:
            out = super().generate(inputs, generation_config, **kwargs)
        finally:
            state, self._ds_state = getattr(self, "_ds_state", None), None
        sequences = out.sequences if return_dict else out
        prompt_len = self._prompt_length(inputs, kwargs)
        new = sequences.shape[1] - prompt_len
        batch = sequences.shape[0]
        full = torch.full((batch, 1), self.config.num_hidden_layers - 1, dtype=torch.long, device=sequences.device)
        steps = state.exit_layers if state is not None else []
        if steps:
            exit_layers = torch.cat([full, torch.stack(steps, 1).to(sequences.device)], 1)
        else:
            exit_layers = full.expand(batch, max(new, 1)).clone()
        exit_layers = exit_layers[:, :new]
        self.last_exit_layers = exit_layers
        if not return_dict:
            return out
        return DepthStopGenerateOutput(**dict(out.items()), exit_layers=exit_layers)

    @staticmethod
    def _wants_dict(generation_config, kwargs) -> bool:
        if "return_dict_in_generate" in kwargs:
            return bool(kwargs["return_dict_in_generate"])
        return bool(getattr(generation_config, "return_dict_in_generate", False))

    @staticmethod
    def _prompt_length(inputs, kwargs) -> int:
        ids = inputs if inputs is not None else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs["inputs_embeds"]
        return ids.shape[1] if ids is not None else 0

    def _generate_lossless(self, inputs, generation_config, name, params, num_draft_tokens, **kwargs):
        """Self-speculative greedy decoding: the output equals full-depth greedy decoding (see the module docstring)."""
        streamer = kwargs.pop("streamer", None)
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        attention_mask = kwargs.pop("attention_mask", None)
        config, model_kwargs = self._prepare_generation_config(generation_config, **kwargs)
        if config.do_sample:
            raise ValueError(
                "depthstop_mode='lossless' reproduces greedy decoding and cannot sample: got do_sample=True "
                "(use depthstop_mode='early_exit' to sample with per-token exits)"
            )
        for option, value, ok in (
            ("num_beams", config.num_beams, 1),
            ("num_return_sequences", config.num_return_sequences, 1),
        ):
            if value not in (None, ok):
                raise ValueError(f"depthstop_mode='lossless' supports {option}={ok} only, got {option}={value!r}")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("depthstop_mode='lossless' needs input_ids of shape (batch_size, seq_len)")
        unsupported = sorted(k for k in model_kwargs if k not in ("use_cache", "logits_to_keep", "position_ids"))
        if unsupported:
            raise ValueError(f"depthstop_mode='lossless' does not support the generate arguments {unsupported}")
        for option in ("repetition_penalty",):
            value = getattr(config, option, None)
            if value not in (None, 1.0):
                raise ValueError(f"depthstop_mode='lossless' supports plain greedy decoding only, got {option}={value}")
        batch, prompt_len = input_ids.shape
        device = input_ids.device
        if config.max_new_tokens is not None:
            max_new = config.max_new_tokens
        else:
            max_new = (config.max_length if config.max_length is not None else 20) - prompt_len
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        eos = config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        eos_t = torch.tensor(eos, dtype=torch.long, device=device)
        pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.long()
        num_layers = self.config.num_hidden_layers
        if streamer is not None:
            streamer.put(input_ids.cpu())

        # prefill at full depth
        cache = DynamicCache(config=self.config)
        positions = (attention_mask.cumsum(-1) - 1).clamp_min(0)
        hidden = self._ds_backbone()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, cache=cache, use_cache=True
        ).last_hidden_state
        current = self.lm_head(hidden[:, -1]).argmax(-1)  # (batch,) the last committed token, not yet in the cache
        next_position = positions[:, -1] + 1  # (batch,)
        tokens, exits = [current], [torch.full_like(current, num_layers - 1)]
        finished = torch.isin(current, eos_t) if eos else torch.zeros_like(current, dtype=torch.bool)
        if streamer is not None:
            streamer.put(current.cpu())
        state = None if name == "none" else self._prepare_decode_state(name, params)
        verify_passes = 0
        generated = 1
        while generated < max_new and not bool(finished.all()):
            start = cache.get_seq_length()
            budget = max_new - generated
            drafts, draft_exits = [], []
            token = current
            if state is not None:
                for j in range(min(num_draft_tokens, budget - 1)):
                    mask = torch.cat([attention_mask, attention_mask.new_ones(batch, j + 1)], 1)
                    out = self._decode_step(
                        token[:, None], None, mask, (next_position + j)[:, None], cache, state
                    )
                    token = out.logits[:, -1].argmax(-1)
                    drafts.append(token)
                    draft_exits.append(out.exit_layer)
                    if bool((out.exit_layer == num_layers - 1).all()):
                        break  # the rule found no early exit: drafting on costs as much as verifying
                state.exit_layers.clear()
                _crop_cache(cache, start)
            n = len(drafts)
            chunk = torch.stack([current, *drafts], 1)  # (batch, n + 1)
            mask = torch.cat([attention_mask, attention_mask.new_ones(batch, n + 1)], 1)
            pos = next_position[:, None] + torch.arange(n + 1, device=device)
            hidden = self._ds_backbone()(
                input_ids=chunk, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True
            ).last_hidden_state
            verified = self.lm_head(hidden).argmax(-1)  # (batch, n + 1): full-depth greedy after each prefix
            verify_passes += 1
            if n:
                agree = (torch.stack(drafts, 1) == verified[:, :n]) | finished[:, None]
                accepted = int(agree.all(0).long().cumprod(0).sum())  # shortest agreeing prefix over the batch
            else:
                accepted = 0
            _crop_cache(cache, start + accepted + 1)  # keep current + accepted drafts, all at full depth
            for c in range(accepted + 1):
                tok = torch.where(finished, torch.full_like(verified[:, c], pad), verified[:, c])
                tokens.append(tok)
                layer = draft_exits[c] if c < accepted else torch.full_like(tok, num_layers - 1)
                exits.append(torch.where(finished, torch.full_like(layer, -1), layer))
                if streamer is not None:
                    streamer.put(tok.cpu())
                if eos:
                    finished = finished | torch.isin(tok, eos_t)
            generated += accepted + 1
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, accepted + 1)], 1)
            next_position = next_position + accepted + 1
            current = verified[:, accepted]
        if streamer is not None:
            streamer.end()
        new_tokens = torch.stack(tokens, 1)
        exit_layers = torch.stack(exits, 1)
        if eos:  # drop columns after every row finished (a verification can commit several tokens at once)
            done = torch.isin(new_tokens, eos_t).long().cumsum(1) > 0
            all_done = done.all(0).nonzero()
            if len(all_done):
                keep = int(all_done[0]) + 1
                new_tokens, exit_layers = new_tokens[:, :keep], exit_layers[:, :keep]
        sequences = torch.cat([input_ids, new_tokens], 1)
        self.last_exit_layers = exit_layers
        self.last_verify_passes = verify_passes
        if not config.return_dict_in_generate:
            return sequences
        return DepthStopGenerateOutput(
            sequences=sequences, cache=cache, exit_layers=exit_layers, num_verify_passes=verify_passes
        )


# --------------------------------------------------------------------------------------------------------------
# Calibration for decoder LMs
# --------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def collect_lm_observations(model, input_ids_batches, max_tokens: int | None = None):
    """Run `model` at full depth with every exit on held-out text and keep, per token and exit, the compact ASTI
    features and the exit's argmax (never the full distributions).

    Args:
        model: a `DepthStop*` causal LM.
        input_ids_batches (iterable of `torch.LongTensor` of shape `(batch_size, seq_len)`, or of dicts with
            `input_ids` and `attention_mask`): held-out text (right or left padding; padded positions skipped).
        max_tokens (`int`, *optional*): stop once this many tokens are collected.

    Returns:
        `dict` with `features` (list per exit of `(n, 7)` float64 arrays), `predictions` (`(n, num_exits)` int64),
        `max_prob` and `entropy` (`(n, num_exits)` float64).
    """
    was_training = model.training
    model.eval()
    exit_layers = model.config.exit_layers
    num_exits = len(exit_layers)
    temperatures = model._exit_temperatures()
    fractions = model.exit_compute_fractions()
    next_compute = torch.cat([fractions.diff(), fractions.new_zeros(1)]).float()
    feats = [[] for _ in range(num_exits)]
    preds, maxp, ent = [], [], []
    total = 0
    device = model.lm_head.weight.device
    vocab_ids = model._exit_vocab_ids()
    for batch in input_ids_batches:
        if isinstance(batch, dict):
            ids, mask = batch["input_ids"], batch.get("attention_mask")
        else:
            ids, mask = batch, None
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise ValueError(f"calibrate_lm needs batches of input_ids of shape (batch_size, seq_len), got {ids!r}")
        ids = ids.to(device)
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        out = model(input_ids=ids, attention_mask=mask, output_exit_logits=True)
        valid = mask.bool()
        n = int(valid.sum())
        obs = None
        batch_preds, batch_max, batch_ent = [], [], []
        ratios = out.exit_residual_ratios[valid]  # (n, num_exits)
        for k in range(num_exits):
            logits = out.exit_logits[:, :, k][valid]  # (n, vocab)
            shortlisted = vocab_ids is not None and k < num_exits - 1
            if shortlisted:  # the early exit's own vocabulary, as in a decoding step
                logits = logits[:, vocab_ids]
            norm = torch.full((n,), math.sqrt(model.config.hidden_size), device=device)
            obs = observe(
                k, exit_layers[k], logits, temperatures[k], obs, ratios[:, k], norm, next_compute[k].expand(n)
            )
            feats[k].append(asti_features(obs, "compact").double().cpu().numpy())
            batch_preds.append((vocab_ids[obs.prediction] if shortlisted else obs.prediction).cpu())
            batch_max.append(obs.max_prob.double().cpu())
            batch_ent.append(obs.entropy.double().cpu())
        preds.append(torch.stack(batch_preds, 1))
        maxp.append(torch.stack(batch_max, 1))
        ent.append(torch.stack(batch_ent, 1))
        total += n
        if max_tokens is not None and total >= max_tokens:
            break
    model.train(was_training)
    if total == 0:
        raise ValueError("calibrate_lm got no tokens: input_ids_batches is empty")
    return {
        "features": [np.concatenate(f) for f in feats],
        "predictions": torch.cat(preds).numpy(),
        "max_prob": torch.cat(maxp).numpy(),
        "entropy": torch.cat(ent).numpy(),
    }


def _first_stop(stop: np.ndarray) -> np.ndarray:
    """(n, num_exits - 1) bool "stop here" -> (n,) 0-based exit position (the final one when none fired)."""
    num = stop.shape[1] + 1
    fired = stop.any(1)
    return np.where(fired, stop.argmax(1), num - 1)


def calibrate_lm(
    model,
    input_ids_batches,
    target: float = 0.1,
    rule: str = "asti",
    max_tokens: int | None = None,
    seed: int = 0,
) -> dict:
    """Calibrate per-token stopping rules of a decoder LM on held-out text and switch the model to `rule`.

    "Correct" at an exit means the exit's argmax equals the full-depth argmax at the same position (teacher forcing on
    the held-out text; during generation the filled K/V of skipped layers add some drift, measure agreement with the
    benchmark). For `asti` a per-exit logistic model of P(exit argmax == final argmax) is fitted on the compact
    features ([`hf_depthstop.stopping.asti_features`] with `"compact"`) with 2-fold cross-fitting; its cost, and the
    thresholds of `confidence` / `entropy` and the layer of `static`, are chosen as the cheapest setting whose token
    agreement with full depth is >= 1 - `target`. Temperatures are left at 1.

    Args:
        model: a `DepthStop*` causal LM (at least 2 exits).
        input_ids_batches: see [`collect_lm_observations`].
        target (`float`, defaults to 0.1): the allowed disagreement with full-depth tokens (0.1 = 90% agreement).
        rule (`str`, defaults to `"asti"`): the rule the model uses afterwards (`none` or one of
            `static`, `entropy`, `confidence`, `asti`).
        max_tokens (`int`, *optional*): cap on the tokens used. seed (`int`): cross-fitting folds' seed.

    Returns:
        The `config.calibration` dict (`asti` model, `settings` per rule, `table` with agreement and mean compute
        fraction per rule, `oracle_floor`).
    """
    from .calibration import _fit_logistic

    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 <= target < 1:
        raise ValueError(f"target (an allowed disagreement, 0.1 = 90% agreement) must be in [0, 1), got {target!r}")
    if rule != "none" and rule not in LM_CALIBRATED_RULES:
        raise ValueError(f"rule must be 'none' or one of {LM_CALIBRATED_RULES}, got {rule!r}")
    exit_layers = model.config.exit_layers
    if len(exit_layers) < 2:
        raise ValueError(f"calibration needs at least 2 exits, got exit_layers={exit_layers}")
    data = collect_lm_observations(model, input_ids_batches, max_tokens=max_tokens)
    preds = data["predictions"]
    same = preds[:, :-1] == preds[:, -1:]  # (n, num_exits - 1)
    n = preds.shape[0]
    compute = model.exit_compute_fractions().numpy()  # every head up to the exit runs
    single = model.single_exit_compute_fractions().numpy()  # `static` and `none`: one head

    # ASTI: cross-fitted probabilities choose the cost; the stored model is refitted on every token
    fold = np.random.default_rng(seed).permutation(n) % 2
    oof = np.zeros((n, len(exit_layers) - 1))
    fitted = []
    for k in range(len(exit_layers) - 1):
        x, y = data["features"][k], same[:, k].astype(int)
        for f in range(2):
            m = _fit_logistic(x[fold != f], y[fold != f])
            z = ((x[fold == f] - np.array(m["mean"])) / np.array(m["std"])) @ np.array(m["coef"]) + m["intercept"]
            oof[fold == f, k] = 1.0 / (1.0 + np.exp(-z))
        fitted.append(_fit_logistic(x, y))
    asti_model = {key: [m[key] for m in fitted] for key in ("mean", "std", "coef", "intercept")}
    asti_model.update(estimator="same_prediction", features="compact")

    def outcome(position: np.ndarray, fractions: np.ndarray) -> dict:
        agree = preds[np.arange(n), position] == preds[:, -1]
        return {
            "agreement": float(agree.mean()),
            "mean_exit_layer": float(np.array(exit_layers)[position].mean()),
            "compute_fraction": float(fractions[position].mean()),
        }

    grids = {
        "asti": ("cost", np.unique(np.concatenate([np.quantile(1 - oof, np.linspace(0, 1, 201)), [0.0]]))),
        "confidence": ("threshold", np.unique(np.concatenate([np.quantile(data["max_prob"][:, :-1], np.linspace(0, 1, 201)), [1.0]]))),
        "entropy": ("threshold", np.unique(np.concatenate([np.quantile(data["entropy"][:, :-1], np.linspace(0, 1, 201)), [0.0]]))),
        "static": ("layer", np.array(exit_layers, dtype=float)),
    }
    # `none` runs the final head only (single-head compute); the other rules pay for every exit they evaluate
    settings, table = {}, [{"rule": "none", "setting": None, **outcome(np.full(n, len(exit_layers) - 1), single)}]
    for name, (param, grid) in grids.items():
        best = None
        for value in grid:
            if name == "asti":
                position = _first_stop(1 - oof <= value)
            elif name == "confidence":
                position = _first_stop(data["max_prob"][:, :-1] >= value)
            elif name == "entropy":
                position = _first_stop(data["entropy"][:, :-1] <= value)
            else:
                position = np.full(n, next(k for k, layer in enumerate(exit_layers) if layer >= value))
            result = outcome(position, single if name == "static" else compute)
            if result["agreement"] >= 1 - target - 1e-12 and (
                best is None or result["compute_fraction"] < best[1]["compute_fraction"]
            ):
                best = (value, result)
        if best is None:  # nothing meets the target: the most conservative setting (full depth)
            value = {"asti": 0.0, "confidence": 1.0, "entropy": 0.0, "static": float(exit_layers[-1])}[name]
            best = (value, outcome(np.full(n, len(exit_layers) - 1), single if name == "static" else compute))
        value = int(best[0]) if name == "static" else float(best[0])
        settings[name] = {param: value}
        table.append({"rule": name, "setting": value, **{k: v for k, v in best[1].items() if k != "rule"}})
    floor = same[:, ::-1].cumprod(1)[:, ::-1]  # agrees at this exit and every later one
    oracle = np.where(floor.any(1), floor.argmax(1), len(exit_layers) - 1)
    calibration = {
        "target_type": "max_disagreement",
        "target": float(target),
        "num_tokens": int(n),
        "temperatures": [1.0] * len(exit_layers),
        "asti": asti_model,
        "settings": settings,
        "table": table,
        "oracle_floor": {"rule": "oracle floor", "setting": None, **outcome(oracle, compute)},
    }
    model.config.calibration = calibration
    if rule == "none":
        model.set_stopping_rule("none")
    else:
        model.set_stopping_rule(rule, **settings[rule])
    logger.info(f"calibrated on {n} tokens; rule {rule} at {settings.get(rule)}")
    return calibration


__all__ = [
    "DEPTHSTOP_MODES",
    "DepthStopCausalLMMixin",
    "ExitAdapter",
    "calibrate_lm",
    "collect_lm_observations",
    "exit_vocab_from_corpus",
]
