# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Generation benchmark: stock `generate` vs per-token ASTI exits, lossless self-speculative decoding and transformers'
own `assistant_early_exit`, on the real SmolLM2-135M before and after the L_depth recipe, side by side in one run.

    python benchmarks/bench_generation.py                                   # before = SmolLM2, after = outputs/smollm2_shakespeare
    python benchmarks/bench_generation.py --after outputs/smollm2_shakespeare --num_prompts 8 --max_new_tokens 64
    python benchmarks/bench_generation.py --num_prompts 2 --max_new_tokens 8 --ppl_blocks 2 --calibration_blocks 4 \
        --out_dir /tmp/bench                                                # a smoke run

Protocol (nothing is chosen on the test plays):
- Prompts: the first `prompt_tokens` tokens of `num_prompts` blocks of the *test* plays (Julius Caesar, The Tempest),
  all the same length, so batches need no padding. Greedy decoding, `max_new_tokens` new tokens.
- Reference: the stock `LlamaForCausalLM` (plain transformers, same weights) with greedy `generate`.
- ASTI: `DepthStopLlamaForCausalLM.generate` with the calibrated `asti` rule. A model without a calibration (the
  "before" model) is calibrated here first with `calibrate_lm` on the *validation* plays at the same target as the
  recipe, with the same exit layers and early-exit vocabulary (`exit_vocab`) as the "after" model, so both get the
  same protocol.
- `asti (target T)`: a copy of the model calibrated here on the same validation blocks at the stricter
  `--strict_target` (teacher-forced disagreement), to show the speed / agreement trade-off.
- Lossless: `generate(..., depthstop_mode="lossless")` (drafts with ASTI exits, verifies at full depth), and
  `lossless static@L`: drafts always leave at the first exit L (a fixed draft depth, as LayerSkip).
- `assistant_early_exit=N` (LayerSkip-style self-speculation built into transformers; it refuses batches > 1, so it is
  run at batch 1 only), with N = the first exit layer + 1 by default.
- Metrics per mode: new tokens per second (wall clock, every generated token counted, up to and including EOS), the
  speed-up over stock at the same batch size, mean 0-based exit layer of the new tokens (the first new token comes
  from the full-depth prefill), token agreement (share of positions whose token equals stock greedy's token at that
  position) and prefix agreement (share of new tokens before the first difference). Held-out perplexity of each exit
  on `ppl_blocks` blocks of the test plays (teacher forcing).

Writes `<out_dir>/generation.md` and `<out_dir>/generation.json`.
"""

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from hf_depthstop import DepthStopLlamaForCausalLM, calibrate_lm
from hf_depthstop.data import load_shakespeare, smollm2_checkpoint_path


DEFAULT_AFTER = "outputs/smollm2_shakespeare"
DEFAULT_EXIT_LAYERS = "11,17,23,29"  # the recipe's (recipes/configs/smollm2_shakespeare.yaml)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--before", default=None, help="Model before the recipe (default: the offline SmolLM2-135M).")
    p.add_argument("--after", default=DEFAULT_AFTER, help="Model after the recipe ('none' to skip).")
    p.add_argument("--exit_layers", default=None, help="Exits of a model without them (default: the after model's).")
    p.add_argument("--num_prompts", type=int, default=8, help="Prompts (one batch of 8, or 8 runs of 1).")
    p.add_argument("--prompt_tokens", type=int, default=32, help="Tokens per prompt.")
    p.add_argument("--max_new_tokens", type=int, default=64, help="New tokens per prompt.")
    p.add_argument("--batch_sizes", default="1,8", help="Comma-separated batch sizes.")
    p.add_argument("--num_draft_tokens", type=int, default=4, help="Lossless mode: most tokens per draft.")
    p.add_argument("--assistant_early_exit", type=int, default=None, help="Layers of the LayerSkip draft.")
    p.add_argument("--calibration_target", type=float, default=0.1, help="Calibration of uncalibrated models.")
    p.add_argument("--strict_target", type=float, default=0.02, help="Target of the extra, stricter ASTI mode.")
    p.add_argument("--calibration_blocks", type=int, default=64, help="Validation blocks for that calibration.")
    p.add_argument("--ppl_blocks", type=int, default=32, help="Test blocks (128 tokens) for the perplexity.")
    p.add_argument("--num_threads", type=int, default=2, help="torch threads.")
    p.add_argument("--out_dir", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    for name in ("num_prompts", "prompt_tokens", "max_new_tokens", "num_draft_tokens", "calibration_blocks",
                 "ppl_blocks", "num_threads"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for b in args.batch_sizes:
        if b < 1 or args.num_prompts % b:
            p.error(f"--batch_sizes entries must be >= 1 and divide --num_prompts={args.num_prompts}, got {b}")
    return args


def _new_token_counts(new_tokens: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(batch, new) -> (batch,) tokens generated per row, up to and including its first EOS."""
    if not eos_ids:
        return torch.full((new_tokens.shape[0],), new_tokens.shape[1])
    is_eos = torch.isin(new_tokens, torch.tensor(eos_ids))
    full = torch.full((new_tokens.shape[0],), new_tokens.shape[1])
    return torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, full)


