# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""The training recipe end to end on the real offline checkpoint and data, at a tiny budget."""

import json
import os
import sys

import pytest
from transformers import AutoModelForSequenceClassification


RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")
sys.path.insert(0, RECIPES)

from train_classifier import main, parse_args  # noqa: E402


@pytest.mark.slow
def test_quickstart_recipe_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", os.path.join(RECIPES, "configs", "quickstart.yaml"), "--n_train", "64", "--n_val", "120",
            "--n_test", "60", "--max_steps", "2", "--eval_batch_sizes", "32", "--output_dir", str(out),
            "--disable_tqdm", "true"]
    script_args, training_args = parse_args(argv)
    assert training_args.depth_terms and script_args.exit_pooling == "mean"  # yaml + defaults applied
    results = main(script_args, training_args)
    printed = capsys.readouterr().out
    assert "| asti |" in printed and "measured speed-up" in printed
    rows = {r["rule"]: r for r in results["test"]["batch_32"]}
    assert set(rows) == {"none", "static", "entropy", "confidence", "patience", "asti_bound", "asti"}
    assert rows["none"]["speedup"] == 1.0 and rows["none"]["compute_fraction"] == pytest.approx(1.0)
    # a rule that evaluates every exit head and still runs to full depth spends a little more than the full model
    assert all(0 < r["compute_fraction"] <= 1.01 for r in rows.values())
    saved = json.loads((out / "depthstop_results.json").read_text())
    assert saved["calibration"]["settings"].keys() == results["calibration"]["settings"].keys()
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "DepthStopBertForSequenceClassification"
    assert model.config.stopping_rule == "asti" and model.config.calibration is not None
    assert (out / "tokenizer.json").exists() or (out / "vocab.txt").exists()


def test_recipe_rejects_unknown_flags(tmp_path):
    with pytest.raises(ValueError, match="no_such_flag"):
        parse_args(["--config", os.path.join(RECIPES, "configs", "quickstart.yaml"), "--no_such_flag", "1"])
