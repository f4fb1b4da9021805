# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""The `hf-depthstop` command line on a tiny saved early-exit BERT (with the real MiniLM tokenizer) and the
offline tweets: the real entry point in subprocesses (`python -m hf_depthstop.cli`, the `hf-depthstop` console
script) for calibrate, evaluate and push (against tests/hub_server.py, also a refused push); `cli.main(argv)`
in-process for the help texts, every bad input (exit code 2, message naming the value), demo and a tiny `train`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from hf_depthstop import DepthStopViTForImageClassification, cli
from hf_depthstop.calibration import CALIBRATED_RULES
from hf_depthstop.data import minilm_checkpoint_path
from tests.hub_server import DEFAULT_TOKEN, HubServer
from tests.testing_utils import tiny_vit_config, train_tiny_model


REPO_ROOT = Path(__file__).resolve().parents[1]
LABELS = {
    "id2label": {0: "negative", 1: "neutral", 2: "positive"},
    "label2id": {"negative": 0, "neutral": 1, "positive": 2},
}


def run_cli(*args: str, env: dict | None = None, script: bool = False) -> subprocess.CompletedProcess:
    """The real command in a fresh process: `python -m hf_depthstop.cli` or the installed `hf-depthstop` script."""
    if script:
        exe = Path(sys.executable).parent / "hf-depthstop"
        if not exe.is_file():
            pytest.skip(f"console script not installed next to {sys.executable} (run `pip install -e .`)")
        cmd = [str(exe), *args]
    else:
        cmd = [sys.executable, "-m", "hf_depthstop.cli", *args]
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT, env={**base, **(env or {})})


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """`cli.main(args)` in this process: (exit code, stdout, stderr); argparse's own exits count as codes."""
    try:
        code = cli.main(list(args))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A tiny early-exit BERT (vocab of the real MiniLM tokenizer), trained a few steps, saved with that tokenizer."""
    root = tmp_path_factory.mktemp("cli")
    model, _ = train_tiny_model(str(root / "train"), steps=6, vocab_size=30522, max_position_embeddings=128, **LABELS)
    folder = root / "tiny"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_checkpoint_path()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_model(tmp_path_factory) -> Path:
    """A tiny early-exit ViT (3 labels, 16x16 one-channel images), untrained: only its type and shape matter."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cli_vit") / "vit"
    DepthStopViTForImageClassification(tiny_vit_config()).save_pretrained(folder)
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------------------------
# the real entry point (subprocesses)
# ------------------------------------------------------------------------------------------------------------
def test_calibrate_then_evaluate_in_real_processes(saved_model, tmp_path):
    before = _files(saved_model)
    out = tmp_path / "calibrated"
    res = run_cli(
        "calibrate",
        str(saved_model),
        *"--dataset tweets --max_examples 120 --target 0.02".split(),
        "--output_dir",
        str(out),
    )
    assert res.returncode == 0, res.stderr
    assert "| asti |" in res.stdout and "oracle floor" in res.stdout and str(out) in res.stdout
    assert "exit outputs" in res.stderr  # the calibration's progress bar
    assert _files(saved_model) == before  # the input folder is untouched
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model).__name__ == "DepthStopBertForSequenceClassification"
    assert model.config.stopping_rule == "asti" and model.config.calibration["settings"]["asti"]
    assert AutoTokenizer.from_pretrained(out)("a tweet")["input_ids"][0] == 101  # the tokenizer went along
    info = json.loads((out / "depthstop_calibration.json").read_text())
    source = info["calibrated_on"]
    assert source["model"] == str(saved_model) and source["n_examples"] == 120 and source["target"] == 0.02
    assert (source["dataset"], source["split"], source["target_type"]) == ("tweets", "validation", "max_accuracy_drop")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    plot, results = tmp_path / "figs" / "rules.png", tmp_path / "rules.json"
    flags = "--dataset tweets --max_examples 60 --batch_size 32".split()
    # the installed console script
    res = run_cli("evaluate", str(out), *flags, "--plot", str(plot), "--output", str(results), script=True)
    assert res.returncode == 0, res.stderr
    assert "| none |" in res.stdout and "| oracle floor |" in res.stdout and "rules (batch 32)" in res.stderr
    data = json.loads(results.read_text())
    assert data["n_examples"] == 60 and data["split"] == "test" and data["model_rule"]["rule"] == "asti"
    assert {r["rule"] for r in data["rules"]} == {"none", *CALIBRATED_RULES}
    none = next(r for r in data["rules"] if r["rule"] == "none")
    assert none["compute_fraction"] == pytest.approx(1.0) and none["mean_exit_layer"] == 3.0
    assert data["exit_layers"] == [0, 1, 2, 3] and len(data["exit_accuracy"]) == 4
    assert data["oracle_floor"]["accuracy"] == pytest.approx(none["accuracy"])  # the floor keeps full-depth accuracy
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000


