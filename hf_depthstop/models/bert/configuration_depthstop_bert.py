# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the early-exit BERT classifier."""

from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import BertConfig

from ...configuration_common import adopt_checkpoint_config_dict, resolve_exit_head_width
from ...stopping import validate_exit_fields


EXIT_POOLINGS = ("cls", "mean")
# Checkpoint `model_type`s this config can be built from: any BERT checkpoint, or one of ours.
COMPATIBLE_MODEL_TYPES = ("bert", "depthstop_bert")


@strict
class DepthStopBertConfig(BertConfig):
    r"""
    [`BertConfig`] plus the exits and the stopping rule. Every BERT checkpoint's config loads into it.

    Args:
        exit_layers (`list[int]`, *optional*):
            0-based indices of the layers after which an exit head sits (`k` means "after layer k"). Defaults to
            every layer. Sorted on load; the last layer is always an exit (added if missing).
        exit_pooling (`str`, *optional*, defaults to `"cls"`):
            How an exit head pools the sequence: `"cls"` (first token; the final exit then uses BERT's dense+tanh
            pooler, exactly as [`BertForSequenceClassification`]) or `"mean"` (masked mean over real tokens, no
            pooler; right for sentence encoders such as all-MiniLM-L6-v2, trained mean-pooled).
        exit_head_hidden_size (`int`, *optional*):
            Width of a dense + tanh layer in each non-final exit head before its classifier; 0 gives a linear head.
            Defaults to `hidden_size` (the L_depth ablation's winner, benchmarks/results/ablation_ldepth.md: on
            detached features a linear head left early exits far weaker). A head costs 2 d h + 2 h C FLOPs, well
            under 1% of a layer.
        stopping_rule (`str`, *optional*, defaults to `"none"`):
            Inference stopping rule, see [`hf_depthstop.stopping`]: `none`, `static`, `entropy`, `confidence`,
            `patience`, `asti_bound`, `asti`.
        stopping_params (`dict`, *optional*):
            The rule's keyword parameter, e.g. `{"threshold": 0.9}` for `confidence`.
        calibration (`dict`, *optional*):
            Written by [`hf_depthstop.calibrate`]: per-exit temperatures, the ASTI estimator's coefficients, the
            calibrated setting of each rule and the accuracy/compute table. JSON-serialisable, so it travels with
            `save_pretrained` / `push_to_hub`.

    Example:

    ```python
    >>> from hf_depthstop import DepthStopBertConfig, DepthStopBertForSequenceClassification
    >>> config = DepthStopBertConfig(num_hidden_layers=4, exit_layers=[1, 3], num_labels=3)
    >>> model = DepthStopBertForSequenceClassification(config)
    ```
    """

    model_type = "depthstop_bert"

    exit_layers: list[int] | None = None
    exit_pooling: str = "cls"
    exit_head_hidden_size: int | None = None
    stopping_rule: str = "none"
    stopping_params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_exits()

    def validate_exits(self) -> None:
        """Normalise `exit_layers` and check the exit fields; `ValueError` naming the field and value otherwise.

        Runs at construction and again when a model is built, because `from_pretrained(..., **kwargs)` sets
        overriding attributes after construction."""
        validate_exit_fields(self)
        resolve_exit_head_width(self)
        if self.exit_pooling not in EXIT_POOLINGS:
            raise ValueError(f"exit_pooling must be one of {EXIT_POOLINGS}, got {self.exit_pooling!r}")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return adopt_checkpoint_config_dict(
            config_dict, pretrained_model_name_or_path, COMPATIBLE_MODEL_TYPES, "BERT", cls.model_type
        ), kwargs


__all__ = ["DepthStopBertConfig"]
