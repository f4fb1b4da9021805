# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the early-exit Llama-family causal LM."""

from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from ...configuration_common import adopt_checkpoint_config_dict
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

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_exits()

    def validate_exits(self) -> None:
        """Normalise and check the exit fields (again when a model is built: `from_pretrained(..., **kwargs)` sets
        overriding attributes after construction)."""
        validate_exit_fields(self)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return adopt_checkpoint_config_dict(
            config_dict, pretrained_model_name_or_path, COMPATIBLE_MODEL_TYPES, "Llama-architecture", cls.model_type
        ), kwargs


__all__ = ["DepthStopLlamaConfig"]
