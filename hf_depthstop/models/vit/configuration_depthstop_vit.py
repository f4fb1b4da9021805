# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the early-exit ViT image classifier."""

from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import ViTConfig

from ...configuration_common import adopt_checkpoint_config_dict, resolve_exit_head_width
from ...stopping import validate_exit_fields


# Checkpoint `model_type`s this config can be built from: any ViT checkpoint, or one of ours.
COMPATIBLE_MODEL_TYPES = ("vit", "depthstop_vit")


def _pair(value) -> tuple[int, int]:
    """`image_size` / `patch_size` as (height, width): an int means a square."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value, value)


@strict
class DepthStopViTConfig(ViTConfig):
    r"""
    [`ViTConfig`] plus the exits and the stopping rule. Every ViT checkpoint's config loads into it.

    Every exit reads the [CLS] token after the backbone's final `layernorm` (the same layer norm for every exit, as
    [`ViTForImageClassification`] reads it after the last layer), then its own head.

    Args:
        exit_layers (`list[int]`, *optional*):
            0-based indices of the layers after which an exit head sits (`k` means "after layer k"). Defaults to
            every layer. Sorted on load; the last layer is always an exit (added if missing).
        exit_head_hidden_size (`int`, *optional*):
            Width of a dense + tanh layer in each non-final exit head before its classifier; 0 gives a linear head.
            Defaults to `hidden_size`, as the early-exit BERT (its L_depth ablation: on detached features a linear
            head left early exits far weaker). A head costs 2 d h + 2 h C FLOPs, well under 1% of a layer. The final
            exit is always the stock linear `classifier`.
        stopping_rule (`str`, *optional*, defaults to `"none"`):
            Inference stopping rule, see [`hf_depthstop.stopping`]: `none`, `static`, `entropy`, `confidence`,
            `patience`, `asti_bound`, `asti`.
        stopping_params (`dict`, *optional*):
            The rule's keyword parameter, e.g. `{"threshold": 0.9}` for `confidence`.
        calibration (`dict`, *optional*):
            Written by [`hf_depthstop.calibrate`]: per-exit temperatures, the ASTI estimator's coefficients, the
            calibrated setting of each rule and the accuracy/compute table. JSON-serialisable, so it travels with
            `save_pretrained` / `push_to_hub`.

    `image_size` must be divisible by `patch_size` (per side); `ValueError` otherwise.

    Example:

    ```python
    >>> from hf_depthstop import DepthStopViTConfig, DepthStopViTForImageClassification
    >>> config = DepthStopViTConfig(
    ...     image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
    ...     intermediate_size=64, num_labels=10, exit_layers=[1, 3],
    ... )
    >>> model = DepthStopViTForImageClassification(config)
    ```
    """

    model_type = "depthstop_vit"

    exit_layers: list[int] | None = None
    exit_head_hidden_size: int | None = None
    stopping_rule: str = "none"
    stopping_params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.validate_exits()

    def validate_exits(self) -> None:
        """Normalise `exit_layers` and check the exit fields and the patch grid; `ValueError` naming the field and
        value otherwise.

        Runs at construction and again when a model is built, because `from_pretrained(..., **kwargs)` sets
        overriding attributes after construction."""
        image, patch = _pair(self.image_size), _pair(self.patch_size)
        if (
            len(image) != 2
            or len(patch) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) for v in image + patch)
        ):
            raise ValueError(
                f"image_size and patch_size must be ints or (height, width) pairs of ints, got "
                f"image_size={self.image_size!r}, patch_size={self.patch_size!r}"
            )
        if min(patch) < 1 or min(image) < 1 or image[0] % patch[0] or image[1] % patch[1]:
            raise ValueError(
                f"image_size={self.image_size!r} must be a positive multiple of patch_size={self.patch_size!r} "
                "on each side (the image is cut into whole patches)"
            )
        if isinstance(self.num_channels, bool) or not isinstance(self.num_channels, int) or self.num_channels < 1:
            raise ValueError(f"num_channels must be an integer >= 1, got {self.num_channels!r}")
        validate_exit_fields(self)
        resolve_exit_head_width(self)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return adopt_checkpoint_config_dict(
            config_dict, pretrained_model_name_or_path, COMPATIBLE_MODEL_TYPES, "ViT", cls.model_type
        ), kwargs


__all__ = ["DepthStopViTConfig"]
