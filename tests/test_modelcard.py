# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Model cards: metadata, usage, exits and rule, calibration table and plot; re-saving keeps the hand-written prose."""

import copy
import importlib.util
import json
import re
from pathlib import Path

import matplotlib.image
import pytest
import torch
from huggingface_hub import ModelCard

from hf_depthstop import DepthStopBertForSequenceClassification, calibrate, compare_rules
from hf_depthstop.evaluation import rules_from_calibration
from hf_depthstop.modelcard import PLOT_FILENAME, write_model_card
from tests.testing_utils import tiny_bert_config, tiny_task


REPO_ROOT = Path(__file__).resolve().parents[1]


def block(text: str, name: str) -> str:
    match = re.search(rf"<!-- hf_depthstop:begin {name} -->\n(.*?)\n<!-- hf_depthstop:end {name} -->", text, re.DOTALL)
    assert match, f"block {name} missing"
    return match.group(1)


@pytest.fixture(scope="module")
def calibrated():
    torch.manual_seed(0)
    model = DepthStopBertForSequenceClassification(tiny_bert_config()).eval()
    calibrate(model, tiny_task(128, seed=1), rule="confidence")
    return model


def test_card_has_metadata_usage_exits_table_and_plot(calibrated, tmp_path):
    calibrated.save_pretrained(
        tmp_path, model_card={
            "repo_id": "me/tiny-depthstop", "base_model": "google-bert/bert-base-uncased", "datasets": ["me/tiny"],
            "language": "en", "license": "apache-2.0", "tags": ["demo"],
        },
    )
    card = ModelCard.load(tmp_path / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-classification"
    assert data["base_model"] == "google-bert/bert-base-uncased" and data["datasets"] == ["me/tiny"]
    assert data["language"] == "en" and data["license"] == "apache-2.0"
    assert {"early-exit", "hf_depthstop", "depthstop_bert", "stopping-rule-confidence", "demo"} <= set(data["tags"])

    usage = block(card.text, "usage")
    assert 'AutoModelForSequenceClassification.from_pretrained("me/tiny-depthstop").eval()' in usage
    assert 'from_pretrained("me/tiny-depthstop", trust_remote_code=True)' in usage
    exits = block(card.text, "exits")
    threshold = calibrated.config.stopping_params["threshold"]
    assert "[0, 1, 2, 3] (0-based; 4 exits over 4 layers)" in exits
    assert f"`confidence` (threshold={threshold:.4g})" in exits
    table = block(card.text, "calibration")
    assert "| rule | setting | accuracy | drop (pts) | mean exit layer | compute | FLOPs speed-up |" in table
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| rule")]
    expected = [row["rule"] for row in calibrated.config.calibration["table"]] + ["oracle floor"]
    assert [r.split("|")[1].strip() for r in rows] == expected
    first = calibrated.config.calibration["table"][0]
    assert f"| {100 * first['accuracy']:.2f} |" in rows[0] and f"{first['flops_speedup']:.2f}x" in rows[0]
    assert f"![Accuracy vs compute]({PLOT_FILENAME})" in table
    image = matplotlib.image.imread(tmp_path / PLOT_FILENAME)
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_resave_updates_metadata_and_tables_and_keeps_prose(calibrated, tmp_path):
    model = copy.deepcopy(calibrated)  # the fixture is shared: its config must not change
    model.save_pretrained(tmp_path, model_card={"license": "mit"})
    readme = tmp_path / "README.md"
    text = readme.read_text()
    intro = text.split("\n\n")[2]
    assert intro.startswith("An early-exit model")
    text = text.replace(intro, "My own introduction, written by hand.")
    text = text.replace("Describe the training data, the intended use and the known limitations here.",
                        "Trained on my data. Do not use for medical decisions.")
    text += "\n## Citation\n\nPlease cite us.\n"
    text = text.replace("license: mit", "license: mit\nlanguage: fr")
    readme.write_text(text)

    model.set_stopping_rule("patience", patience=2)
    model.config.calibration = None
    model.save_pretrained(tmp_path, model_card={"datasets": ["me/new-data"]})
    card = ModelCard.load(readme)
    for prose in ("My own introduction, written by hand.", "Trained on my data. Do not use for medical decisions.",
                  "## Citation\n\nPlease cite us."):
        assert prose in card.text
    assert "An early-exit model" not in card.text
    assert card.data.license == "mit" and card.data.language == "fr" and card.data.datasets == ["me/new-data"]
    assert "stopping-rule-patience" in card.data.tags and "stopping-rule-confidence" not in card.data.tags
    assert "`patience` (patience=2)" in block(card.text, "exits") and "confidence" not in block(card.text, "exits")
    assert block(card.text, "calibration").startswith("Not calibrated yet")
    assert card.text.count("<!-- hf_depthstop:begin exits -->") == 1


def test_card_without_markers_keeps_its_text_and_gets_the_blocks(calibrated, tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n\n# Mine\n\nMy text, no markers.\n")
    write_model_card(calibrated, tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.text.startswith("\n# Mine\n\nMy text, no markers.\n") and card.data.license == "mit"
    for name in ("usage", "exits", "calibration"):
        block(card.text, name)
    assert "<repo_id>" in block(card.text, "usage")
    write_model_card(calibrated, tmp_path, repo_id="me/x")  # a second save replaces, never duplicates
    text = (tmp_path / "README.md").read_text()
    assert text.count("<!-- hf_depthstop:begin usage -->") == 1 and '"me/x"' in text and "<repo_id>" not in text


def test_measured_rows_from_the_recipe_results_are_tabled_and_kept(calibrated, tmp_path):
    rules = rules_from_calibration(calibrated)
    rows = compare_rules(calibrated, tiny_task(16, seed=3), rules, batch_size=16, repeats=1)
    (tmp_path / "depthstop_results.json").write_text(json.dumps({"test": {"batch_16": rows}}, default=float))
    write_model_card(calibrated, tmp_path)
    measured = block((tmp_path / "README.md").read_text(), "measured")
    assert "**test split, batch 16**" in measured and "| rule | setting | accuracy | mean exit layer |" in measured
    assert len([line for line in measured.splitlines() if line.startswith("| none |")]) == 1
    (tmp_path / "depthstop_results.json").unlink()
    write_model_card(calibrated, tmp_path)  # no new measurements: the block stays as it was
    assert block((tmp_path / "README.md").read_text(), "measured") == measured


def test_uncalibrated_card_has_no_plot(tmp_path):
    model = DepthStopBertForSequenceClassification(tiny_bert_config())
    write_model_card(model, tmp_path, model_name="Tiny")
    text = (tmp_path / "README.md").read_text()
    assert "\n# Tiny\n" in text and block(text, "calibration").startswith("Not calibrated yet")
    assert not (tmp_path / PLOT_FILENAME).exists()


def test_bad_inputs_raise_before_writing(calibrated, tmp_path):
    with pytest.raises(TypeError, match="model must be a DepthStop\\* model or config"):
        write_model_card(object(), tmp_path)
    with pytest.raises(ValueError, match="repo_id must be a non-empty string, got ''"):
        write_model_card(calibrated, tmp_path, repo_id="")
    with pytest.raises(ValueError, match="measured must be a dict of label -> list of rule rows, got str"):
        write_model_card(calibrated, tmp_path, measured="rows")
    assert not any(tmp_path.iterdir())


def _load_script():
    spec = importlib.util.spec_from_file_location("make_model_cards", REPO_ROOT / "scripts" / "make_model_cards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_model_cards_script(calibrated, tmp_path):
    script = _load_script()
    calibrated.save_pretrained(tmp_path / "outputs" / "quickstart")
    written = script.main(["--model_dirs", str(tmp_path / "outputs" / "quickstart"), "--output_dir",
                           str(tmp_path / "model_cards")])
    card_dir = tmp_path / "model_cards" / "quickstart"
    assert written == [card_dir / "README.md"] and (card_dir / PLOT_FILENAME).is_file()
    card = ModelCard.load(card_dir / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert 'from_pretrained("hf-depthstop/quickstart", trust_remote_code=True)' in card.text
    with pytest.raises(SystemExit, match="no saved model in .*missing.*config.json"):
        script.main(["--model_dirs", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "model_cards")])