def test_push_to_local_hub_server(saved_model, tmp_path):
    """A refused push (wrong --token) exits 1 with the reason and leaves the folder alone; the retry uploads the
    weights, config, remote code, card, plot and tokenizer, and prints the repo URL."""
    before = _files(saved_model)
    with HubServer() as hub:
        env = {
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": DEFAULT_TOKEN,
            "HF_HOME": str(tmp_path / "home"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        res = run_cli("push", str(saved_model), "--repo_id", "tester/tiny-cli", "--token", "hf_wrong", env=env)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "authentication failed" in res.stderr and "tester/tiny-cli" in res.stderr
        assert _files(saved_model) == before

        res = run_cli("push", str(saved_model), "--repo_id", "tester/tiny-cli", env=env)
        assert res.returncode == 0, res.stderr
        assert f"{hub.url}/tester/tiny-cli" in res.stdout
        files = set(hub.repos["tester/tiny-cli"].files)
        assert {
            "config.json",
            "model.safetensors",
            "README.md",
            "tokenizer.json",
            "modeling_depthstop_bert.py",
            "configuration_depthstop_bert.py",
        } <= files
        config = json.loads(hub.file("tester/tiny-cli", "config.json"))
        assert config["auto_map"]["AutoModelForSequenceClassification"].endswith(
            "DepthStopBertForSequenceClassification"
        )
        assert "tester/tiny-cli" in hub.file("tester/tiny-cli", "README.md").decode()
    assert _files(saved_model) == before


# ------------------------------------------------------------------------------------------------------------
# in-process: help, errors, demo, train
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["train", "calibrate", "evaluate", "push", "demo"]),
        (["train"], ["--config", "--recipe", "accelerate launch", "HF_DEPTHSTOP_RECIPES"]),
        (["calibrate"], ["MODEL", "--dataset", "--target_type", "--output_dir", "--in_place", "--max_examples"]),
        (["evaluate"], ["MODEL", "--dataset", "--plot", "--output", "--batch_size", "--max_examples"]),
        (["push"], ["MODEL", "--repo_id", "--private", "--token"]),
        (["demo"], ["--model", "quickstart", "--text"]),
    ],
)
def test_help_of_every_command(capsys, command, expected):
    code, out, _ = run_main(capsys, *command, "--help")
    assert code == 0
    for word in expected:
        assert word in out, (command, word)


