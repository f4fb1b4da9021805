# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""The decoder-LM assets: SmolLM2 GGUF -> HF folder conversion, and the Shakespeare plays with their fixed split."""

import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from hf_depthstop.data import (
    SHAKESPEARE_PLAYS,
    SHAKESPEARE_SPLITS,
    depthstop_cache_dir,
    load_shakespeare,
    load_shakespeare_texts,
    minilm_checkpoint_path,
    shakespeare_texts_dir,
    smollm2_checkpoint_path,
    smollm2_gguf_path,
)


pytestmark = pytest.mark.slow  # converts and loads the real SmolLM2 checkpoint and reads the real plays

PROMPTS = ["What is the capital of France?", "Shall I compare thee to a summer's day?"]


@pytest.fixture(scope="module")
def conversion(tmp_path_factory):
    """Converts the GGUF into a fresh cache folder (not the user's cache, so the conversion itself is exercised)."""
    cache = tmp_path_factory.mktemp("depthstop_cache")
    stale = cache / "smollm2-135m-instruct"  # a half-written folder from an interrupted run must not be trusted
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    path = smollm2_checkpoint_path(cache)
    yield cache, path
    shutil.rmtree(cache, ignore_errors=True)  # 517 MB


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(smollm2_checkpoint_path())  # the default cache (converted once)


@pytest.fixture(scope="module")
def blocks(tokenizer):
    return load_shakespeare(tokenizer, block_size=128)


def test_conversion_loads_with_auto_classes_and_matches_gguf_logits(conversion):
    cache, path = conversion
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert path == os.path.join(str(cache), "smollm2-135m-instruct")
    assert os.listdir(cache) == ["smollm2-135m-instruct"]  # no temporary folder left behind
    names = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "tokenizer.json", "hf_depthstop_conversion.json"} <= names
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(model) is LlamaForCausalLM
    assert not hasattr(model.config, "quantization_config")
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)

    gguf_dir, gguf_file = os.path.split(smollm2_gguf_path())
    reference = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32).eval()
    reference_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        assert ids.tolist() == reference_tokenizer(prompt, return_tensors="pt").input_ids.tolist()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
    assert tokenizer.chat_template == reference_tokenizer.chat_template and tokenizer.chat_template


def test_converted_model_answers_a_chat_prompt(conversion):
    tokenizer = AutoTokenizer.from_pretrained(conversion[1])
    model = AutoModelForCausalLM.from_pretrained(conversion[1]).eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])  # real weights, not a random init


