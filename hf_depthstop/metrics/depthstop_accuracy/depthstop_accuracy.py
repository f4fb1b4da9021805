# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Accuracy of an early-exit classifier together with the depth and compute it used."""

# `evaluate` copies this file into its modules cache and imports it from there, so it must stay self-contained: it may
# import installed libraries but nothing from `hf_depthstop`. Load it with `hf_depthstop.metrics.load_depthstop_metric`
# or `evaluate.load("<path of this folder>")`; both work offline.

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Accuracy of an early-exit classifier, reported together with how deep the examples went and how much compute they
used. Each example carries the 0-based index of the layer whose exit produced its prediction (`exit_layers`) and the
FLOPs it used divided by the FLOPs of the full model (`compute_fractions`, in (0, 2]: just above 1 when every exit
head ran to full depth).

`speedup` is the FLOPs speed-up `1 / mean_compute_fraction`, the ratio of full-model FLOPs to the FLOPs actually
spent over the evaluated examples. It is not a wall-clock speed-up: that depends on batching, hardware and the
overhead of the exit heads, and is measured by the project's benchmarks.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`):
        Predicted class ids, taken from the exit each example stopped at.
    references (`list[int]`):
        Ground-truth class ids.
    exit_layers (`list[int]`):
        0-based index of the layer whose exit was used for each example (the last layer for examples that ran the full
        model). Must be non-negative.
    compute_fractions (`list[float]`):
        FLOPs used for each example divided by the FLOPs of the full model, in (0, 2]: it is slightly above 1 when a
        rule evaluated every exit head and still ran to full depth.

Returns:
    accuracy (`float`): Fraction of examples with `predictions == references`.
    mean_exit_layer (`float`): Mean of `exit_layers` (0-based).
    mean_compute_fraction (`float`): Mean of `compute_fractions`.
    speedup (`float`): FLOPs speed-up `1 / mean_compute_fraction` (not a wall-clock speed-up).

Examples:
    >>> metric = evaluate.load("hf_depthstop/metrics/depthstop_accuracy")
    >>> metric.compute(
    ...     predictions=[0, 1, 2, 1],
    ...     references=[0, 1, 1, 1],
    ...     exit_layers=[0, 2, 5, 5],
    ...     compute_fractions=[0.25, 0.5, 1.0, 1.0],
    ... )
    {'accuracy': 0.75, 'mean_exit_layer': 3.0, 'mean_compute_fraction': 0.6875, 'speedup': 1.4545454545454546}
"""

_CITATION = ""


def _validate(exit_layers, compute_fractions) -> None:
    """Raises a `ValueError` naming the field and the first bad value, before anything is written to the cache."""
    if exit_layers is not None:
        layers = np.asarray(exit_layers)
        bad = layers < 0
        if bad.any():
            raise ValueError(
                f"`exit_layers` must be non-negative 0-based layer indices, got exit_layers value {layers[bad][0]}."
            )
    if compute_fractions is not None:
        fractions = np.asarray(compute_fractions, dtype=np.float64)
        # Written so that NaN counts as out of range.
        bad = ~((fractions > 0) & (fractions <= 2))
        if bad.any():
            raise ValueError(
                f"`compute_fractions` must be in (0, 2], got compute_fractions value {fractions[bad][0]}."
            )


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DepthstopAccuracy(evaluate.Metric):
    """Accuracy, mean exit layer, mean compute fraction and FLOPs speed-up of an early-exit classifier."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                    "exit_layers": datasets.Value("int64"),
                    "compute_fractions": datasets.Value("float64"),
                }
            ),
            license="Apache-2.0",
        )

    # Validation happens when inputs are added (`compute` adds its inputs through `add_batch`), because an error raised
    # later, inside `_compute`, would leave evaluate's cache file and lock behind.
    def add_batch(self, *, predictions=None, references=None, **kwargs) -> None:
        """Validates a batch of examples and adds it to the metric's stack."""
        _validate(kwargs.get("exit_layers"), kwargs.get("compute_fractions"))
        super().add_batch(predictions=predictions, references=references, **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs) -> None:
        """Validates one example and adds it to the metric's stack."""
        exit_layer, compute_fraction = kwargs.get("exit_layers"), kwargs.get("compute_fractions")
        _validate(
            None if exit_layer is None else [exit_layer], None if compute_fraction is None else [compute_fraction]
        )
        super().add(prediction=prediction, reference=reference, **kwargs)

    def _compute(self, predictions, references, exit_layers, compute_fractions) -> dict[str, float]:
        if len(predictions) == 0:
            raise ValueError("`predictions` is empty: the metric needs at least one example.")
        predictions, references = np.asarray(predictions), np.asarray(references)
        mean_compute_fraction = float(np.mean(compute_fractions))
        return {
            "accuracy": float(np.mean(predictions == references)),
            "mean_exit_layer": float(np.mean(exit_layers)),
            "mean_compute_fraction": mean_compute_fraction,
            "speedup": 1.0 / mean_compute_fraction,
        }
