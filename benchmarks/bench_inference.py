# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Inference benchmark: stock transformers vs every calibrated stopping rule, side by side in one run.

    python recipes/quickstart.py                   # once: trains and calibrates outputs/quickstart
    python benchmarks/bench_inference.py           # = --model outputs/quickstart --batch_sizes 1,64 --repeats 3
                                                   #   --threads 2 --max_examples_batch1 500
    python benchmarks/bench_inference.py --max_examples 200 --max_examples_batch1 30 --repeats 1 \\
        --output_prefix /tmp/bench_test/inference  # a quick smoke run
    python benchmarks/bench_inference.py --model outputs/mnist_resnet --output_prefix benchmarks/results/inference_resnet
    python benchmarks/bench_inference.py --model outputs/mnist_vit --output_prefix benchmarks/results/inference_vit

On a saved, calibrated model and its test split, shuffled once with `--seed` (random order, like real traffic): a
BERT classifier on the tweet test split (`load_tweet_sentiment(8000, 2000, 2000, seed=0)`, tokenized with the model
directory's tokenizer, max_length 64); a ViT or ResNet on the MNIST test split (`load_mnist()`, 10k images).
Each batch size compares:

- `stock`: what a user deploys without hf_depthstop, holding the same weights: for BERT a `transformers.BertModel`
  (sdpa attention) then masked mean pooling + the model's final `classifier` (`exit_pooling="mean"`), or a stock
  `BertForSequenceClassification` (pooler + classifier) when the model uses `exit_pooling="cls"`; for images the stock
  `ViTForImageClassification` / `ResNetForImageClassification`. Its logits are checked against rule `none` (max
  |diff| <= 1e-4);
- rule `none` and every calibrated rule at its calibrated setting (`rules_from_calibration`), run live;
- the oracle floor (each example stops at the first exit after which its prediction never changes), from full-depth
  exit logits: accuracy and compute only, since no rule can know the future, so it has no wall-clock.

Timing: batches are built before the clock starts; every configuration is warmed up, then configurations alternate
within each repeat, in an order rotated per repeat; the table reports median seconds per configuration, speed-up =
median(stock) / median(config) and the median of the per-repeat paired ratios. Batch 1 runs on a fixed random subset
of `--max_examples_batch1` examples (it costs about 8 ms per example per configuration per repeat); the other batch
sizes run on the whole (or `--max_examples`) test split.

Writes `<output_prefix>.md` (tables, command, date, versions, threads, machine) and `<output_prefix>.json` (raw
numbers); `--output_prefix` defaults to benchmarks/results/inference.
"""

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import hf_depthstop
from hf_depthstop.calibration import CALIBRATED_RULES, iterate_batches
from hf_depthstop.data import load_mnist, load_tweet_sentiment, tokenize_for_classification
from hf_depthstop.evaluation import rules_from_calibration
from hf_depthstop.stopping import RULE_PARAMETERS


HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT_PREFIX = os.path.join(HERE, "results", "inference")
QUICKSTART_HINT = (
    "run the quickstart first: `python recipes/quickstart.py` (it saves outputs/quickstart), or for images "
    "`python recipes/train_image_classifier.py --config recipes/configs/mnist_resnet.yaml` (outputs/mnist_resnet)"
)
# model_type -> (stock classifier class, stock config class) of the image classifiers
IMAGE_MODELS = {
    "depthstop_vit": (ViTForImageClassification, ViTConfig),
    "depthstop_resnet": (ResNetForImageClassification, ResNetConfig),
}
LOGIT_TOLERANCE = 1e-4
# BertConfig fields copied from the depthstop config into the stock model's config (everything that sizes it).
BERT_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id", "classifier_dropout",
)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------
class StockMeanPoolClassifier(nn.Module):
    """Stock `BertModel` -> masked mean over real tokens -> dropout -> linear: a sentence-encoder classifier built
    from plain transformers, as deployed without hf_depthstop. Returns logits `(batch_size, num_labels)`."""

    def __init__(self, bert: BertModel, classifier: nn.Linear):
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(bert.config.hidden_dropout_prob)
        self.classifier = classifier

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        hidden = hidden.last_hidden_state  # (batch, seq, hidden)
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))


class StockLogits(nn.Module):
    """A stock transformers classifier (`BertForSequenceClassification`, `ViTForImageClassification`,
    `ResNetForImageClassification`) returning its logits `(batch_size, num_labels)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**inputs).logits


def is_image_model(model) -> bool:
    return model.config.model_type in IMAGE_MODELS


def load_depthstop(model_dir: str):
    if not os.path.isdir(model_dir):
        raise SystemExit(f"error: model directory {model_dir!r} does not exist; {QUICKSTART_HINT}")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise SystemExit(f"error: {model_dir!r} has no config.json (not a saved model); {QUICKSTART_HINT}")
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    if model_type == "depthstop_resnet":
        model = AutoModelForImageClassification.from_pretrained(model_dir)
    elif model_type in IMAGE_MODELS:
        model = AutoModelForImageClassification.from_pretrained(model_dir, attn_implementation="sdpa")
    elif model_type == "depthstop_bert":
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="sdpa")
    else:
        raise SystemExit(f"error: {model_dir!r} holds a {model_type!r} model, not an hf_depthstop classifier")
    if model.config.calibration is None:
        raise SystemExit(
            f"error: the model in {model_dir!r} has no calibration (model.config.calibration is None), so its "
            f"stopping rules have no calibrated settings; {QUICKSTART_HINT}, or calibrate it with "
            "hf_depthstop.calibration.calibrate(model, validation_split) and save it"
        )
    if not model.config.calibration.get("settings"):
        raise SystemExit(f"error: the calibration of {model_dir!r} holds no rule settings; {QUICKSTART_HINT}")
    return model.eval()


def build_stock(model) -> nn.Module:
    """The same weights in plain transformers classes (sdpa attention where there is attention)."""
    c = model.config
    if is_image_model(model):
        stock_class, config_class = IMAGE_MODELS[c.model_type]
        fields = config_class().to_dict()
        kwargs = {k: v for k, v in c.to_dict().items() if k in fields and k not in ("model_type", "architectures")}
        if c.model_type == "depthstop_vit":
            kwargs["attn_implementation"] = "sdpa"
        stock = stock_class(config_class(**kwargs))
        ours = model.state_dict()
        missing = [k for k in stock.state_dict() if k not in ours]
        if missing:
            raise SystemExit(f"error: the stock {stock_class.__name__} needs weights the model lacks: {missing[:5]}")
        stock.load_state_dict({k: ours[k] for k in stock.state_dict()})
        return StockLogits(stock).eval()
    kwargs = {name: getattr(c, name) for name in BERT_FIELDS}
    if c.exit_pooling == "cls":
        config = BertConfig(**kwargs, num_labels=c.num_labels, attn_implementation="sdpa")
        stock = BertForSequenceClassification(config)
        stock.bert.load_state_dict(model.bert.state_dict())  # includes the pooler
        stock.classifier.load_state_dict(model.classifier.state_dict())
        stock = StockLogits(stock)
    else:
        config = BertConfig(**kwargs, attn_implementation="sdpa")
        bert = BertModel(config, add_pooling_layer=False)
        bert.load_state_dict(model.bert.state_dict())
        stock = StockMeanPoolClassifier(bert, copy.deepcopy(model.classifier))
    return stock.eval()


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------
def load_test_split(model, model_dir: str, seed: int, max_examples: int | None):
    if is_image_model(model):
        test = load_mnist()["test"]
        order = np.random.default_rng(seed).permutation(len(test))  # random order, like real traffic
        if max_examples is not None:
            order = order[:max_examples]
        return test.select(order.tolist()), len(test)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: no tokenizer could be loaded from {model_dir!r} ({e}); {QUICKSTART_HINT}") from e
    test = load_tweet_sentiment(8000, 2000, 2000, seed=0)["test"]
    test = tokenize_for_classification(test, tokenizer, max_length=64)
    order = np.random.default_rng(seed).permutation(len(test))  # random order, like real traffic
    if max_examples is not None:
        order = order[:max_examples]
    return test.select(order.tolist()), len(test)


def build_batches(dataset, batch_size: int, pad_token_id: int) -> tuple[list, np.ndarray]:
    """Batches (inputs only) in dataset order, built before any clock starts; plus the labels."""
    batches = []
    labels = np.zeros(len(dataset), dtype=np.int64)
    for rows, batch in iterate_batches(dataset, batch_size, pad_token_id, "cpu", sort_by_length=False):
        labels[rows] = batch.pop("labels").numpy()
        batches.append((rows, batch))
    return batches, labels


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------
def make_runner(name: str, model, stock, rules: dict):
    """A callable `batch -> output`; the rule is set on the model (outside the clock) before each run."""
    if name == "stock":
        return lambda batch: stock(**batch)

    def run(batch):
        return model(**batch)

    def prepare():
        model.set_stopping_rule(name, **rules[name])

    run.prepare = prepare
    return run


def timed_pass(runner, batches) -> tuple[float, list]:
    """Seconds for the forward calls over all batches (outputs are kept and read after the clock stops)."""
    if hasattr(runner, "prepare"):
        runner.prepare()
    gc.collect()
    outputs = []
    start = time.perf_counter()
    for _, batch in batches:
        outputs.append(runner(batch))
    seconds = time.perf_counter() - start
    return seconds, outputs


def collect(name: str, outputs: list, batches: list, n: int, num_labels: int, last_layer: int) -> dict:
    logits = np.zeros((n, num_labels), dtype=np.float32)
    exit_layer = np.full(n, last_layer, dtype=np.int64)
    compute = np.ones(n)
    for (rows, _), out in zip(batches, outputs):
        if name == "stock":
            logits[rows] = out.float().numpy()
        else:
            logits[rows] = out.logits.float().numpy()
            exit_layer[rows] = out.exit_layer.numpy()
            compute[rows] = out.compute_fraction.double().numpy()
    return {"logits": logits, "exit_layer": exit_layer, "compute_fraction": compute}


def oracle_floor(model, dataset, pad_token_id: int) -> dict:
    """Per example: the first exit after which the prediction never changes, from full-depth exit logits."""
    n = len(dataset)
    exit_layers = torch.tensor(model.config.exit_layers)
    preds = np.zeros(n, dtype=np.int64)
    exit_layer = np.zeros(n, dtype=np.int64)
    compute = np.zeros(n)
    for rows, batch in iterate_batches(dataset, 64, pad_token_id, "cpu", sort_by_length=True):
        batch.pop("labels", None)
        out = model(**batch, output_exit_logits=True)
        p = out.exit_logits.argmax(-1)  # (batch, num_exits)
        agree = (p == p[:, -1:]).int()
        same_after = torch.flip(torch.cumprod(torch.flip(agree, [1]), 1), [1]).bool()
        pos = same_after.int().argmax(1)  # first exit from which every later exit agrees with the final one
        idx = torch.arange(p.shape[0])
        preds[rows] = p[:, -1].numpy()
        exit_layer[rows] = exit_layers[pos].numpy()
        compute[rows] = out.exit_compute_fractions[idx, pos].double().numpy()
    return {"predictions": preds, "exit_layer": exit_layer, "compute_fraction": compute}


def bench_batch_size(model, stock, rules, dataset, batch_size, args, pad, oracle) -> dict:
    names = ["stock", *rules]
    batches, labels = build_batches(dataset, batch_size, pad)
    n = len(dataset)
    runners = {name: make_runner(name, model, stock, rules) for name in names}
    for name in names:  # warm-up (not timed)
        timed_pass(runners[name], batches[: args.warmup_batches])
    times = {name: [] for name in names}
    results = {}
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            seconds, outputs = timed_pass(runners[name], batches)
            times[name].append(seconds)
            if r == 0:
                results[name] = collect(
                    name, outputs, batches, n, model.config.num_labels, model.config.exit_layers[-1]
                )
            del outputs
        print(f"  batch {batch_size}: repeat {r + 1}/{args.repeats} done", flush=True)

    stock_median = float(np.median(times["stock"]))
    stock_acc = float((results["stock"]["logits"].argmax(-1) == labels).mean())
    rows = []
    for name in names:
        res = results[name]
        median = float(np.median(times[name]))
        paired = [s / t for s, t in zip(times["stock"], times[name])]
        acc = float((res["logits"].argmax(-1) == labels).mean())
        compute = float(res["compute_fraction"].mean())
        param = RULE_PARAMETERS.get(name)
        rows.append(
            {
                "configuration": name,
                "setting": {param: rules[name][param]} if param else {},
                "accuracy": acc,
                "accuracy_vs_stock_points": 100 * (acc - stock_acc),
                "mean_exit_layer": float(res["exit_layer"].mean()),
                "compute_fraction": compute,
                "flops_ratio": 1.0 / compute,
                "seconds": times[name],
                "median_seconds": median,
                "speedup": stock_median / median,
                "paired_ratios": paired,
                "paired_speedup_median": float(np.median(paired)),
                "ms_per_example": 1000 * median / n,
            }
        )
    oracle_compute = float(oracle["compute_fraction"][:n].mean())
    oracle_acc = float((oracle["predictions"][:n] == labels).mean())
    rows.append(
        {
            "configuration": "oracle floor",
            "setting": {},
            "accuracy": oracle_acc,
            "accuracy_vs_stock_points": 100 * (oracle_acc - stock_acc),
            "mean_exit_layer": float(oracle["exit_layer"][:n].mean()),
            "compute_fraction": oracle_compute,
            "flops_ratio": 1.0 / oracle_compute,
            "seconds": None, "median_seconds": None, "speedup": None, "paired_ratios": None,
            "paired_speedup_median": None, "ms_per_example": None,
        }
    )
    none_median = float(np.median(times["none"]))
    max_diff = float(np.abs(results["stock"]["logits"] - results["none"]["logits"]).max())
    return {
        "batch_size": batch_size,
        "num_examples": n,
        "num_batches": len(batches),
        "rows": rows,
        "none_overhead_percent": 100 * (none_median / stock_median - 1),
        "none_overhead_paired_percent": 100 * (float(np.median([t / s for s, t in zip(times["stock"], times["none"])])) - 1),
        "stock_vs_none_max_abs_logit_diff": max_diff,
        "stock_vs_none_ok": max_diff <= LOGIT_TOLERANCE,
        "_predictions": {name: results[name]["logits"].argmax(-1) for name in names},
        "_exit_layers": {name: results[name]["exit_layer"] for name in names},
    }


# ----------------------------------------------------------------------------------------------------------------
# Reporting
# ----------------------------------------------------------------------------------------------------------------
def format_setting(setting: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def table_markdown(result: dict, saved_rule: str) -> str:
    lines = [
        "| configuration | setting | accuracy (%) | vs stock (pts) | mean exit layer | compute (FLOPs) | FLOPs ratio "
        "| wall-clock speed-up | paired speed-up | ms/example |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        name = row["configuration"]
        label = f"`{name}`" + (" (saved rule)" if name == saved_rule else "")
        if name == "oracle floor":
            label = "oracle floor (not runnable live)"
        timed = row["median_seconds"] is not None
        cells = [
            label,
            format_setting(row["setting"]),
            f"{100 * row['accuracy']:.2f}",
            f"{row['accuracy_vs_stock_points']:+.2f}",
            f"{row['mean_exit_layer']:.2f}",
            f"{row['compute_fraction']:.3f}",
            f"{row['flops_ratio']:.2f}x",
            f"{row['speedup']:.2f}x" if timed else "n/a",
            f"{row['paired_speedup_median']:.2f}x" if timed else "n/a",
            f"{row['ms_per_example']:.2f}" if timed else "n/a",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(meta: dict, results: list[dict], consistency: dict | None) -> str:
    out = [
        "# Inference benchmark: stock transformers vs hf_depthstop stopping rules",
        "",
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- torch {meta['torch']}, transformers {meta['transformers']}, hf_depthstop {meta['hf_depthstop']}",
        f"- machine: {meta['machine']} ({meta['nproc']} CPUs), torch threads: {meta['threads']}, "
        f"load average at start / end: {meta['loadavg_start']} / {meta['loadavg_end']}"
        + (" (**busy machine at start: wall-clock numbers are noisy**)" if meta["busy_at_start"] else ""),
        f"- model: `{meta['model']}` ({meta['model_type']}, {meta['num_hidden_layers']} blocks, exits after "
        f"{meta['exit_layers']}, exit_pooling={meta['exit_pooling']}, attention {meta['attn_implementation']}); calibration "
        f"{meta['calibration_target_type']} target {meta['calibration_target']}; saved rule `{meta['saved_rule']}`",
        (f"- data: MNIST test split ({meta['test_size']} images, load_mnist()), shuffled once (seed {meta['seed']})"
         if meta["model_type"] in IMAGE_MODELS else
         f"- data: tweet sentiment test split ({meta['test_size']} examples, load_tweet_sentiment(8000, 2000, 2000, "
         f"seed=0)), max_length 64, shuffled once (seed {meta['seed']}), batches in that order (no length sorting)"),
        f"- timing: {meta['repeats']} repeat(s), {meta['warmup_batches']} warm-up batch(es) per configuration, "
        "configurations alternated within each repeat with the order rotated per repeat, batches built before the "
        "clock starts, torch.inference_mode(). Wall-clock speed-up = median seconds of stock / of the configuration; "
        "paired speed-up = median over repeats of the same-repeat ratio.",
        ("- stock = the plain transformers `" + IMAGE_MODELS[meta["model_type"]][0].__name__ + "` with the same weights"
         if meta["model_type"] in IMAGE_MODELS else
         "- stock = plain transformers `BertModel` (sdpa) with the same weights + "
         + ("the stock `BertForSequenceClassification` pooler + classifier" if meta["exit_pooling"] == "cls"
            else "masked mean pooling + the model's final classifier"))
        + "; compute (FLOPs) is the mean fraction of the full model's FLOPs; mean exit layer is 0-based.",
        "",
    ]
    for res in results:
        bs, n = res["batch_size"], res["num_examples"]
        if res.get("subset_note"):
            what = res["subset_note"]
        else:
            what = f"{n} test examples"
        out += [f"## Batch {bs} ({what}, {res['num_batches']} batches)", "", table_markdown(res, meta["saved_rule"]), ""]
        ok = "OK" if res["stock_vs_none_ok"] else f"MISMATCH (above {LOGIT_TOLERANCE:g})"
        out += [
            f"- `none` overhead vs stock: {res['none_overhead_percent']:+.1f}% (ratio of medians), "
            f"{res['none_overhead_paired_percent']:+.1f}% (median paired)",
            f"- stock vs `none` logits: max |diff| = {res['stock_vs_none_max_abs_logit_diff']:.2e} ({ok})",
            "",
        ]
    overhead = ", ".join(f"batch {r['batch_size']} {r['none_overhead_percent']:+.1f}%" for r in results)
    out += [f"**`none` overhead vs stock:** {overhead}.", ""]
    if consistency:
        bad = {k: v for k, v in consistency["per_configuration"].items() if v["predictions_differ"] or v["exit_layers_differ"]}
        summary = "identical for every configuration" if not bad else "; ".join(
            f"`{k}`: {v['predictions_differ']} predictions, {v['exit_layers_differ']} exit layers differ"
            for k, v in bad.items()
        )
        out += [
            f"Batch-size invariance (batch 1 vs batch {consistency['other_batch_size']} on the same "
            f"{consistency['num_examples']} examples): {summary}.",
            "",
        ]
    return "\n".join(out)


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"--batch_sizes must be comma-separated positive integers, got {text!r}")
    return sizes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/quickstart", help="saved calibrated model directory")
    parser.add_argument("--batch_sizes", type=parse_batch_sizes, default=[1, 64], help="comma-separated, e.g. 1,64")
    parser.add_argument("--repeats", type=int, default=3, help="timing rounds (median over them)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--max_examples", type=int, default=None, help="cap on test examples (default: the whole test split)")
    parser.add_argument(
        "--max_examples_batch1", type=int, default=500,
        help="batch 1 runs on a fixed random subset of this many test examples (0: all of them)",
    )
    parser.add_argument("--warmup_batches", type=int, default=3, help="untimed batches per configuration first")
    parser.add_argument("--seed", type=int, default=0, help="seed of the one shuffle of the test split")
    parser.add_argument("--output_prefix", default=DEFAULT_OUTPUT_PREFIX, help="writes <prefix>.md and <prefix>.json")
    args = parser.parse_args(argv)
    for flag in ("repeats", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if args.max_examples is not None and args.max_examples < 1:
        parser.error(f"--max_examples must be >= 1, got {args.max_examples}")
    if args.warmup_batches < 0 or args.max_examples_batch1 < 0:
        parser.error("--warmup_batches and --max_examples_batch1 must be >= 0")

    torch.set_num_threads(args.threads)
    loadavg_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    busy = loadavg_start is not None and loadavg_start[0] > max(0.5, (os.cpu_count() or 1) - args.threads + 0.5)
    if busy:
        print(f"WARNING: the machine is busy (1-min load average {loadavg_start[0]:.1f} on {os.cpu_count()} CPUs, "
              f"{args.threads} threads asked): wall-clock numbers will be noisy; run on an idle machine", flush=True)
    model = load_depthstop(args.model)
    saved_rule = model.config.stopping_rule
    saved_params = dict(model.config.stopping_params)
    calibrated = rules_from_calibration(model)  # saved configs list the rules in JSON (alphabetical) order
    order = ["none", *CALIBRATED_RULES]
    rules = {name: calibrated[name] for name in sorted(calibrated, key=lambda r: order.index(r) if r in order else 99)}
    stock = build_stock(model)
    pad = getattr(model.config, "pad_token_id", None) or 0
    dataset, test_size = load_test_split(model, args.model, args.seed, args.max_examples)
    print(f"model {args.model}: rules {', '.join(rules)}; {len(dataset)} test examples; {args.threads} threads",
          flush=True)

    results = []
    with torch.inference_mode():
        oracle = oracle_floor(model, dataset, pad)
        for bs in args.batch_sizes:
            data = dataset
            note = None
            if bs == 1 and 0 < args.max_examples_batch1 < len(dataset):
                # the shuffled order makes the first rows a fixed random subset
                data = dataset.select(range(args.max_examples_batch1))
                note = (f"fixed random subset of {len(data)} of the {len(dataset)} test examples, "
                        "--max_examples_batch1")
            print(f"batch {bs}: {len(data)} examples", flush=True)
            res = bench_batch_size(model, stock, rules, data, bs, args, pad, oracle)
            res["subset_note"] = note
            results.append(res)
    model.set_stopping_rule(saved_rule, **saved_params)

    # batch-size invariance: a row's result must not depend on the other rows of its batch
    consistency = None
    one = next((r for r in results if r["batch_size"] == 1), None)
    other = next((r for r in results if r["batch_size"] != 1), None)
    if one is not None and other is not None:
        n1 = min(one["num_examples"], other["num_examples"])
        consistency = {"other_batch_size": other["batch_size"], "num_examples": n1, "per_configuration": {}}
        for name in one["_predictions"]:
            consistency["per_configuration"][name] = {
                "predictions_differ": int((one["_predictions"][name][:n1] != other["_predictions"][name][:n1]).sum()),
                "exit_layers_differ": int((one["_exit_layers"][name][:n1] != other["_exit_layers"][name][:n1]).sum()),
            }
    for res in results:
        res.pop("_predictions")
        res.pop("_exit_layers")

    calib = model.config.calibration
    meta = {
        "command": "python " + " ".join(shlex.quote(a) for a in ([sys.argv[0], *argv] if argv is not None else sys.argv)),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_depthstop": hf_depthstop.__version__,
        "machine": platform.processor() or platform.machine(),
        "nproc": os.cpu_count(),
        "threads": args.threads,
        "loadavg_start": [round(x, 2) for x in loadavg_start] if loadavg_start else None,
        "busy_at_start": busy,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "model": args.model,
        "num_hidden_layers": model.config.num_hidden_layers,
        "exit_layers": list(model.config.exit_layers),
        "model_type": model.config.model_type,
        "exit_pooling": getattr(model.config, "exit_pooling", None),
        "attn_implementation": model.config._attn_implementation,
        "calibration_target_type": calib.get("target_type"),
        "calibration_target": calib.get("target"),
        "saved_rule": saved_rule,
        "saved_params": saved_params,
        "rules": rules,
        "test_size": test_size,
        "num_examples": len(dataset),
        "seed": args.seed,
        "repeats": args.repeats,
        "warmup_batches": args.warmup_batches,
        "batch_sizes": args.batch_sizes,
        "max_examples": args.max_examples,
        "max_examples_batch1": args.max_examples_batch1,
    }
    markdown = report_markdown(meta, results, consistency)
    print()
    print(markdown)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.output_prefix + ".md", "w") as f:
        f.write(markdown)
    payload = {"meta": meta, "results": results, "batch_size_invariance": consistency}
    with open(args.output_prefix + ".json", "w") as f:
        json.dump(payload, f, indent=2, default=float)
    print(f"wrote {args.output_prefix}.md and {args.output_prefix}.json")
    if not all(r["stock_vs_none_ok"] for r in results):
        print(f"WARNING: stock and rule `none` logits differ by more than {LOGIT_TOLERANCE:g}", file=sys.stderr)
    return payload


if __name__ == "__main__":
    main()
