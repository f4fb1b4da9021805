# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""The `hf-depthstop` command line: train a recipe, calibrate, evaluate, push and demo early-exit models.

    hf-depthstop train --config recipes/configs/quickstart.yaml [recipe flags...]
    hf-depthstop calibrate outputs/quickstart --dataset tweets --target 0.01 --output_dir outputs/quickstart-2pt
    hf-depthstop evaluate outputs/quickstart --dataset tweets --plot rules.png --output rules.json
    hf-depthstop push outputs/quickstart --repo_id me/minilm-depthstop-sentiment
    hf-depthstop demo --model outputs/quickstart

`python -m hf_depthstop.cli ...` is the same command, so `accelerate launch -m hf_depthstop.cli train ...` runs a
recipe on several processes. Exit codes: 0 success, 2 bad input (the message names the argument and the value; given
before any work is done), 1 a failure while working (e.g. a push the Hub refused).

The recipes live in the source tree's `recipes/` folder, not in the installed package: `train` and `demo` find them
next to the package (editable or source install) or in `$HF_DEPTHSTOP_RECIPES`.
"""

import argparse
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path


PROG = "hf-depthstop"
BUILTIN_DATASETS = ("tweets", "mnist")
SPLITS = ("train", "validation", "test")
RECIPE_FILES = {"text": "train_classifier.py", "image": "train_image_classifier.py", "lm": "train_lm.py"}
IMAGE_ARCHS = ("resnet", "vit")
LM_ARCHS = ("llama", "gpt2")
TARGET_TYPES = ("max_accuracy_drop", "compute_budget", "risk_controlled")
# kind of model -> (Auto class name, what to call it in messages)
MODEL_KINDS = {
    "text": ("AutoModelForSequenceClassification", "a text classifier"),
    "image": ("AutoModelForImageClassification", "an image classifier"),
    "lm": ("AutoModelForCausalLM", "a causal language model"),
}
# files of a saved folder that saving the model rewrites (not copied from the source folder)
_MODEL_FILES = re.compile(
    r"^(config\.json|generation_config\.json|(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)|"
    r"(model\.safetensors|pytorch_model\.bin)\.index\.json|"
    r"depthstop_results\.json|depthstop_accuracy_vs_compute\.png)$"
)
_MEASURED_BLOCK = re.compile(
    r"(<!-- hf_depthstop:begin measured -->\n).*?(\n<!-- hf_depthstop:end measured -->)", re.DOTALL
)
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")

DEMO_PROMPTS = ("ROMEO:\nBut soft, what light", "Once upon a time")
DEMO_TEXTS = (
    "I love this so much, best day ever!",
    "This is the worst service I have ever had.",
    "The meeting is moved to 3pm on Thursday.",
    "not sure how I feel about the new update, some parts are ok",
    "Thanks a lot for nothing, really great job breaking it again",
    "Just got home.",
)


class CliError(Exception):
    """Bad input on the command line: reported as `hf-depthstop <command>: error: <message>` with exit code 2."""


# ----------------------------------------------------------------------------------------------------------------
# recipes
# ----------------------------------------------------------------------------------------------------------------
def find_recipes_dir() -> Path:
    """The folder holding the training recipes: `$HF_DEPTHSTOP_RECIPES`, else `recipes/` next to the package."""
    env = os.environ.get("HF_DEPTHSTOP_RECIPES")
    if env:
        if not Path(env, RECIPE_FILES["text"]).is_file():
            raise CliError(f"HF_DEPTHSTOP_RECIPES={env!r} is not a recipes folder: it holds no {RECIPE_FILES['text']}")
        return Path(env)
    candidate = Path(__file__).resolve().parent.parent / "recipes"
    if Path(candidate, RECIPE_FILES["text"]).is_file():
        return candidate
    raise CliError(
        "the training recipes were not found: they live in the source tree's recipes/ folder, which a wheel install "
        "does not ship. Clone the repository and `pip install -e .` there, or point HF_DEPTHSTOP_RECIPES at a copy "
        f"of its recipes/ folder (looked in {candidate})"
    )


def _read_yaml(path: str, flag: str = "--config") -> dict:
    import yaml

    if not os.path.isfile(path):
        raise CliError(f"{flag} {path!r}: no such file")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as exc:
        raise CliError(f"{flag} {path!r} is not valid yaml: {exc}") from None
    if not isinstance(values, dict):
        raise CliError(f"{flag} {path!r} must hold a mapping of recipe flags, got {type(values).__name__}")
    return values


def recipe_kind(config: dict, recipes_dir: Path | None = None, source: str = "--config") -> str:
    """`text`, `image` or `lm` for the recipe yaml `config`: `arch: resnet|vit` is the image recipe, `arch:
    llama|gpt2` (or an LM `model_type`) the language-model recipe; otherwise the first recipe (text, lm, image)
    whose flags include every key of the yaml. A yaml whose keys no recipe knows is a [`CliError`]."""
    arch = str(config.get("arch", "")).lower()
    model_type = str(config.get("model_type", "")).lower().removeprefix("depthstop_")
    if arch in IMAGE_ARCHS:
        return "image"
    if arch in LM_ARCHS or model_type in LM_ARCHS:
        return "lm"
    if not config:
        return "text"
    recipes_dir = recipes_dir or find_recipes_dir()
    unknown = {}
    for kind in ("text", "lm", "image"):
        path = Path(recipes_dir, RECIPE_FILES[kind])
        if not path.is_file():
            continue
        flags = {action.dest for action in _import_file(path).make_parser()._actions}
        unknown[kind] = sorted(set(config) - flags)
        if not unknown[kind]:
            return kind
    best = min(unknown, key=lambda k: len(unknown[k]))
    raise CliError(
        f"{source}: no recipe takes all of its keys; closest is {RECIPE_FILES[best]}, which has no flag(s) "
        f"{unknown[best]} (choose one with --recipe, or fix the keys)"
    )


def load_recipe(kind: str, recipes_dir: Path | None = None):
    """Import the recipe of `kind` (a file of the recipes folder) by path and return the module."""
    recipes_dir = recipes_dir or find_recipes_dir()
    path = Path(recipes_dir, RECIPE_FILES[kind])
    if not path.is_file():
        raise CliError(f"--recipe {kind}: {path} does not exist (this checkout has no {kind} recipe yet)")
    return _import_file(path)


def _import_file(path: Path):
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))  # the recipes import their neighbours (recipe_utils, train_classifier)
    name = path.stem
    module = sys.modules.get(name)
    if module is not None and os.path.abspath(getattr(module, "__file__", "") or "") == str(path.resolve()):
        return module
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _parse_recipe_args(module, argv: list[str], what: str):
    try:
        return module.parse_args(argv)
    except (ValueError, TypeError) as exc:  # HfArgumentParser: unknown flags, bad values
        raise CliError(f"{what}: {exc}") from None


# ----------------------------------------------------------------------------------------------------------------
# models and datasets
# ----------------------------------------------------------------------------------------------------------------
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def model_kind(config) -> str | None:
    """`text`, `image` or `lm` for a `DepthStop*` config registered with the matching Auto class; `None` otherwise."""
    import transformers

    if not str(getattr(config, "model_type", "")).startswith("depthstop_"):
        return None
    for kind, (auto_name, _) in MODEL_KINDS.items():
        mapping = getattr(transformers, auto_name)._model_mapping
        try:
            if type(config) in mapping:
                return kind
        except (KeyError, ValueError):
            continue
    return None


def check_model_path(name: str, flag: str = "MODEL") -> bool:
    """Cheap checks of a model argument before loading; returns whether it is a local folder."""
    path = Path(name)
    if path.exists():
        if not path.is_dir():
            raise CliError(f"{flag} {name!r} is a file, not a saved model folder")
        if not (path / "config.json").is_file():
            hint = (
                " (a PEFT adapter folder: merge it first with merge_and_unload)"
                if (path / "adapter_config.json").is_file()
                else ""
            )
            raise CliError(f"{flag} {name!r} is not a saved model: it has no config.json{hint}")
        return True
    if not _HUB_ID.match(name):
        raise CliError(f"{flag} {name!r}: no such directory, and not a Hub repo id (owner/name)")
    return False


def load_model(name: str, flag: str = "MODEL"):
    """Load a saved `DepthStop*` model (local folder or Hub repo id) with its Auto class.

    Returns `(model, kind)` with `kind` in `text`, `image`, `lm`; bad input raises [`CliError`] naming `name`."""
    local = check_model_path(name, flag)
    import transformers
    from transformers import AutoConfig

    import hf_depthstop  # noqa: F401  (registers the DepthStop* classes with the Auto classes)

    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as exc:
        if local:
            raise CliError(f"{flag} {name!r} is not a saved model: its config.json does not load ({exc})") from None
        why = (
            "HF_HUB_OFFLINE=1 is set, so only Hub models already in the local cache load; unset it to download"
            if _offline()
            else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )
        raise CliError(
            f"{flag} {name!r}: no such local directory, and no Hub repo of that id could be loaded ({why})"
        ) from None
    kind = model_kind(config)
    if kind is None:
        raise CliError(
            f"{flag} {name!r} is not an hf_depthstop early-exit model (model_type={config.model_type!r}); train one "
            "from it with `hf-depthstop train --config ... --model_name_or_path ...`"
        )
    model = getattr(transformers, MODEL_KINDS[kind][0]).from_pretrained(name)
    return model.eval(), kind


def check_dataset_arg(dataset: str) -> str:
    """`dataset` is a built-in name or an existing path; returns `builtin` or `path`."""
    if dataset in BUILTIN_DATASETS:
        return "builtin"
    if os.path.exists(dataset):
        return "path"
    raise CliError(
        f"--dataset {dataset!r} is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor an existing "
        "dataset path (a folder saved with datasets' save_to_disk, or a .csv / .json / .jsonl / .parquet file)"
    )


def _dataset_modality(columns: list[str]) -> str | None:
    if "pixel_values" in columns:
        return "image"
    if "input_ids" in columns or "text" in columns:
        return "text"
    return None


def _load_path_dataset(path: str, split: str):
    import datasets

    try:
        if os.path.isdir(path):
            data = datasets.load_from_disk(path)
        else:
            builders = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
            ext = os.path.splitext(path)[1].lower()
            if ext not in builders:
                raise CliError(f"--dataset {path!r}: unknown file type {ext!r} (use .csv, .json, .jsonl or .parquet)")
            data = datasets.load_dataset(builders[ext], data_files=path, split="train")
    except CliError:
        raise
    except Exception as exc:  # datasets raises several types for a folder or file it cannot read
        raise CliError(f"--dataset {path!r} could not be loaded as a dataset ({type(exc).__name__}: {exc})") from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise CliError(f"--split {split!r} is not a split of --dataset {path!r} (it has {sorted(data)})")
        data = data[split]
    return data


def check_dataset_for_model(dataset_name: str, columns: list[str], kind: str, config, flag_model: str) -> None:
    """A dataset/model mismatch (modality, labels, image shape) is a [`CliError`] naming both."""
    described = MODEL_KINDS[kind][1]
    if kind == "lm":
        raise CliError(
            f"MODEL {flag_model!r} is {described} ({config.model_type}); calibrate and evaluate take classifiers "
            "(for language models use hf_depthstop.calibrate_lm in Python)"
        )
    modality = _dataset_modality(columns)
    if modality is None:
        raise CliError(
            f"--dataset {dataset_name!r} has no text, input_ids or pixel_values column (its columns are {columns})"
        )
    if "label" not in columns and "labels" not in columns:
        raise CliError(f"--dataset {dataset_name!r} has no label column (its columns are {columns})")
    if modality != kind:
        raise CliError(
            f"--dataset {dataset_name!r} is {'an image' if modality == 'image' else 'a text'} dataset but MODEL "
            f"{flag_model!r} is {described} "
            f"({config.model_type})"
        )


def load_split(args, kind: str, config, tokenizer=None):
    """The labelled evaluation split of `args.dataset` for a model of `kind`: tokenized (text) or `pixel_values`
    (images), cut to `args.max_examples` rows (the first ones)."""
    if args.dataset == "tweets":
        from .data import TWEET_SENTIMENT_LABELS, load_tweet_sentiment

        check_dataset_for_model("tweets", ["text", "label"], kind, config, args.model)
        if config.num_labels != len(TWEET_SENTIMENT_LABELS):
            raise CliError(
                f"--dataset tweets has {len(TWEET_SENTIMENT_LABELS)} labels but MODEL {args.model!r} has "
                f"num_labels={config.num_labels}"
            )
        # the recipes' fixed split (n_val=2000, n_test=2000, seed 0); train is whatever is left
        data = load_tweet_sentiment(n_train=None if args.split == "train" else 1, n_val=2000, n_test=2000, seed=0)
        data = data[args.split]
    elif args.dataset == "mnist":
        from .data import load_mnist

        check_dataset_for_model("mnist", ["pixel_values", "label"], kind, config, args.model)
        _check_image_model_for_mnist(config, args.model)
        data = load_mnist(train_size=50000 if args.split == "train" else 1, seed=0)[args.split]
    else:
        data = _load_path_dataset(args.dataset, args.split)
        check_dataset_for_model(args.dataset, data.column_names, kind, config, args.model)
        label_col = "labels" if "labels" in data.column_names else "label"
        labels = data[label_col]
        bad = [y for y in labels if not 0 <= int(y) < config.num_labels]
        if bad:
            raise CliError(
                f"--dataset {args.dataset!r} has label {int(bad[0])} but MODEL {args.model!r} has "
                f"num_labels={config.num_labels} (labels must be 0..{config.num_labels - 1})"
            )
    if args.max_examples is not None:
        data = data.select(range(min(len(data), args.max_examples)))
    if len(data) == 0:
        raise CliError(f"--dataset {args.dataset!r} split {args.split!r} has no rows")
    if kind == "text" and "input_ids" not in data.column_names:
        from .data import tokenize_for_classification

        data = tokenize_for_classification(data, tokenizer, max_length=args.max_length)
    if kind == "image":
        data = data.with_format("torch", columns=["pixel_values"], output_all_columns=True)
    return data


def _check_image_model_for_mnist(config, name: str) -> None:
    channels = getattr(config, "num_channels", 1)
    if channels != 1:
        raise CliError(f"--dataset mnist has 1-channel images but MODEL {name!r} has num_channels={channels}")
    if config.num_labels != 10:
        raise CliError(f"--dataset mnist has 10 labels but MODEL {name!r} has num_labels={config.num_labels}")
    size = getattr(config, "image_size", None)  # ViT needs its size; ResNet takes any
    if size is not None and size not in (28, [28, 28], (28, 28)):
        raise CliError(f"--dataset mnist has 28x28 images but MODEL {name!r} has image_size={size}")


def load_tokenizer(model_name: str, tokenizer_name: str | None, config):
    from transformers import AutoTokenizer

    name = tokenizer_name or model_name
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, TypeError) as exc:
        flag = "--tokenizer" if tokenizer_name else "MODEL"
        raise CliError(
            f"{flag} {name!r} has no loadable tokenizer ({type(exc).__name__}); pass --tokenizer PATH"
        ) from None
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise CliError(
            f"the tokenizer of {name!r} has {len(tokenizer)} tokens but MODEL {model_name!r} has vocab_size={vocab}: "
            "pass the model's own tokenizer with --tokenizer"
        )
    return tokenizer


def _prepare(args):
    """Shared front of calibrate / evaluate: check the arguments, load model, tokenizer and split."""
    check_dataset_arg(args.dataset)
    if args.max_examples is not None and args.max_examples < 1:
        raise CliError(f"--max_examples must be >= 1, got {args.max_examples}")
    if args.batch_size < 1:
        raise CliError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_length < 1:
        raise CliError(f"--max_length must be >= 1, got {args.max_length}")
    check_model_path(args.model)
    model, kind = load_model(args.model)
    tokenizer = None
    if kind == "text" and args.dataset != "mnist":
        tokenizer = load_tokenizer(args.model, args.tokenizer, model.config)
    data = load_split(args, kind, model.config, tokenizer)
    return model, kind, tokenizer, data


# ----------------------------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------------------------
def _copy_side_files(source: Path, dest: Path) -> None:
    """Copy the top-level files of a saved folder that saving the model does not rewrite (tokenizer, processor,
    card, ...); sub-folders (checkpoints, runs) are left out."""
    for item in source.iterdir():
        if item.is_file() and not _MODEL_FILES.match(item.name):
            shutil.copy2(item, dest / item.name)


def save_atomically(model, dest: str, source: str | None, tokenizer=None, extra_json: dict | None = None) -> Path:
    """Save `model` (and the side files of the `source` folder, or `tokenizer`) to a temporary folder next to
    `dest`, then move it to `dest` (an existing `dest` is moved aside first and deleted last)."""
    dest_path = Path(dest).resolve()
    dest_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.tmp-", dir=dest_path.parent))
    try:
        if source is not None and Path(source).is_dir():
            _copy_side_files(Path(source), tmp)
            readme = tmp / "README.md"
            if readme.is_file():  # the measured tables were taken with the previous calibration
                text = _MEASURED_BLOCK.sub(
                    lambda m: (
                        m.group(1)
                        + "Not measured since the last calibration: run `hf-depthstop evaluate`."
                        + m.group(2)
                    ),
                    readme.read_text(encoding="utf-8"),
                )
                readme.write_text(text, encoding="utf-8")
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if "model_card" in inspect.signature(model.save_pretrained).parameters:  # DepthStopHubMixin
            model.save_pretrained(tmp, model_card={"model_name": dest_path.name})  # a new card is titled after dest
        else:
            model.save_pretrained(tmp)
        for filename, values in (extra_json or {}).items():
            (tmp / filename).write_text(json.dumps(values, indent=2, default=float), encoding="utf-8")
        if dest_path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest_path.name}.old-", dir=dest_path.parent))
            os.replace(dest_path, old / "folder")
            os.replace(tmp, dest_path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest_path


# ----------------------------------------------------------------------------------------------------------------
# commands
# ----------------------------------------------------------------------------------------------------------------
def cmd_train(args, extra: list[str]) -> int:
    if args.config is None and args.recipe is None:
        raise CliError("give --config FILE.yaml (the recipe is chosen from it) or --recipe {text,image,lm}")
    config = _read_yaml(args.config) if args.config else {}
    kind = args.recipe or recipe_kind(config, source=f"--config {args.config!r}")
    module = load_recipe(kind)
    if args.recipe_help:
        module.make_parser().print_help()
        return 0
    argv = (["--config", args.config] if args.config else []) + list(extra)
    parsed = _parse_recipe_args(module, argv, f"{RECIPE_FILES[kind]} {' '.join(argv)}")
    print(f"{PROG} train: running {module.__file__}", file=sys.stderr)
    module.main(*parsed)
    return 0


def _check_target(args) -> None:
    t = args.target
    if math.isnan(t):
        raise CliError(f"--target must be a number, got {t}")
    if args.target_type == "compute_budget" and not 0 < t <= 1:
        raise CliError(f"--target {t} must be a mean compute fraction in (0, 1] for --target_type compute_budget")
    if args.target_type != "compute_budget" and not 0 <= t < 1:
        raise CliError(f"--target {t} must be an accuracy drop in [0, 1) (0.01 = 1 point) for {args.target_type}")
    if not 0 < args.epsilon < 1:
        raise CliError(f"--epsilon must be in (0, 1), got {args.epsilon}")


def cmd_calibrate(args, extra: list[str]) -> int:
    from .stopping import STOPPING_RULES

    if args.rule not in STOPPING_RULES:
        raise CliError(f"--rule {args.rule!r} is not a stopping rule (one of {', '.join(STOPPING_RULES)})")
    _check_target(args)
    if args.output_dir is None and not args.in_place:
        raise CliError(
            f"give --output_dir DIR for the calibrated model, or --in_place to overwrite MODEL {args.model!r}"
        )
    if args.output_dir is not None and args.in_place:
        raise CliError("give either --output_dir or --in_place, not both")
    local = check_model_path(args.model)
    if args.in_place and not local:
        raise CliError(f"--in_place needs a local model folder; MODEL {args.model!r} is not one (give --output_dir)")
    dest = args.model if args.in_place else args.output_dir
    if args.output_dir is not None:
        out = Path(args.output_dir)
        if local and out.exists() and out.resolve() == Path(args.model).resolve():
            raise CliError(f"--output_dir {args.output_dir!r} is MODEL itself: pass --in_place to overwrite it")
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite_output_dir:
            raise CliError(
                f"--output_dir {args.output_dir!r} exists and is not empty: pass --overwrite_output_dir to replace it"
            )
    if args.split == "test":
        print(
            f"{PROG} calibrate: warning: calibrating on the test split; report test results on other data",
            file=sys.stderr,
        )

    from .calibration import calibrate

    model, kind, tokenizer, data = _prepare(args)
    report = calibrate(
        model,
        data,
        target=args.target,
        target_type=args.target_type,
        rule=args.rule,
        epsilon=args.epsilon,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    print(
        f"\nCalibration of {args.model} on {args.dataset} / {args.split} ({len(data)} examples), "
        f"target {args.target_type} = {args.target}:"
    )
    print(report.to_markdown())
    source = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "n_examples": len(data),
        "target": args.target,
        "target_type": args.target_type,
        "rule": args.rule,
    }
    saved = save_atomically(
        model,
        dest,
        args.model if local else None,
        tokenizer,
        extra_json={"depthstop_calibration.json": {"calibrated_on": source, "report": report.__dict__}},
    )
    print(
        f"\nSaved the calibrated model (rule {model.config.stopping_rule} {model.config.stopping_params}) to {saved}"
    )
    return 0


def cmd_evaluate(args, extra: list[str]) -> int:
    for flag, value, suffix in (("--plot", args.plot, ".png"), ("--output", args.output, ".json")):
        if value is not None and os.path.isdir(value):
            raise CliError(f"{flag} {value!r} is a directory; give a {suffix} file path")
    if args.repeats < 1:
        raise CliError(f"--repeats must be >= 1, got {args.repeats}")

    from .calibration import collect_exit_records, evaluate_records
    from .evaluation import compare_rules, rules_from_calibration, rules_table_markdown

    model, kind, tokenizer, data = _prepare(args)
    config = model.config
    rules = rules_from_calibration(model)
    if config.stopping_rule not in rules:
        rules[config.stopping_rule] = dict(config.stopping_params or {})
    if not config.calibration:
        print(
            f"{PROG} evaluate: note: MODEL {args.model!r} is not calibrated; only rule(s) {sorted(rules)} are "
            f"run (calibrate it with `{PROG} calibrate`)",
            file=sys.stderr,
        )
    rows = compare_rules(
        model, data, rules, batch_size=args.batch_size, repeats=args.repeats, progress=not args.no_progress
    )
    records = collect_exit_records(model, data, batch_size=args.batch_size, progress=not args.no_progress)
    per_exit = (records.exit_logits.argmax(-1) == records.labels[:, None]).float().mean(0).tolist()
    ones = {"temperatures": [1.0] * len(records.exit_layers)}
    oracle = evaluate_records(records, ones, [], "oracle floor", {})
    oracle_row = {
        "rule": "oracle floor",
        "setting": None,
        "accuracy": float(oracle["accuracy"]),
        "mean_exit_layer": float(oracle["mean_exit_layer"]),
        "compute_fraction": float(oracle["compute_fraction"]),
        "speedup": None,
    }
    label = f"{args.dataset} / {args.split}, batch {args.batch_size}"
    print(
        f"\n{args.model} on {args.dataset} / {args.split} ({len(data)} examples), every rule live, batch "
        f"{args.batch_size} (exit layers are 0-based; compute = FLOPs used / full model):"
    )
    print(rules_table_markdown([*rows, oracle_row]))
    print(
        "\nPer-exit accuracy at full depth: "
        + ", ".join(f"layer {layer}: {100 * acc:.2f}" for layer, acc in zip(records.exit_layers, per_exit))
    )
    results = {
        "model": args.model,
        "dataset": args.dataset,
        "split": args.split,
        "n_examples": len(data),
        "batch_size": args.batch_size,
        "model_rule": {"rule": config.stopping_rule, "params": dict(config.stopping_params or {})},
        "rules": rows,
        "oracle_floor": oracle_row,
        "exit_layers": [int(x) for x in records.exit_layers],
        "exit_accuracy": per_exit,
        "calibration_table": (config.calibration or {}).get("table"),
    }
    if args.plot:
        from .modelcard import plot_accuracy_vs_compute

        Path(args.plot).resolve().parent.mkdir(parents=True, exist_ok=True)
        plot_accuracy_vs_compute(config, args.plot, measured={label: [*rows, oracle_row]})
        print(f"\nWrote the accuracy-vs-compute plot to {args.plot}")
    if args.output:
        Path(args.output).resolve().parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
        print(f"Wrote the results to {args.output}")
    return 0


def cmd_push(args, extra: list[str]) -> int:
    if not args.repo_id.strip() or args.repo_id.count("/") > 1 or not _HUB_ID.match(args.repo_id):
        raise CliError(f"--repo_id {args.repo_id!r} must be 'name' or 'owner/name'")
    if not check_model_path(args.model):
        raise CliError(f"MODEL {args.model!r}: no such directory (push uploads a local saved model folder)")
    model, _ = load_model(args.model)

    from .hub import DepthStopHubMixin, HubPushError, upload_saved_folder, write_remote_code
    from .modelcard import write_model_card

    with tempfile.TemporaryDirectory(prefix="depthstop_push_") as tmp:
        _copy_side_files(Path(args.model), Path(tmp))
        (Path(tmp) / "depthstop_results.json").unlink(missing_ok=True)
        results = Path(args.model, "depthstop_results.json")
        if results.is_file():  # measured tables travel with the card
            shutil.copy2(results, Path(tmp, results.name))
        if isinstance(model, DepthStopHubMixin):
            model.save_pretrained(tmp, model_card={"repo_id": args.repo_id})
        else:  # what the mixin's save_pretrained does, for a class without it
            write_remote_code(model, tmp)  # sets config.auto_map before the config is written
            model.save_pretrained(tmp)
            write_model_card(model, tmp, repo_id=args.repo_id)
        try:
            commit = upload_saved_folder(
                tmp,
                args.repo_id,
                token=args.token,
                private=args.private or None,
                commit_message=args.commit_message,
                keep_local=False,
            )
        except HubPushError as exc:
            print(f"{PROG} push: error: {exc} The model folder {args.model} was not changed.", file=sys.stderr)
            return 1
    print(f"Pushed {args.model} to {commit.repo_url} (commit {commit.oid})")
    return 0


def cmd_demo(args, extra: list[str]) -> int:
    if args.model is None:
        recipes = find_recipes_dir()
        module = _import_file(Path(recipes, "quickstart.py"))
        argv = ["--config", str(Path(recipes, "configs", "quickstart.yaml")), *extra]
        parsed = _parse_recipe_args(module, argv, f"quickstart.py {' '.join(extra)}")
        print(
            f"{PROG} demo: running the quickstart ({recipes / 'quickstart.py'}): fine-tune all-MiniLM-L6-v2 on tweet "
            "sentiment with L_depth, calibrate ASTI, compare every rule (about 10-20 minutes on a laptop CPU)",
            file=sys.stderr,
        )
        module.main(*parsed)
        return 0
    if extra:
        raise CliError(f"unrecognized arguments with --model: {' '.join(extra)} (recipe flags go with no --model)")
    if args.num_images < 1:
        raise CliError(f"--num_images must be >= 1, got {args.num_images}")
    model, kind = load_model(args.model)
    import torch

    config = model.config
    names = config.id2label or {}
    if kind == "lm":
        return _demo_lm(model, args)
    if kind == "text":
        tokenizer = load_tokenizer(args.model, args.tokenizer, config)
        texts = list(args.text or DEMO_TEXTS)
        inputs = tokenizer(texts, padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
        items = [repr(t if len(t) <= 60 else t[:57] + "...") for t in texts]
    else:
        from .data import load_mnist

        _check_image_model_for_mnist(config, args.model)
        test = load_mnist(train_size=1, validation_size=1, test_size=args.num_images)["test"]
        inputs = {"pixel_values": torch.stack([torch.as_tensor(x) for x in test["pixel_values"]])}
        items = [f"MNIST test image {i} (a {int(y)})" for i, y in enumerate(test["label"])]
    with torch.no_grad():
        out = model(**inputs)
    probs = out.logits.softmax(-1)
    n_layers = _num_blocks(config)
    print(
        f"{args.model}: rule {config.stopping_rule} {dict(config.stopping_params or {})}; exit layers are 0-based; "
        "compute = FLOPs used / full model\n"
    )
    print("| input | prediction | probability | exit layer | layers run | compute |")
    print("|---|---|---|---|---|---|")
    for i, item in enumerate(items):
        label = int(probs[i].argmax())
        exit_layer = int(out.exit_layer[i])
        run = f"{exit_layer + 1} of {n_layers}" if n_layers else ""
        print(
            f"| {item} | {names.get(label, str(label))} | {float(probs[i, label]):.2f} | {exit_layer} | {run} | "
            f"{float(out.compute_fraction[i]):.3f} |"
        )
    print(f"\nMean compute {float(out.compute_fraction.mean()):.3f} of the full model.")
    return 0


def _demo_lm(model, args) -> int:
    """Greedy generation from a few prompts, with the 0-based exit layer of every new token."""
    import torch

    if args.max_new_tokens < 1:
        raise CliError(f"--max_new_tokens must be >= 1, got {args.max_new_tokens}")
    config = model.config
    tokenizer = load_tokenizer(args.model, args.tokenizer, config)
    last = config.num_hidden_layers - 1
    print(
        f"{args.model}: rule {config.stopping_rule} {dict(config.stopping_params or {})}; exit layers "
        f"{list(config.exit_layers)} (0-based; {last} = full depth); greedy, {args.max_new_tokens} new tokens\n"
    )
    for prompt in args.text or DEMO_PROMPTS:
        encoded = tokenizer(prompt, return_tensors="pt")
        inputs = {key: encoded[key] for key in ("input_ids", "attention_mask") if key in encoded}
        with torch.no_grad():
            out = model.generate(
                **inputs,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                return_dict_in_generate=True,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        new = out.sequences[0, inputs["input_ids"].shape[1] :]
        exits = [int(x) for x in out.exit_layers[0] if int(x) >= 0]
        print(f"prompt: {prompt!r}")
        print(f"  continuation: {tokenizer.decode(new, skip_special_tokens=True)!r}")
        print(f"  exit layer per token: {exits}")
        print(f"  mean layers run per token: {sum(e + 1 for e in exits) / max(len(exits), 1):.1f} of {last + 1}\n")
    return 0


def _num_blocks(config) -> int | None:
    if getattr(config, "num_hidden_layers", None):
        return int(config.num_hidden_layers)
    depths = getattr(config, "depths", None)
    return int(sum(depths)) if depths else None


# ----------------------------------------------------------------------------------------------------------------
# parser
# ----------------------------------------------------------------------------------------------------------------
def _add_data_args(p: argparse.ArgumentParser, default_split: str) -> None:
    p.add_argument("model", metavar="MODEL", help="a saved model folder (or a Hub repo id)")
    p.add_argument(
        "--dataset",
        required=True,
        help="tweets (3-class tweet sentiment, offline), mnist (offline), or a dataset path: a folder "
        "saved with datasets' save_to_disk, or a .csv/.json/.jsonl/.parquet file with text (or "
        "input_ids, or pixel_values) and label columns",
    )
    p.add_argument("--split", default=default_split, choices=SPLITS, help=f"split to use (default {default_split})")
    p.add_argument("--max_examples", type=int, default=None, help="use only the first N examples of the split")
    p.add_argument("--batch_size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--max_length", type=int, default=64, help="text: truncation length in tokens (default 64)")
    p.add_argument("--tokenizer", default=None, help="text: tokenizer path or id (default: MODEL's own)")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=raw,
        description="Train, calibrate, evaluate, share and try early-exit (hf_depthstop) models.",
        epilog="Run `hf-depthstop COMMAND --help` for a command's options. Exit codes: 0 ok, 2 bad input, 1 failure.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "train",
        help="run a training recipe with its yaml config",
        formatter_class=raw,
        allow_abbrev=False,
        description="Run a training recipe in this process (so `accelerate launch -m hf_depthstop.cli train ...` "
        "runs it on N processes). Every flag not listed here goes to the recipe and overrides the yaml.",
        epilog="examples:\n"
        "  hf-depthstop train --config recipes/configs/quickstart.yaml --max_steps 100\n"
        "  hf-depthstop train --config recipes/configs/mnist_resnet.yaml --output_dir outputs/r\n"
        "  accelerate launch --multi_gpu --num_processes 2 -m hf_depthstop.cli train --config ...\n"
        "  hf-depthstop train --recipe text --recipe_help       # the recipe's own flags\n"
        "Recipe choice (or --recipe): arch: resnet|vit -> train_image_classifier.py, arch: llama|gpt2 -> "
        "train_lm.py,\nelse the first of train_classifier.py, train_lm.py, train_image_classifier.py whose flags "
        "cover every yaml key.\nRecipes are found next to the package or in $HF_DEPTHSTOP_RECIPES.",
    )
    p.add_argument("--config", default=None, help="recipe yaml (e.g. recipes/configs/quickstart.yaml)")
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPE_FILES),
        default=None,
        help="text (train_classifier.py), image (train_image_classifier.py) or lm (train_lm.py); "
        "default: chosen from the yaml",
    )
    p.add_argument("--recipe_help", action="store_true", help="show the recipe's own flags and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "calibrate",
        help="calibrate the stopping rules of a saved model on a dataset",
        formatter_class=raw,
        allow_abbrev=False,
        description="Calibrate every stopping rule on a labelled split, switch the model to --rule at its setting, "
        "print the table and save the calibrated model (written to a temporary folder, then moved).",
        epilog="example:\n  hf-depthstop calibrate outputs/quickstart --dataset tweets --target 0.02 "
        "--output_dir outputs/quickstart-2pt",
    )
    _add_data_args(p, "validation")
    p.add_argument(
        "--target",
        type=float,
        default=0.01,
        help="accuracy drop (0.01 = 1 point) or, for compute_budget, mean compute fraction (default 0.01)",
    )
    p.add_argument(
        "--target_type", choices=TARGET_TYPES, default="max_accuracy_drop", help="default max_accuracy_drop"
    )
    p.add_argument("--rule", default="asti", help="rule the saved model uses afterwards (default asti)")
    p.add_argument("--epsilon", type=float, default=0.1, help="risk_controlled: allowed failure probability")
    p.add_argument("--output_dir", default=None, help="where to save the calibrated model")
    p.add_argument("--in_place", action="store_true", help="overwrite MODEL's folder instead of --output_dir")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace a non-empty --output_dir")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "evaluate",
        help="rule table and accuracy-vs-compute plot of a saved or Hub model",
        formatter_class=raw,
        allow_abbrev=False,
        description="Run every calibrated rule (and `none`) live on a split: accuracy, mean exit layer (0-based), "
        "compute, measured speed-up; plus the oracle floor and per-exit accuracy. MODEL is not changed.",
        epilog="example:\n  hf-depthstop evaluate outputs/quickstart --dataset tweets --plot rules.png "
        "--output rules.json",
    )
    _add_data_args(p, "test")
    p.add_argument("--repeats", type=int, default=1, help="timing rounds per rule (median; default 1)")
    p.add_argument("--plot", default=None, help="write the accuracy-vs-compute plot (PNG) here")
    p.add_argument("--output", default=None, help="write the results (JSON) here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "push",
        help="upload a saved model (remote code, card, plot) to the Hub",
        formatter_class=raw,
        allow_abbrev=False,
        description="Upload a saved model folder: weights, config with the stopping rule and calibration, the "
        "remote code with auto_map (plain transformers loads it with trust_remote_code=True), the "
        "model card and its plot, and the folder's tokenizer files. The folder itself is not changed.",
        epilog="example:\n  hf-depthstop push outputs/quickstart --repo_id me/minilm-depthstop-sentiment\n"
        "The endpoint is $HF_ENDPOINT (default huggingface.co); the token --token, $HF_TOKEN or `hf auth login`.",
    )
    p.add_argument("model", metavar="MODEL", help="a saved model folder")
    p.add_argument("--repo_id", required=True, help="owner/name of the Hub repo (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN or the stored login)")
    p.add_argument("--commit_message", default=None, help="commit message")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser(
        "demo",
        help="run the quickstart, or show a saved model's exits on built-in examples",
        formatter_class=raw,
        allow_abbrev=False,
        description="Without --model: run recipes/quickstart.py (fine-tunes the offline MiniLM on tweets; extra "
        "flags go to it). With --model: classify built-in example texts (text models) or MNIST test "
        "images (image models) and show each example's exit layer and compute; language models generate from a few "
        "prompts and show each new token's exit layer.",
        epilog='examples:\n  hf-depthstop demo --model outputs/quickstart --text "what a lovely day"\n'
        "  hf-depthstop demo --output_dir outputs/quickstart --max_steps 50",
    )
    p.add_argument("--model", default=None, help="a saved model folder (or Hub repo id)")
    p.add_argument("--text", action="append", default=None, help="text to classify, or LM prompt (repeatable)")
    p.add_argument("--num_images", type=int, default=6, help="image models: MNIST test images to show (default 6)")
    p.add_argument("--max_new_tokens", type=int, default=20, help="language models: tokens to generate (default 20)")
    p.add_argument("--tokenizer", default=None, help="text: tokenizer path (default: the model's)")
    p.add_argument("--max_length", type=int, default=64, help="text: truncation length (default 64)")
    p.set_defaults(func=cmd_demo)
    parser.command_parsers = sub.choices  # {command: its parser}, for errors in the command's own usage
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("hf_depthstop")
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hf-depthstop` and `python -m hf_depthstop.cli`; returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in ("train", "demo"):
        parser.command_parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra)
    except CliError as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