def test_second_call_reuses_the_cached_folder(conversion):
    cache, path = conversion
    weights = os.path.join(path, "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    assert smollm2_checkpoint_path(cache) == path
    assert os.stat(weights).st_mtime_ns == before


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DEPTHSTOP_CACHE", str(tmp_path / "env"))
    assert depthstop_cache_dir() == str(tmp_path / "env")
    assert depthstop_cache_dir(tmp_path / "arg") == str(tmp_path / "arg")  # the argument wins over the variable
    monkeypatch.delenv("HF_DEPTHSTOP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert depthstop_cache_dir() == str(tmp_path / "xdg" / "hf_depthstop")


def test_bad_cache_dir(tmp_path):
    with pytest.raises(TypeError, match="cache_dir"):
        smollm2_checkpoint_path(123)
    with pytest.raises(ValueError, match="cache_dir=''"):
        smollm2_checkpoint_path("")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        smollm2_checkpoint_path(a_file)
    assert list(tmp_path.iterdir()) == [a_file]  # nothing was written before the error


def test_split_is_fixed_and_disjoint():
    assert SHAKESPEARE_SPLITS["validation"] == ("macbeth", "twelfth_night")
    assert SHAKESPEARE_SPLITS["test"] == ("julius_caesar", "tempest")
    train, val, test = (set(SHAKESPEARE_SPLITS[s]) for s in ("train", "validation", "test"))
    assert len(train) == 33 and not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(SHAKESPEARE_PLAYS) and len(SHAKESPEARE_PLAYS) == 37
    texts = load_shakespeare_texts()
    assert {s: list(d["play"]) for s, d in texts.items()} == {s: list(p) for s, p in SHAKESPEARE_SPLITS.items()}
    # a line of each held-out play occurs in its own split only (no folio duplicate or poem leaks it into train)
    joined = {split: "\n".join(d["text"]) for split, d in texts.items()}
    for split, line in (("validation", "Double, double, toil and trouble"), ("test", "Beware the Ides of March")):
        assert [s for s, text in joined.items() if line in text] == [split]


def test_blocks(blocks, tokenizer):
    assert {s: len(d) for s, d in blocks.items()} == {"train": 10705, "validation": 545, "test": 532}
    for split in blocks.values():
        assert split.column_names == ["input_ids", "attention_mask", "labels"]
    row = blocks["validation"][0]
    assert len(row["input_ids"]) == 128 and row["labels"] == row["input_ids"] and set(row["attention_mask"]) == {1}
    assert tokenizer.decode(row["input_ids"]).startswith("MACBETH\n\nby William Shakespeare")
    # plays are separated by one EOS: the validation stream holds exactly one per play inside its full blocks
    flat = np.asarray(blocks["validation"]["input_ids"]).ravel()
    assert int((flat == tokenizer.eos_token_id).sum()) in (1, 2)


def test_caps_take_a_seeded_subset_and_never_move_the_split(blocks, tokenizer):
    capped = load_shakespeare(tokenizer, block_size=128, max_train_blocks=50, max_eval_blocks=20, seed=1)
    assert {s: len(d) for s, d in capped.items()} == {"train": 50, "validation": 20, "test": 20}
    for split in ("train", "validation", "test"):
        full = {tuple(x) for x in blocks[split]["input_ids"]}
        assert {tuple(x) for x in capped[split]["input_ids"]} <= full
    again = load_shakespeare(tokenizer, block_size=128, max_train_blocks=50, max_eval_blocks=20, seed=1)
    assert again["train"]["input_ids"] == capped["train"]["input_ids"]
    other = load_shakespeare(tokenizer, block_size=128, max_train_blocks=50, max_eval_blocks=20, seed=2)
    assert other["train"]["input_ids"] != capped["train"]["input_ids"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"block_size": 1}, ValueError, "block_size=1"),
        ({"block_size": 0}, ValueError, "block_size=0"),
        ({"block_size": "128"}, TypeError, "block_size='128'"),
        ({"block_size": True}, TypeError, "block_size=True"),
        ({"block_size": 10**7}, ValueError, "block_size=10000000"),
        ({"max_train_blocks": 0}, ValueError, "max_train_blocks=0"),
        ({"max_eval_blocks": -3}, ValueError, "max_eval_blocks=-3"),
        ({"max_train_blocks": 2.5}, TypeError, "max_train_blocks=2.5"),
        ({"seed": -1}, ValueError, "seed=-1"),
    ],
)
def test_bad_arguments(tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        load_shakespeare(tokenizer, **kwargs)


def test_bad_tokenizer():
    with pytest.raises(TypeError, match="tokenizer"):
        load_shakespeare("gpt2")
    bert_tokenizer = AutoTokenizer.from_pretrained(minilm_checkpoint_path())  # WordPiece: no EOS token
    with pytest.raises(ValueError, match="no EOS token"):
        load_shakespeare(bert_tokenizer)


def test_missing_texts_say_how_to_fetch_them(monkeypatch, tmp_path, tokenizer):
    monkeypatch.setenv("HF_DEPTHSTOP_SHAKESPEARE_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="setup.sh"):
        shakespeare_texts_dir()
    with pytest.raises(FileNotFoundError, match="37 of 37 plays absent"):
        load_shakespeare(tokenizer)
