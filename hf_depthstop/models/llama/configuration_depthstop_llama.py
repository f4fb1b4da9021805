# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the early-exit Llama-family causal LM."""

from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from ...configuration_common import adopt_checkpoint_config_dict, validate_lm_exit_head_fields
from ...stopping import validate_exit_fields


# Checkpoint `model_type`s this config can be built from: any Llama-architecture checkpoint, or one of ours.
COMPATIBLE_MODEL_TYPES = ("llama", "depthstop_llama")


@strict
class DepthStopLlamaConfig(LlamaConfig):
    r"""
    [`LlamaConfig`] plus the exits and the stopping rule. Every Llama-architecture checkpoint's config (Llama,
    SmolLM2, TinyLlama, ...) loads into it.

    Args:
        exit_layers (`list[int]`, *optional*):
            0-based indices of the layers after which an exit sits (`k` means "after layer k"). Every exit reads the
            model's own final norm + LM head (shared, no new weights). Defaults to every layer; sorted on load; the
            last layer is always an exit. Each evaluated exit costs one LM-head product (`hidden_size x vocab_size`,
            for SmolLM2-135M about 8 layers' worth of FLOPs), so subsets such as every 4th layer are usually faster.
        stopping_rule (`str`, *optional*, defaults to `"none"`):
            Per-token rule used by `generate`: `none`, `static`, `entropy`, `confidence`, `patience`, `asti_bound`,
            `asti` (see [`hf_depthstop.stopping`]).
        stopping_params (`dict`, *optional*): the rule's keyword parameter, e.g. `{"threshold": 0.9}`.
        calibration (`dict`, *optional*): written by [`hf_depthstop.generation.calibrate_lm`] (per-exit temperatures,
            the ASTI estimator with compact features, the calibrated settings and the table); JSON-serialisable.
        exit_adapter (`str`, *optional*, defaults to `"none"`):
            `"affine"` gives each early exit (not the last) a light adapter before the shared head: h + A_k h + b_k,
            with A_k `(hidden_size, hidden_size)` initialised to zero (so an untrained adapter is the shared head
            itself; a learned per-layer affine map, as in the "tuned lens"). It costs 2 * hidden_size^2 FLOPs per
            evaluated exit and is trained (and saved with a LoRA adapter) like any exit head.
        exit_vocab (`list[int]`, *optional*):
            Token ids the early exits (not the last) predict over: their LM-head product uses these rows only, so an
            evaluated exit costs `2 * hidden_size * len(exit_vocab)` FLOPs instead of `2 * hidden_size * vocab_size`
            (4096 of SmolLM2's 49152 tokens: 12x cheaper). A token that stops early is one of these; the last exit
            always predicts over the whole vocabulary. Build it from training text with
            [`hf_depthstop.generation.exit_vocab_from_corpus`]. `None` (default): the whole vocabulary.

    Example:

    ```python
    >>> from hf_depthstop import DepthStopLlamaConfig, DepthStopLlamaForCausalLM
    >>> config = DepthStopLlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
    ...                               num_key_value_heads=2, intermediate_size=64, vocab_size=97, exit_layers=[1, 3])
    >>> model = DepthStopLlamaForCausalLM(config)
    ```
    """

    model_type = "depthstop_llama"

    exit_layers: list[int] | None = None
    stopping_rule: str = "none"
    stopping_params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    exit_adapter: str = "none"
    exit_vocab: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_exits()

    def validate_exits(self) -> None:
        """Normalise and check the exit fields (again when a model is built: `from_pretrained(..., **kwargs)` sets
        overriding attributes after construction)."""
        validate_exit_fields(self)
        validate_lm_exit_head_fields(self)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return adopt_checkpoint_config_dict(
            config_dict, pretrained_model_name_or_path, COMPATIBLE_MODEL_TYPES, "Llama-architecture", cls.model_type
        ), kwargs


__all__ = ["DepthStopLlamaConfig"]
