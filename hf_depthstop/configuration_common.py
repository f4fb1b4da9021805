# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""What the `DepthStop*` configs share besides the exit-field validation (`stopping.validate_exit_fields`)."""


def adopt_checkpoint_config_dict(
    config_dict: dict, source, compatible: tuple[str, ...], architecture: str, model_type: str
) -> dict:
    """The config dict of checkpoint `source`, checked and adopted: its `model_type` must be one of `compatible` (the
    stock architecture's or ours), and becomes `model_type` (ours), so a stock config loads without a mismatch warning.

    Raises:
        `ValueError` naming the checkpoint and its `model_type`.
    """
    found = config_dict.get("model_type")
    if found not in compatible:
        raise ValueError(
            f"{source!r} is not a {architecture} checkpoint: its config has model_type={found!r}, expected one of "
            f"{compatible}"
        )
    config_dict["model_type"] = model_type
    return config_dict


def resolve_exit_head_width(config) -> None:
    """`config.exit_head_hidden_size`: `None` becomes `hidden_size`; anything but an integer >= 0 is a `ValueError`."""
    if config.exit_head_hidden_size is None:
        config.exit_head_hidden_size = config.hidden_size
    width = config.exit_head_hidden_size
    if isinstance(width, bool) or not isinstance(width, int) or width < 0:
        raise ValueError(f"exit_head_hidden_size must be an integer >= 0, got {config.exit_head_hidden_size!r}")
