# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the early-exit ResNet image classifier."""

from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import ResNetConfig

from ...configuration_common import adopt_checkpoint_config_dict
from ...stopping import validate_exit_fields


EXIT_MODES = ("block", "stage")
# Checkpoint `model_type`s this config can be built from: any ResNet checkpoint, or one of ours.
COMPATIBLE_MODEL_TYPES = ("resnet", "depthstop_resnet")
# Fields of ours that `from_pretrained(..., **kwargs)` passes to the constructor rather than setting afterwards.
EXIT_FIELDS = ("exit_layers", "exit_mode", "exit_pool_size", "stopping_rule", "stopping_params", "calibration")


@strict
class DepthStopResNetConfig(ResNetConfig):
    r"""
    [`ResNetConfig`] plus the exits and the stopping rule. Every ResNet checkpoint's config loads into it.

    Residual blocks are numbered 0-based across stages: stage 0's blocks are `0 .. depths[0] - 1`, stage 1's follow,
    and so on; `num_hidden_layers` (read-only, not saved) is the number of blocks, `sum(depths)`.

    Args:
        exit_layers (`list[int]`, *optional*):
            0-based flat indices of the residual blocks after which an exit head sits (`k` means "after block k").
            Defaults to every block (`exit_mode="block"`) or to the last block of every stage (`exit_mode="stage"`).
            Sorted on load; the last block is always an exit (added if missing).
        exit_mode (`str`, *optional*, defaults to `"block"`):
            `"block"`: exits may sit after any residual block. `"stage"`: exits only at stage ends (the default
            `exit_layers` are the stage ends, and other entries are rejected).
        exit_pool_size (`int`, *optional*, defaults to 4):
            A non-final exit head average-pools its block's feature map to `exit_pool_size x exit_pool_size` cells
            (adaptive pooling, so any image size works; a map smaller than that is replicated into the cells), then
            flattens and applies one linear layer. 1 gives global average pooling (cheaper, but far weaker early
            exits on CNNs: DESIGN.md section 3). The final exit is always the stock global pool + `classifier`.
        stopping_rule (`str`, *optional*, defaults to `"none"`):
            Inference stopping rule, see [`hf_depthstop.stopping`]: `none`, `static`, `entropy`, `confidence`,
            `patience`, `asti_bound`, `asti`. `static(layer)` takes a 0-based block index.
        stopping_params (`dict`, *optional*):
            The rule's keyword parameter, e.g. `{"threshold": 0.9}` for `confidence`.
        calibration (`dict`, *optional*):
            Written by [`hf_depthstop.calibrate`]: per-exit temperatures, the ASTI estimator's coefficients, the
            calibrated setting of each rule and the accuracy/compute table (JSON, saved with the model).

    Example:

    ```python
    >>> from hf_depthstop import DepthStopResNetConfig, DepthStopResNetForImageClassification
    >>> config = DepthStopResNetConfig(
    ...     embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic", num_labels=3
    ... )
    >>> config.num_hidden_layers, config.exit_layers
    (4, [0, 1, 2, 3])
    >>> model = DepthStopResNetForImageClassification(config)
    ```
    """

    model_type = "depthstop_resnet"

    exit_layers: list[int] | None = None
    exit_mode: str = "block"
    exit_pool_size: int = 4
    stopping_rule: str = "none"
    stopping_params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        # `num_hidden_layers` is derived from `depths`; a config dict that carries it (written by other tools) must
        # agree, and it is not stored
        saved_num_layers = kwargs.pop("num_hidden_layers", None)
        super().__post_init__(**kwargs)
        self.depths = list(self.depths)
        if saved_num_layers is not None:
            self.num_hidden_layers = saved_num_layers  # the setter checks it
        self.validate_exits()

    @property
    def num_hidden_layers(self) -> int:
        """Number of residual blocks, `sum(depths)` (the shared code's name for the number of exit-able blocks)."""
        return sum(self.depths)

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        if value != sum(self.depths):
            raise ValueError(
                f"num_hidden_layers is sum(depths)={sum(self.depths)} for ResNet and cannot be set; got "
                f"num_hidden_layers={value!r} (change depths instead)"
            )

    @property
    def stage_ends(self) -> list[int]:
        """0-based flat index of the last residual block of each stage."""
        ends, total = [], 0
        for depth in self.depths:
            total += depth
            ends.append(total - 1)
        return ends

    def validate_exits(self) -> None:
        """Normalise `exit_layers` and check the exit fields; `ValueError` naming the field and value otherwise.

        Runs at construction and again when a model is built, because `from_pretrained(..., **kwargs)` sets
        overriding attributes after construction."""
        depths = list(self.depths)
        if not depths or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
            raise ValueError(f"depths must be a non-empty list of integers >= 1, got depths={depths!r}")
        if len(self.hidden_sizes) != len(depths):
            raise ValueError(
                f"hidden_sizes and depths must have one entry per stage, got hidden_sizes={list(self.hidden_sizes)} "
                f"and depths={depths}"
            )
        if self.exit_mode not in EXIT_MODES:
            raise ValueError(f"exit_mode must be one of {EXIT_MODES}, got exit_mode={self.exit_mode!r}")
        pool = self.exit_pool_size
        if isinstance(pool, bool) or not isinstance(pool, int) or pool < 1:
            raise ValueError(f"exit_pool_size must be an integer >= 1, got exit_pool_size={pool!r}")
        stage_ends = list(self.stage_ends)
        validate_exit_fields(
            self,
            default_exits=None if self.exit_mode == "block" else stage_ends,
            allowed=stage_ends if self.exit_mode == "stage" else None,
            unit="residual block",
            allowed_reason="exit_mode='stage' allows exits only at stage ends",
        )
        if isinstance(self.num_labels, bool) or self.num_labels < 1:
            raise ValueError(
                f"num_labels must be >= 1 for a classifier with exits, got num_labels={self.num_labels!r}"
            )

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """[`PreTrainedConfig.from_dict`], but the exit fields among `kwargs` are construction arguments (validated
        together), so `from_pretrained(stock_path, exit_mode="stage")` gets the stage-end exits by default."""
        config_dict = dict(config_dict)
        for name in EXIT_FIELDS:
            if name in kwargs:
                config_dict[name] = kwargs.pop(name)
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return adopt_checkpoint_config_dict(
            config_dict, pretrained_model_name_or_path, COMPATIBLE_MODEL_TYPES, "ResNet", cls.model_type
        ), kwargs


__all__ = ["DepthStopResNetConfig"]
