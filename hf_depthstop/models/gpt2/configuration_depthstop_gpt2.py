# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the early-exit GPT-2 causal LM."""

from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config

from ...configuration_common import adopt_checkpoint_config_dict, validate_lm_exit_head_fields
from ...stopping import validate_exit_fields


COMPATIBLE_MODEL_TYPES = ("gpt2", "depthstop_gpt2")


@strict
class DepthStopGPT2Config(GPT2Config):
    r"""
    [`GPT2Config`] plus the exits and the stopping rule; every GPT-2 checkpoint's config loads into it. Fields
    `exit_layers` (0-based, default every layer, last always added), `stopping_rule`, `stopping_params`,
    `calibration`, `exit_adapter` and `exit_vocab` mean what they mean in [`DepthStopLlamaConfig`]; every exit reads
    the shared `ln_f` + LM head.

    Example:

    ```python
    >>> from hf_depthstop import DepthStopGPT2Config, DepthStopGPT2LMHeadModel
    >>> model = DepthStopGPT2LMHeadModel(DepthStopGPT2Config(n_embd=32, n_layer=4, n_head=4, vocab_size=97))
    ```
    """

    model_type = "depthstop_gpt2"

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
        """Normalise and check the exit fields; `ValueError` naming the field and the value otherwise."""
        validate_exit_fields(self)
        validate_lm_exit_head_fields(self)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return adopt_checkpoint_config_dict(
            config_dict, pretrained_model_name_or_path, COMPATIBLE_MODEL_TYPES, "GPT-2", cls.model_type
        ), kwargs


__all__ = ["DepthStopGPT2Config"]
