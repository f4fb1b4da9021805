# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""A real 2-process (DDP, gloo) run of the training recipe on CPU, launched with `accelerate launch`, with and without
`--use_peft`: both ranks end with identical weights and identical (reduced) metrics, only rank 0 writes, and the saved
model loads and predicts."""

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_depthstop import DepthStopBertForSequenceClassification
from hf_depthstop.data import minilm_checkpoint_path
from hf_depthstop.peft_utils import load_adapter

from .testing_utils import tiny_bert_config


ROOT = os.path.join(os.path.dirname(__file__), "..")
N_TRAIN, BATCH = 96, 8  # training examples and per-device batch of the launched run
TINY = {"vocab_size": 30522, "num_hidden_layers": 3, "max_position_embeddings": 128, "exit_head_hidden_size": 16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny early-exit BERT with MiniLM's real vocabulary and tokenizer, saved as a normal checkpoint."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    torch.manual_seed(0)
    config = tiny_bert_config(**TINY)
    DepthStopBertForSequenceClassification(config).save_pretrained(path)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(minilm_checkpoint_path(), name), path / name)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, checkpoint, extra: list[str]) -> tuple[dict, dict, str]:
    out, digests = tmp_path / "out", tmp_path / "digests"
    env = dict(
        os.environ,
        HF_HOME=str(tmp_path / "hf_home"),
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.path.abspath(ROOT),
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        os.path.join(ROOT, "tests", "distributed_runner.py"),
        "--digest_dir",
        str(digests),
        "--config",
        os.path.join(ROOT, "recipes", "configs", "quickstart.yaml"),
        "--model_name_or_path",
        str(checkpoint),
        "--n_train",
        str(N_TRAIN),
        "--n_val",
        "120",
        "--n_test",
        "40",
        "--max_length",
        "32",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        str(BATCH),
        "--per_device_eval_batch_size",
        "32",
        "--exit_head_hidden_size",
        "16",
        "--learning_rate",
        "1e-3",
        "--eval_batch_sizes",
        "32",
        "--output_dir",
        str(out),
        "--disable_tqdm",
        "true",
        "--use_cpu",
        "true",
        *extra,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1)]
    return ranks[0], ranks[1], proc.stdout


def check_ranks(r0, r1):
    assert (r0["rank"], r1["rank"]) == (0, 1) and r0["world_size"] == r1["world_size"] == 2
    assert r0["distributed_type"] == r1["distributed_type"] == "DistributedType.MULTI_CPU"
    assert r0["steps"] == r1["steps"] == 4
    # the Trainer itself runs DDP (not two independent single-process runs): 2 ranks, data sharded between them
    assert r0["args_world_size"] == r1["args_world_size"] == 2
    assert r0["parallel_mode"] == r1["parallel_mode"] == "ParallelMode.DISTRIBUTED"
    assert r0["batches_per_epoch"] == r1["batches_per_epoch"] == math.ceil(N_TRAIN / (2 * BATCH))
    assert r0["before"] == r1["before"]  # same start
    assert r0["after"] != r0["before"]  # training moved the weights
    assert r0["after"] == r1["after"] and r0["trainable_after"] == r1["trainable_after"]  # DDP replicas agree
    # the trainer's own metrics are reduced over ranks: both ranks report the same numbers
    exit_metrics = {k: v for k, v in r0["eval"].items() if k.startswith("eval_exit_") or k == "eval_loss"}
    assert "eval_exit_0_accuracy" in exit_metrics
    assert exit_metrics == {k: r1["eval"][k] for k in exit_metrics}


def predicts(model, checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    batch = tokenizer(["what a lovely day", "this is awful, I hate it"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.eval()(**batch)
    assert out.logits.shape == (2, 3) and out.exit_layer.shape == (2,)
    return out


def test_two_process_training_full_weights(tiny_checkpoint, tmp_path):
    r0, r1, stdout = launch(tmp_path, tiny_checkpoint, [])
    check_ranks(r0, r1)
    assert r1["result_keys"] == ["eval"] and "calibration" in r0["result_keys"]  # rank 0 alone calibrates
    assert stdout.count("Saved the calibrated model") == 1  # and saves
    out = tmp_path / "out"
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(model) is DepthStopBertForSequenceClassification
    assert model.config.calibration is not None and model.config.stopping_rule == "asti"
    predicts(model, out)


def test_two_process_training_with_peft(tiny_checkpoint, tmp_path):
    r0, r1, stdout = launch(tmp_path, tiny_checkpoint, ["--use_peft", "true", "--lora_r", "4"])
    check_ranks(r0, r1)
    assert (
        0
        < r0["num_trainable"]
        < 0.5 * sum(p.numel() for p in DepthStopBertForSequenceClassification(tiny_bert_config(**TINY)).parameters())
    )
    out = tmp_path / "out"
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(merged) is DepthStopBertForSequenceClassification and merged.config.calibration is not None
    adapter = load_adapter(str(out / "adapter"))
    assert adapter.base_model.model.config.calibration == merged.config.calibration
    a, b = predicts(merged, out), predicts(adapter, out)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=0)
    assert a.exit_layer.tolist() == b.exit_layer.tolist()
