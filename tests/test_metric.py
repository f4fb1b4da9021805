# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
import math
import os
import socket

import numpy as np
import pytest
import torch

from hf_depthstop.metrics import DEPTHSTOP_ACCURACY_PATH, load_depthstop_metric


# 4 hand-made examples: 3 correct; exits at layers 0, 2, 5, 5 of a 6-layer model.
EXAMPLE = {
    "predictions": [0, 1, 2, 1],
    "references": [0, 1, 1, 1],
    "exit_layers": [0, 2, 5, 5],
    "compute_fractions": [0.25, 0.5, 1.0, 1.0],
}
EXPECTED = {"accuracy": 0.75, "mean_exit_layer": 12 / 4, "mean_compute_fraction": 2.75 / 4, "speedup": 4 / 2.75}


@pytest.fixture
def metric():
    return load_depthstop_metric(keep_in_memory=True)


def test_loads_offline_from_the_package(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    # Any attempt to reach the Hub (requests, httpx, urllib) goes through one of these.
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    assert os.path.isfile(os.path.join(DEPTHSTOP_ACCURACY_PATH, "depthstop_accuracy.py"))
    metric = load_depthstop_metric()  # default kwargs: results go through evaluate's on-disk cache
    assert metric.name == "depthstop_accuracy"
    assert metric.compute(**EXAMPLE) == pytest.approx(EXPECTED)


def test_hand_made_example(metric):
    result = metric.compute(**EXAMPLE)
    assert set(result) == {"accuracy", "mean_exit_layer", "mean_compute_fraction", "speedup"}
    assert result == pytest.approx(EXPECTED)
    assert result["speedup"] == pytest.approx(1 / result["mean_compute_fraction"])


def test_full_depth_has_no_speedup(metric):
    result = metric.compute(predictions=[1, 0], references=[0, 0], exit_layers=[5, 5], compute_fractions=[1.0, 1.0])
    assert result == {"accuracy": 0.5, "mean_exit_layer": 5.0, "mean_compute_fraction": 1.0, "speedup": 1.0}


def test_batches_and_tensors_accumulate(metric):
    # Two batches of tensors (as in an evaluation loop) give the same result as one call on the 4 examples.
    for start in (0, 2):
        metric.add_batch(**{key: torch.tensor(values[start : start + 2]) for key, values in EXAMPLE.items()})
    assert metric.compute() == pytest.approx(EXPECTED)
    for i in range(4):
        metric.add(
            prediction=EXAMPLE["predictions"][i],
            reference=EXAMPLE["references"][i],
            exit_layers=EXAMPLE["exit_layers"][i],
            compute_fractions=EXAMPLE["compute_fractions"][i],
        )
    assert metric.compute() == pytest.approx(EXPECTED)


@pytest.mark.parametrize(
    "field, bad_value",
    [
        ("exit_layers", -1),
        ("compute_fractions", 0.0),
        ("compute_fractions", -0.5),
        ("compute_fractions", 2.5),
        ("compute_fractions", math.nan),
    ],
)
def test_bad_inputs_raise(metric, field, bad_value):
    inputs = {key: list(values) for key, values in EXAMPLE.items()}
    inputs[field][1] = bad_value
    with pytest.raises(ValueError, match=rf"`{field}`.*{bad_value}"):
        metric.compute(**inputs)
    with pytest.raises(ValueError, match=f"`{field}`"):
        metric.add(prediction=0, reference=0, **{"exit_layers": 0, "compute_fractions": 1.0, field: bad_value})
    # Nothing from the rejected inputs was kept.
    assert metric.compute(**EXAMPLE) == pytest.approx(EXPECTED)


def test_empty_input_raises(metric):
    with pytest.raises(ValueError, match="empty"):
        metric.compute(predictions=[], references=[], exit_layers=[], compute_fractions=np.array([]))


def test_all_heads_at_full_depth_is_accepted(metric):
    # A rule that evaluated every exit head and never fired spends a little more than the full model.
    result = metric.compute(predictions=[0], references=[0], exit_layers=[5], compute_fractions=[1.0031])
    assert result["mean_compute_fraction"] == pytest.approx(1.0031) and result["speedup"] < 1.0