def test_bad_inputs_exit_2_naming_the_value(capsys, saved_model, image_model, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    bad_labels = tmp_path / "bad.csv"
    bad_labels.write_text("text,label\nhello,0\nworld,7\n")
    m = str(saved_model)
    cases = [
        (["evaluate", str(tmp_path / "missing"), "--dataset", "tweets"], "missing"),
        (["evaluate", str(tmp_path / "empty"), "--dataset", "tweets"], "has no config.json"),
        (["evaluate", str(tmp_path / "afile"), "--dataset", "tweets"], "is a file"),
        (["evaluate", "nobody/no-such-model", "--dataset", "tweets"], "'nobody/no-such-model'"),
        (["evaluate", m, "--dataset", "imagenet"], "--dataset 'imagenet'"),
        (["evaluate", m, "--dataset", "mnist"], "is an image dataset but MODEL"),
        (["evaluate", str(image_model), "--dataset", "tweets"], "is a text dataset but MODEL"),
        (["evaluate", str(image_model), "--dataset", "mnist"], "num_labels=3"),
        (["evaluate", m, "--dataset", str(bad_labels)], "has label 7"),
        (["evaluate", m, "--dataset", "tweets", "--max_examples", "0"], "--max_examples must be >= 1, got 0"),
        (["evaluate", m, "--dataset", "tweets", "--split", "dev"], "invalid choice: 'dev'"),
        (["evaluate", m, "--dataset", "tweets", "--tokenizer", str(tmp_path / "empty")], "--tokenizer"),
        (["calibrate", m, "--dataset", "tweets"], "--output_dir DIR"),
        (["calibrate", m, "--dataset", "tweets", "--output_dir", m], "--in_place"),
        (["calibrate", m, "--dataset", "tweets", "--output_dir", str(taken)], "--overwrite_output_dir"),
        (["calibrate", m, "--dataset", "tweets", "--output_dir", "x", "--target", "1.5"], "--target 1.5"),
        (["calibrate", m, "--dataset", "tweets", "--output_dir", "x", "--rule", "magic"], "--rule 'magic'"),
        (["calibrate", "nobody/x", "--dataset", "tweets", "--in_place"], "--in_place needs a local model folder"),
        (["push", m, "--repo_id", "a/b/c"], "--repo_id 'a/b/c'"),
        (["push", str(tmp_path / "missing"), "--repo_id", "me/x"], "missing"),
        (["train", "--config", str(tmp_path / "nope.yaml")], "nope.yaml"),
        (
            ["train", "--config", str(REPO_ROOT / "recipes/configs/quickstart.yaml"), "--no_such_flag", "1"],
            "--no_such_flag",
        ),
        (["train"], "--config"),
        (["demo", "--model", str(tmp_path / "missing")], "missing"),
        (["demo", "--model", m, "--max_steps", "3"], "--max_steps"),
    ]
    for argv, needle in cases:
        code, _, err = run_main(capsys, *argv)
        assert code == 2, (argv, err)
        assert needle in err, (argv, err)
    assert (taken / "keep.txt").read_text() == "mine" and not Path("x").exists()


def test_recipe_lookup(monkeypatch, tmp_path, capsys):
    assert cli.recipe_kind({"arch": "vit"}) == cli.recipe_kind({"arch": "resnet"}) == "image"
    assert cli.recipe_kind({"arch": "llama"}) == cli.recipe_kind({"model_type": "depthstop_gpt2"}) == "lm"
    assert cli.recipe_kind({"n_train": 10}) == cli.recipe_kind({}) == "text"
    configs = REPO_ROOT / "recipes" / "configs"
    kinds = {"quickstart": "text", "mnist_resnet": "image", "mnist_vit": "image", "smollm2_shakespeare": "lm"}
    for name, kind in kinds.items():
        if (configs / f"{name}.yaml").is_file():
            assert cli.recipe_kind(cli._read_yaml(str(configs / f"{name}.yaml"))) == kind, name
    with pytest.raises(cli.CliError, match=r"no flag\(s\) \['n_trian'\]"):
        cli.recipe_kind({"n_trian": 10, "exit_pooling": "mean"})
    assert cli.find_recipes_dir() == REPO_ROOT / "recipes"
    monkeypatch.setenv("HF_DEPTHSTOP_RECIPES", str(tmp_path))
    code, _, err = run_main(capsys, "train", "--config", str(REPO_ROOT / "recipes/configs/quickstart.yaml"))
    assert code == 2 and f"HF_DEPTHSTOP_RECIPES={str(tmp_path)!r}" in err
    monkeypatch.setenv("HF_DEPTHSTOP_RECIPES", str(REPO_ROOT / "recipes"))
    code, out, _ = run_main(capsys, "train", "--recipe", "image", "--recipe_help")
    assert code == 0 and "--hidden_sizes" in out


def test_calibrate_in_place_and_overwrite(capsys, saved_model, tmp_path):
    work = tmp_path / "model"
    shutil.copytree(saved_model, work)
    (work / "notes.txt").write_text("kept")
    flags = "--dataset tweets --max_examples 60 --no_progress".split()
    code, out, err = run_main(capsys, "calibrate", str(work), *flags, "--in_place", "--rule", "confidence")
    assert code == 0, err
    config = AutoConfig.from_pretrained(work)
    assert config.stopping_rule == "confidence" and config.calibration is not None
    assert (work / "notes.txt").read_text() == "kept"  # side files travel with the model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing temporary left behind

    target = tmp_path / "other"
    target.mkdir()
    (target / "old.txt").write_text("old")
    more = "--overwrite_output_dir --target_type compute_budget --target 0.6".split()
    code, _, err = run_main(capsys, "calibrate", str(work), *flags, "--output_dir", str(target), *more)
    assert code == 0, err
    assert not (target / "old.txt").exists() and AutoConfig.from_pretrained(target).stopping_rule == "asti"


def test_evaluate_a_dataset_file_and_demo(capsys, saved_model, tmp_path):
    csv = tmp_path / "mine.csv"
    csv.write_text("text,label\nwhat a great day,2\nawful,0\nthe bus is late,1\nok I guess,1\n")
    out = tmp_path / "r.json"
    code, stdout, err = run_main(
        capsys, "evaluate", str(saved_model), "--dataset", str(csv), "--output", str(out), "--no_progress"
    )
    assert code == 0, err
    assert "not calibrated" in err and "| none |" in stdout
    assert json.loads(out.read_text())["n_examples"] == 4

    code, stdout, err = run_main(capsys, "demo", "--model", str(saved_model), "--text", "hello there")
    assert code == 0, err
    assert "'hello there'" in stdout and "exit layer" in stdout and "of 4" in stdout
    code, stdout, err = run_main(capsys, "demo", "--model", str(saved_model))
    assert code == 0, err
    assert all(repr(t) in stdout for t in cli.DEMO_TEXTS if len(t) <= 60)


def test_train_runs_the_recipe_chosen_by_the_yaml(capsys, tmp_path):
    out = tmp_path / "resnet"
    flags = (
        "--train_size 32 --validation_size 48 --test_size 32 --max_steps 1 --hidden_sizes 8,8,8 --embedding_size 8 "
        "--depths 1,1,1 --per_device_train_batch_size 16 --eval_batch_sizes 32 --disable_tqdm true"
    ).split()
    config_file = str(REPO_ROOT / "recipes/configs/mnist_resnet.yaml")
    code, stdout, err = run_main(capsys, "train", "--config", config_file, *flags, "--output_dir", str(out))
    assert code == 0, err
    assert "train_image_classifier.py" in err and "| asti |" in stdout
    config = AutoConfig.from_pretrained(out)
    assert config.model_type == "depthstop_resnet" and config.hidden_sizes == [8, 8, 8]
    assert config.calibration is not None


def test_path_dataset_saved_to_disk(capsys, saved_model, tmp_path):
    """A `save_to_disk` DatasetDict: the split is taken from it; a missing split is an error naming it."""
    tok = AutoTokenizer.from_pretrained(saved_model)
    texts = ["good", "bad", "meh", "great stuff", "terrible", "fine"]
    ds = datasets.Dataset.from_dict({**tok(texts), "label": [2, 0, 1, 2, 0, 1]})
    datasets.DatasetDict(validation=ds).save_to_disk(str(tmp_path / "d"))
    code, _, err = run_main(capsys, "evaluate", str(saved_model), "--dataset", str(tmp_path / "d"), "--no_progress")
    assert code == 2 and "--split 'test'" in err
    dataset = ["--dataset", str(tmp_path / "d"), "--no_progress"]
    code, stdout, err = run_main(capsys, "calibrate", str(saved_model), *dataset, "--output_dir", str(tmp_path / "c"))
    assert code == 0, err
    assert "(6 examples)" in stdout


def test_demo_of_a_language_model(capsys, tmp_path):
    """A tiny early-exit Llama (the MiniLM tokenizer stands in for its own): greedy tokens with their exit layers."""
    from hf_depthstop import DepthStopLlamaConfig, DepthStopLlamaForCausalLM

    torch.manual_seed(0)
    config = DepthStopLlamaConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        exit_layers=[1, 3],
        stopping_rule="confidence",
        stopping_params={"threshold": 0.0},
    )
    folder = tmp_path / "lm"
    DepthStopLlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_checkpoint_path()).save_pretrained(folder)
    code, stdout, err = run_main(capsys, "demo", "--model", str(folder), "--text", "hello", "--max_new_tokens", "5")
    assert code == 0, err
    assert "prompt: 'hello'" in stdout
    exits = json.loads(stdout.split("exit layer per token: ")[1].splitlines()[0])
    # the first token comes from the full-depth prefill; with threshold 0 every later token stops at exit 1
    assert exits == [3, 1, 1, 1, 1]
    code, _, err = run_main(capsys, "evaluate", str(folder), "--dataset", "tweets")
    assert code == 2 and "a causal language model" in err
