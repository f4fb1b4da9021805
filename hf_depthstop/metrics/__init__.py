# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""`evaluate` metric modules shipped with hf_depthstop, loadable offline by path."""

import os

import evaluate


DEPTHSTOP_ACCURACY_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "depthstop_accuracy")
"""Absolute path of the `depthstop_accuracy` metric folder, usable as `evaluate.load(DEPTHSTOP_ACCURACY_PATH)`."""


def load_depthstop_metric(**kwargs) -> evaluate.EvaluationModule:
    """
    Loads the `depthstop_accuracy` metric shipped inside the package.

    The metric reports `accuracy`, `mean_exit_layer` (0-based), `mean_compute_fraction` and `speedup` (the FLOPs
    speed-up `1 / mean_compute_fraction`; wall-clock speed-ups are measured by the benchmarks). It is loaded from a
    local path, so it needs no network access and works with `HF_HUB_OFFLINE=1`, unlike `evaluate.load("accuracy")`.

    Args:
        kwargs (additional keyword arguments, *optional*):
            Passed to [`evaluate.load`], for example `experiment_id`, `num_process`, `process_id` or `keep_in_memory`.

    Returns:
        [`evaluate.EvaluationModule`]: The metric. Its `compute` takes `predictions`, `references`, `exit_layers` and
        `compute_fractions`.

    Example:

    ```python
    >>> from hf_depthstop.metrics import load_depthstop_metric

    >>> metric = load_depthstop_metric()
    >>> metric.compute(predictions=[1, 0], references=[1, 1], exit_layers=[1, 5], compute_fractions=[0.5, 1.0])
    {'accuracy': 0.5, 'mean_exit_layer': 3.0, 'mean_compute_fraction': 0.75, 'speedup': 1.3333333333333333}
    ```
    """
    return evaluate.load(DEPTHSTOP_ACCURACY_PATH, **kwargs)
