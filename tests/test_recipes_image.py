# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""The image recipe end to end on real MNIST (offline wheel), from scratch at a tiny budget."""

import json
import os
import sys

import pytest
from transformers import AutoModelForImageClassification


RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
sys.path.insert(0, RECIPES)

from train_image_classifier import main, parse_args  # noqa: E402


TINY = ["--train_size", "256", "--validation_size", "200", "--test_size", "100", "--max_steps", "4",
        "--eval_batch_sizes", "64", "--disable_tqdm", "true", "--num_threads", "2"]


@pytest.mark.parametrize(
    "arch, size_flags",
    [
        ("resnet", ["--embedding_size", "8", "--hidden_sizes", "8,16", "--depths", "1,2"]),
        ("vit", ["--hidden_size", "16", "--num_hidden_layers", "3", "--num_attention_heads", "2",
                 "--intermediate_size", "32"]),
    ],
)
def test_image_recipe_end_to_end(tmp_path, capsys, arch, size_flags):
    out = tmp_path / arch
    argv = ["--config", os.path.join(RECIPES, "configs", f"mnist_{arch}.yaml"), *size_flags, *TINY,
            "--output_dir", str(out)]
    args, training_args = parse_args(argv)
    assert args.arch == arch and training_args.depth_terms  # yaml + defaults applied
    results = main(args, training_args)
    assert "| asti |" in capsys.readouterr().out
    rows = {r["rule"]: r for r in results["test"]["batch_64"]}
    assert set(rows) == {"none", "static", "entropy", "confidence", "patience", "asti_bound", "asti"}
    assert rows["none"]["compute_fraction"] == pytest.approx(1.0)
    exits = results["test_exits"]
    num_blocks = 3
    assert exits["exit_layers"] == list(range(num_blocks))
    assert len(exits["exit_accuracy"]) == len(exits["residual_ratio_mean"]) == num_blocks
    assert all(r > 0 for r in exits["residual_ratio_mean"])
    assert 0 < exits["oracle_floor"]["compute_fraction"] <= 1.05  # every head up to the exit is paid for
    saved = json.loads((out / "depthstop_results.json").read_text())
    assert saved["test_exits"]["exit_layers"] == exits["exit_layers"]
    model = AutoModelForImageClassification.from_pretrained(out)
    assert model.config.model_type == f"depthstop_{arch}"
    assert model.config.stopping_rule == "asti" and model.config.calibration is not None
    assert model.config.num_channels == 1 and model.config.num_labels == 10


def test_image_recipe_bad_inputs():
    config = os.path.join(RECIPES, "configs", "mnist_resnet.yaml")
    with pytest.raises(ValueError, match="arch='mlp'"):
        parse_args(["--config", config, "--arch", "mlp"])
    with pytest.raises(SystemExit):  # a yaml key that is no recipe field is refused by the parser
        parse_args(["--config", os.path.join(RECIPES, "configs", "quickstart.yaml")])


def test_image_recipe_bad_hidden_sizes(tmp_path):
    config = os.path.join(RECIPES, "configs", "mnist_resnet.yaml")
    args, training_args = parse_args(["--config", config, "--hidden_sizes", "8,x", *TINY, "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="hidden_sizes='8,x'"):
        main(args, training_args)
