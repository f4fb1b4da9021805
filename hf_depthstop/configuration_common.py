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


LM_EXIT_ADAPTERS = ("none", "affine")


def validate_lm_exit_head_fields(config) -> None:
    """The decoder LMs' exit-head fields: `exit_adapter` (one of [`LM_EXIT_ADAPTERS`]) and `exit_vocab` (`None`, or a
    non-empty list of distinct token ids in `[0, vocab_size)`, normalised to a sorted list of ints).

    Raises:
        `ValueError` naming the field and the offending value.
    """
    if config.exit_adapter not in LM_EXIT_ADAPTERS:
        raise ValueError(f"exit_adapter must be one of {LM_EXIT_ADAPTERS}, got exit_adapter={config.exit_adapter!r}")
    vocab = config.exit_vocab
    if vocab is None:
        return
    if isinstance(vocab, (str, bytes)) or not hasattr(vocab, "__iter__"):
        raise ValueError(f"exit_vocab must be a list of token ids or None, got exit_vocab={vocab!r}")
    ids = list(vocab)
    bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < config.vocab_size]
    if bad:
        raise ValueError(
            f"exit_vocab must hold token ids in [0, vocab_size={config.vocab_size}), got {bad[:5]} among its values"
        )
    if not ids:
        raise ValueError("exit_vocab must not be empty (use None for the whole vocabulary), got exit_vocab=[]")
    if len(set(ids)) != len(ids):
        raise ValueError(f"exit_vocab must not repeat token ids: {len(ids) - len(set(ids))} duplicates")
    config.exit_vocab = sorted(ids)
