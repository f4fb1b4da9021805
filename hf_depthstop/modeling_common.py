# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""What the early-exit classifiers share around their layer loops (which each model file writes out): the loading
checks, the stopping rule and its cache, the exit temperatures."""

from transformers.utils import logging

from .stopping import build_rule, validate_rule


logger = logging.get_logger(__name__)


class DepthStopClassifierMixin:
    """Mixin of `DepthStop*For{Sequence,Image}Classification`, placed before the `PreTrainedModel` base.

    The class sets `_head_architecture` (the suffix of the stock classifier class names whose checkpoints carry a
    trained head, e.g. `"SequenceClassification"`) and has `exit_heads`, `classifier` and `_exit_lipschitz()`.
    """

    _head_architecture = "Classification"

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """[`PreTrainedModel.from_pretrained`], plus: a clear error when `num_labels` contradicts a fine-tuned
        checkpoint's head or `exit_layers` the checkpoint's exits, and one warning naming the exit heads that are new
        (randomly initialised)."""
        num_labels, requested = kwargs.get("num_labels"), kwargs.get("exit_layers")
        if (num_labels is not None or requested is not None) and "config" not in kwargs:
            config_dict, _ = cls.config_class.get_config_dict(  # read once, for both checks
                pretrained_model_name_or_path,
                **{k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs},
            )
            archs = config_dict.get("architectures") or []
            saved = len(config_dict["id2label"]) if config_dict.get("id2label") else None
            if (
                num_labels is not None
                and not kwargs.get("ignore_mismatched_sizes", False)
                and saved is not None
                and saved != num_labels
                and any(cls._head_architecture in a for a in archs)
            ):
                raise ValueError(
                    f"num_labels={num_labels} does not match the checkpoint's classification head ({saved} labels) "
                    f"in {pretrained_model_name_or_path!r}; pass ignore_mismatched_sizes=True to re-initialise the heads"
                )
            saved_exits = config_dict.get("exit_layers")
            if requested is not None and saved_exits and sorted(set(requested) | {saved_exits[-1]}) != saved_exits:
                raise ValueError(
                    f"exit_layers={requested} differs from the checkpoint's exit_layers={saved_exits}: exit heads are "
                    "stored by position, so they would land on the wrong layers. Load with the saved exit layers, or "
                    "from the backbone checkpoint the heads were not trained on"
                )
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        missing = info.get("missing_keys", [])
        new_heads = sorted(
            {".".join(k.split(".")[:2]) for k in missing if k.startswith("exit_heads.")}
            | {k.split(".")[0] for k in missing if k.startswith("classifier.")}
        )
        if new_heads:
            logger.warning(
                f"{cls.__name__}: these exit heads are new (randomly initialised) and need training: "
                f"{', '.join(new_heads)}"
            )
        return (model, info) if want_info else model

    def set_stopping_rule(self, name: str, **params) -> None:
        """Choose the inference stopping rule, stored in `config` (saved with the model).

        Args:
            name (`str`): `none`, `static`, `entropy`, `confidence`, `patience`, `asti_bound` or `asti`.
            **params: the rule's one keyword parameter: `static(layer)` (0-based block index), `entropy(threshold)`,
                `confidence(threshold)`, `patience(patience)`, `asti_bound(cost)`, `asti(cost)` (`asti` without
                `cost` uses the calibrated setting).
        """
        params = validate_rule(name, params, self.config.exit_layers, self.config.calibration)
        self.config.stopping_rule = name
        self.config.stopping_params = params

    def _rule(self, name: str, params: dict):
        """The rule object, cached until the rule, the calibration or (for `asti_bound`) the head weights change."""
        key = (name, tuple(sorted(params.items())), id(self.config.calibration))
        if name == "asti_bound":  # its Lipschitz constants come from the head weights
            key += tuple(p._version for p in self.parameters() if p.dim() == 2 and p.shape[0] == self.num_labels)
        cached = getattr(self, "_cached_rule", None)
        if cached is None or cached[0] != key:
            lipschitz = self._exit_lipschitz() if name == "asti_bound" else None
            self._cached_rule = (key, build_rule(name, params, self.config.calibration, lipschitz))
        return self._cached_rule[1]

    def _exit_temperatures(self) -> list[float]:
        """Per-exit temperatures of the calibration (1.0 each when uncalibrated)."""
        calib = self.config.calibration
        if calib and calib.get("temperatures"):
            return [float(t) for t in calib["temperatures"]]
        return [1.0] * len(self.config.exit_layers)


__all__ = ["DepthStopClassifierMixin"]