def _agreement(tokens: torch.Tensor, reference: torch.Tensor, counts: torch.Tensor) -> tuple[float, float]:
    """Token agreement and prefix agreement of `tokens` with `reference` (both (batch, new)) over `counts` tokens."""
    width = min(tokens.shape[1], reference.shape[1])
    same = tokens[:, :width] == reference[:, :width]
    total = matched = prefix = 0
    for row in range(tokens.shape[0]):
        n = int(min(counts[row], width))
        total += n
        matched += int(same[row, :n].sum())
        diff = (~same[row, :n]).nonzero()
        prefix += int(diff[0]) if len(diff) else n
    return matched / max(total, 1), prefix / max(total, 1)


def run_mode(name, generate, prompts, batch_size, eos_ids, reference=None):
    """Generates for every prompt in batches; returns the tokens (num_prompts, new) and the metrics."""
    outputs, exits, seconds, verify = [], [], 0.0, 0
    for start in range(0, prompts.shape[0], batch_size):
        ids = prompts[start : start + batch_size]
        t0 = time.perf_counter()
        out = generate(ids)
        seconds += time.perf_counter() - t0
        sequences = out.sequences if hasattr(out, "sequences") else out
        outputs.append(sequences[:, ids.shape[1] :])
        if getattr(out, "exit_layers", None) is not None:
            exits.append(out.exit_layers)
        verify += int(getattr(out, "num_verify_passes", 0) or 0)
    width = max(o.shape[1] for o in outputs)
    pad = eos_ids[0] if eos_ids else 0
    tokens = torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1]), value=pad) for o in outputs])
    counts = _new_token_counts(tokens, eos_ids)
    row = {"mode": name, "batch_size": batch_size, "new_tokens": int(counts.sum()), "seconds": seconds}
    row["tokens_per_second"] = row["new_tokens"] / seconds
    if exits:
        layers = [e[r, : int(c)].float() for e, offset in zip(exits, range(0, len(counts), batch_size))
                  for r, c in enumerate(counts[offset : offset + e.shape[0]])]  # fmt: skip
        row["mean_exit_layer"] = float(torch.cat(layers).mean())
    if verify:
        row["verify_passes"] = verify
    if reference is not None:
        row["token_agreement"], row["prefix_agreement"] = _agreement(tokens, reference, counts)
    return tokens, row


@torch.no_grad()
def perplexities(model, blocks: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Per-exit perplexity (exp of the token-mean next-token cross-entropy) on `blocks` (n, block_size)."""
    total, n_tokens = None, 0
    for chunk in torch.split(blocks, batch_size):
        out = model(input_ids=chunk, labels=chunk, output_exit_logits=True)
        n = chunk.shape[0] * (chunk.shape[1] - 1)
        total = out.exit_losses * n if total is None else total + out.exit_losses * n
        n_tokens += n
    return [math.exp(float(x)) for x in total / n_tokens]


def bench_model(label, path, args, prompts, ppl_blocks, calibration_batches, exit_layers, exit_vocab=None):
    print(f"\n== {label}: {path}", flush=True)
    kwargs = {} if exit_layers is None else {"exit_layers": exit_layers}
    model = DepthStopLlamaForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    if exit_vocab is not None:
        model.set_exit_vocab(exit_vocab)
    stock = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # plain transformers, same weights
    result = {"model": label, "path": path, "exit_layers": model.config.exit_layers}
    if not model.config.calibration:
        t0 = time.perf_counter()
        calibrate_lm(model, calibration_batches, target=args.calibration_target, rule="asti")
        result["calibrated_here_seconds"] = time.perf_counter() - t0
    else:
        model.set_stopping_rule("asti", **model.config.calibration["settings"]["asti"])
    calibration = model.config.calibration
    result["calibration"] = {"table": calibration["table"], "oracle_floor": calibration["oracle_floor"],
                             "target": calibration["target"], "num_tokens": calibration["num_tokens"]}  # fmt: skip
    result["stopping_params"] = model.config.stopping_params
    result["exit_vocab_size"] = None if model.config.exit_vocab is None else len(model.config.exit_vocab)
    result["exit_adapter"] = model.config.exit_adapter
    strict = copy.deepcopy(model)
    calibrate_lm(strict, calibration_batches, target=args.strict_target, rule="asti")
    result["strict_calibration"] = {
        "target": args.strict_target,
        "row": next(r for r in strict.config.calibration["table"] if r["rule"] == "asti"),
    }
    t0 = time.perf_counter()
    result["test_perplexity"] = dict(zip(map(str, model.config.exit_layers), perplexities(model, ppl_blocks)))
    print(f"test perplexity per exit layer: {result['test_perplexity']} ({time.perf_counter() - t0:.0f} s)")

    eos = model.generation_config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    common = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=eos_ids[0] if eos_ids else 0)
    draft_layers = args.assistant_early_exit or model.config.exit_layers[0] + 1
    first = model.config.exit_layers[0]
    modes = {
        "stock": lambda ids: stock.generate(ids, **common),
        "asti": lambda ids: model.generate(ids, return_dict_in_generate=True, **common),
        f"asti (target {args.strict_target})": lambda ids: strict.generate(ids, return_dict_in_generate=True, **common),
        "lossless": lambda ids: model.generate(
            ids,
            depthstop_mode="lossless",
            num_draft_tokens=args.num_draft_tokens,
            return_dict_in_generate=True,
            **common,
        ),
        f"lossless static@{first}": lambda ids: model.generate(
            ids,
            depthstop_mode="lossless",
            stopping_rule="static",
            stopping_params={"layer": first},
            num_draft_tokens=args.num_draft_tokens,
            return_dict_in_generate=True,
            **common,
        ),
        f"assistant_early_exit={draft_layers}": lambda ids: stock.generate(
            ids, assistant_early_exit=draft_layers, **common
        ),
    }
    rows = []
    for batch_size in args.batch_sizes:
        modes["stock"](prompts[:batch_size, :8])  # warm-up (allocator, threads)
        reference, stock_row = run_mode("stock", modes["stock"], prompts, batch_size, eos_ids)
        stock_row.update(token_agreement=1.0, prefix_agreement=1.0, speedup=1.0)
        rows.append(stock_row)
        print(_row_text(stock_row), flush=True)
        for name, generate in modes.items():
            if name == "stock" or (name.startswith("assistant") and batch_size > 1):
                continue
            _, row = run_mode(name, generate, prompts, batch_size, eos_ids, reference)
            row["speedup"] = row["tokens_per_second"] / stock_row["tokens_per_second"]
            rows.append(row)
            print(_row_text(row), flush=True)
    result["rows"] = rows
    return result


def _row_text(row: dict) -> str:
    parts = [f"{row['mode']:<24} batch {row['batch_size']}: {row['tokens_per_second']:6.1f} tok/s"]
    for key in ("speedup", "mean_exit_layer", "token_agreement", "prefix_agreement"):
        if key in row:
            parts.append(f"{key} {row[key]:.3f}")
    return ", ".join(parts)


def to_markdown(results: list[dict], args, meta: dict) -> str:
    lines = [
        "# Generation benchmark: SmolLM2-135M before / after the L_depth recipe",
        "",
        f"Command: `{meta['command']}`. Machine: {meta['machine']}, torch threads {args.num_threads}. "
        f"{args.num_prompts} prompts of {args.prompt_tokens} tokens from the test plays, greedy, "
        f"{args.max_new_tokens} new tokens. Tokens/s count every generated token (wall clock). Agreement is with "
        "stock greedy decoding of the same weights (token: same token at the same position; prefix: share of tokens "
        "before the first difference). The first new token comes from the full-depth prefill. "
        "`assistant_early_exit` refuses batches > 1.",
        "",
        "| model | batch | mode | tokens/s | speed-up vs stock | mean exit layer (0-based) | token agreement | "
        "prefix agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda row, key: f"{row[key]:.3f}" if key in row else "–"  # noqa: E731
    for result in results:
        for row in result["rows"]:
            lines.append(
                f"| {result['model']} | {row['batch_size']} | {row['mode']} | {row['tokens_per_second']:.1f} | "
                f"{row['speedup']:.2f}x | {fmt(row, 'mean_exit_layer')} | {fmt(row, 'token_agreement')} | "
                f"{fmt(row, 'prefix_agreement')} |"
            )
    lines += ["", "Held-out perplexity on the test plays (teacher forcing), per exit layer (0-based):", ""]
    layers = sorted({int(k) for r in results for k in r["test_perplexity"]})
    lines.append("| model | " + " | ".join(f"exit {layer}" for layer in layers) + " |")
    lines.append("|---|" + "---|" * len(layers))
    for r in results:
        lines.append(
            f"| {r['model']} | "
            + " | ".join(f"{r['test_perplexity'].get(str(layer), float('nan')):.2f}" for layer in layers)
            + " |"
        )
    lines += ["", "Calibration (validation plays, teacher-forced agreement with the full-depth argmax):", ""]
    lines.append("| model | rule | setting | agreement | mean exit layer | compute fraction |")
    lines.append("|---|---|---|---|---|---|")
    for r in results:
        for row in r["calibration"]["table"] + [r["calibration"]["oracle_floor"]]:
            setting = row.get("setting")
            setting = f"{setting:.4g}" if isinstance(setting, float) else str(setting)
            lines.append(
                f"| {r['model']} | {row['rule']} | {setting} | {row.get('agreement', float('nan')):.3f} | "
                f"{row.get('mean_exit_layer', float('nan')):.2f} | {row.get('compute_fraction', float('nan')):.3f} |"
            )
    lines += ["", "Early exits: " + "; ".join(
        f"{r['model']}: adapter {r['exit_adapter']}, vocabulary {r['exit_vocab_size'] or 'all'} tokens" for r in results
    ) + ".", ""]
    lines.append(f"Stricter ASTI calibration (target {args.strict_target}):")
    lines.append("")
    for r in results:
        row = r["strict_calibration"]["row"]
        lines.append(
            f"- {r['model']}: cost {row['setting']:.4g}, teacher-forced agreement {row['agreement']:.3f}, "
            f"mean exit layer {row['mean_exit_layer']:.2f}, compute fraction {row['compute_fraction']:.3f}"
        )
    lines += ["", f"Run took {meta['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    before = args.before or smollm2_checkpoint_path()
    after = None if args.after in (None, "", "none") else args.after
    if after is not None and not os.path.isdir(after):
        raise FileNotFoundError(
            f"--after {after!r} does not exist: run `python recipes/train_lm.py --config "
            "recipes/configs/smollm2_shakespeare.yaml` first, or pass --after none"
        )
    tokenizer = AutoTokenizer.from_pretrained(before)
    blocks = load_shakespeare(tokenizer, block_size=128, max_eval_blocks=max(args.calibration_blocks, args.ppl_blocks))
    if args.prompt_tokens > 128:
        raise ValueError(f"--prompt_tokens must be <= 128 (one block), got {args.prompt_tokens}")
    test = torch.tensor(blocks["test"]["input_ids"])
    if args.num_prompts > len(test):
        raise ValueError(f"--num_prompts must be <= {len(test)} test blocks, got {args.num_prompts}")
    prompts = test[: args.num_prompts, : args.prompt_tokens]
    ppl_blocks = test[: args.ppl_blocks]
    validation = torch.tensor(blocks["validation"]["input_ids"][: args.calibration_blocks])
    calibration_batches = list(torch.split(validation, 4))
    if args.exit_layers:
        exit_layers = [int(x) for x in args.exit_layers.split(",")]
    elif after is not None:
        with open(os.path.join(after, "config.json")) as f:
            exit_layers = json.load(f).get("exit_layers")
    else:
        exit_layers = [int(x) for x in DEFAULT_EXIT_LAYERS.split(",")]
    exit_vocab = None
    if after is not None:  # the before model predicts over the same early-exit vocabulary
        with open(os.path.join(after, "config.json")) as f:
            exit_vocab = json.load(f).get("exit_vocab")
    results = [
        bench_model(
            "before (SmolLM2-135M)", before, args, prompts, ppl_blocks, calibration_batches, exit_layers, exit_vocab
        )
    ]
    if after is not None:
        results.append(
            bench_model("after (L_depth recipe)", after, args, prompts, ppl_blocks, calibration_batches, None)
        )
    meta = {
        "command": "python benchmarks/bench_generation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}",
        "seconds": time.perf_counter() - start,
    }
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "generation.json"), "w") as f:
        json.dump({"args": vars(args), "meta": meta, "results": results}, f, indent=2, default=float)
    markdown = to_markdown(results, args, meta)
    with open(os.path.join(args.out_dir, "generation.md"), "w") as f:
        f.write(markdown)
    print("\n" + markdown)
    return results


if __name__ == "__main__":
    main()
