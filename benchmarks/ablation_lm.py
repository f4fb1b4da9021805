# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""L_depth ablation on the decoder LM (DESIGN.md section 3 protocol, small budget): SmolLM2-135M + LoRA on the
Shakespeare train plays, one variant of the training loss per run, everything else equal.

    python benchmarks/ablation_lm.py                                  # every variant, 15 steps each
    python benchmarks/ablation_lm.py --variants plain,ldepth_distill --max_steps 2 --eval_blocks 4 \
        --out_dir /tmp/ablation_lm                                    # a smoke run

Same seed, data order, LoRA setup, exit layers and step budget for every variant (the recipe's
recipes/configs/smollm2_shakespeare.yaml, with `--max_steps` steps). Measured on the validation plays only (the test
plays are never read): the final exit's perplexity against the plain fine-tune, each exit's perplexity, and, after
`calibrate_lm` (target: 90% agreement with the full-depth argmax, teacher forced), the compute fraction each
calibrated rule needs and the oracle floor. Each variant's result is cached in `--cache_dir` (re-runs resume).

Variants (exit_gradient, exit weights, L_depth terms):
- `pretrained`: no training (the checkpoint's own exits; the reference point).
- `plain`: final exit only, no L_depth (a plain LoRA fine-tune; the early exits are untrained).
- `multi_exit`: uniform exit weights, no L_depth, full gradient (plain multi-exit training).
- `final_heavy`: final 1, early 0.3, no L_depth, full gradient.
- `ldepth_distill`: final_heavy + distill (lambda 1), full gradient: the recipe's setting.
- `ldepth_distill_eq`: as ldepth_distill with gradient equilibrium.
- `ldepth_distill_a0.1`: as ldepth_distill with the early exits' gradient into the backbone scaled by 0.1.
- `ldepth_stop`: final_heavy + the soft stopping cost (lambda 1, c 0.1), full gradient.
- `ldepth_dr`: final_heavy + the diminishing-returns penalty (lambda 1), full gradient (faithfulness study).
- `adapter_ce`: each early exit gets an affine adapter (`exit_adapter=affine`); the early exits' gradient is detached
  from the backbone (`exit_gradient=detach`), so LoRA sees the final exit's loss only (the final exit is `plain`'s by
  construction) and the adapters learn from final_heavy CE alone.
- `adapter_distill`: as adapter_ce plus distill (lambda 1): the two-stage idea done in one run.
- `adapter_distill_a0.1`: adapters plus the early exits' gradient into the backbone scaled by 0.1.
- `adapter_distill_lr5e-3`: adapter_distill with the adapters at learning rate 5e-3 (`exit_head_learning_rate`; the
  adapters start from zero while LoRA stays at the recipe's 5e-4).
Without adapters and with LoRA the exits share the frozen LM head, so `exit_gradient=detach` would train nothing but
the final exit: it equals `plain` and is not run. Every variant's early exits predict over the same
`--exit_vocab_size` most frequent training tokens (so their heads cost what they will cost in `generate`).
"""

import argparse
import json
import math
import os
import sys
import time


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))

import torch  # noqa: E402
import train_lm  # noqa: E402

from hf_depthstop import calibrate_lm  # noqa: E402


CONFIG = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "recipes", "configs", "smollm2_shakespeare.yaml"
)
VARIANTS = {
    "pretrained": None,
    "plain": {"exit_weighting": "final_only", "depth_loss_weight": "0"},
    "multi_exit": {"exit_weighting": "uniform", "depth_loss_weight": "0"},
    "final_heavy": {"exit_weighting": "final_heavy", "early_exit_weight": "0.3", "depth_loss_weight": "0"},
    "ldepth_distill": {"exit_weighting": "final_heavy", "early_exit_weight": "0.3", "depth_terms": "distill"},
    "ldepth_distill_eq": {
        "exit_weighting": "final_heavy", "early_exit_weight": "0.3", "depth_terms": "distill",
        "exit_gradient": "equilibrium",
    },
    "ldepth_distill_a0.1": {
        "exit_weighting": "final_heavy", "early_exit_weight": "0.3", "depth_terms": "distill", "exit_gradient": "0.1",
    },
    "ldepth_stop": {"exit_weighting": "final_heavy", "early_exit_weight": "0.3", "depth_terms": "stop"},
    "ldepth_dr": {"exit_weighting": "final_heavy", "early_exit_weight": "0.3", "depth_terms": "dr"},
    "adapter_ce": {
        "exit_adapter": "affine", "exit_gradient": "detach", "exit_weighting": "final_heavy",
        "early_exit_weight": "0.3", "depth_loss_weight": "0",
    },
    "adapter_distill": {
        "exit_adapter": "affine", "exit_gradient": "detach", "exit_weighting": "final_heavy",
        "early_exit_weight": "0.3", "depth_terms": "distill",
    },
    "adapter_distill_lr5e-3": {
        "exit_adapter": "affine", "exit_gradient": "detach", "exit_weighting": "final_heavy",
        "early_exit_weight": "0.3", "depth_terms": "distill", "exit_head_learning_rate": "5e-3",
    },
    "adapter_distill_a0.1": {
        "exit_adapter": "affine", "exit_gradient": "0.1", "exit_weighting": "final_heavy",
        "early_exit_weight": "0.3", "depth_terms": "distill",
    },
}  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"Comma-separated, among {', '.join(VARIANTS)}.")
    p.add_argument("--max_steps", type=int, default=15, help="Training steps per variant (4 x 128 tokens each).")
    p.add_argument("--eval_blocks", type=int, default=32, help="Validation blocks (128 tokens) for every measure.")
    p.add_argument(
        "--exit_vocab_size", type=int, default=4096,
        help="Early exits predict over this many most frequent training tokens (0: the whole vocabulary).",
    )
    p.add_argument("--calibration_target", type=float, default=0.1, help="Allowed disagreement with full depth.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument(
        "--cache_dir",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "ablation_cache", "lm"),
        help="Per-variant results (delete to re-run).",
    )
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {unknown}; choose among {list(VARIANTS)}")
    if args.exit_vocab_size < 0:
        p.error(f"--exit_vocab_size must be >= 0, got {args.exit_vocab_size}")
    for name in ("max_steps", "eval_blocks"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def run_variant(name: str, args) -> dict:
    overrides = VARIANTS[name] or {}
    argv = ["--config", CONFIG, "--output_dir", os.path.join(args.cache_dir, f"run_{name}")]
    argv += ["--max_steps", str(args.max_steps), "--max_eval_blocks", str(args.eval_blocks), "--seed", str(args.seed)]
    argv += ["--max_train_seconds", "1e9", "--logging_steps", str(max(1, args.max_steps // 3))]
    argv += ["--warmup_steps", str(max(1, args.max_steps // 10))]  # the recipe's 10 would eat a small budget
    argv += ["--exit_adapter", "none", "--exit_gradient", "full", "--depth_terms", "distill", "--depth_loss_weight", "1"]
    if args.exit_vocab_size:
        argv += ["--exit_vocab_size", str(args.exit_vocab_size)]
    for key, value in overrides.items():
        argv += [f"--{key}", value]
    script_args, training_args = train_lm.parse_args(argv)
    training_args.prediction_loss_only = True
    if "exit_head_learning_rate" not in overrides:  # whatever the recipe's yaml says: one learning rate
        training_args.exit_head_learning_rate = None
    start = time.perf_counter()
    trainer, blocks, _ = train_lm.build_trainer(script_args, training_args)
    if VARIANTS[name] is not None:
        trainer.train()
    train_seconds = time.perf_counter() - start
    metrics = trainer.evaluate()
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.eval()
    ids = torch.tensor(blocks["validation"]["input_ids"])
    calibration = calibrate_lm(model, list(torch.split(ids, 4)), target=args.calibration_target, rule="asti")
    exit_layers = model.config.exit_layers
    ppl = {str(layer): math.exp(min(metrics[f"eval_ce_{k}"], 50.0)) for k, layer in enumerate(exit_layers)}
    rules = {row["rule"]: row for row in calibration["table"] if row["rule"] != "none"}
    meets = {r: row for r, row in rules.items() if row.get("agreement", 0) >= 1 - args.calibration_target - 1e-9}
    best = min(meets, key=lambda r: meets[r]["compute_fraction"]) if meets else None
    return {
        "variant": name,
        "overrides": overrides,
        "steps": trainer.state.global_step,
        "train_seconds": train_seconds,
        "exit_layers": exit_layers,
        "validation_perplexity": ppl,
        "exit_token_accuracy": {str(layer): metrics[f"eval_exit_{k}_accuracy"] for k, layer in enumerate(exit_layers)},
        "calibration_table": calibration["table"],
        "oracle_floor": calibration["oracle_floor"],
        "best_rule": best,
        "best_rule_compute": meets[best]["compute_fraction"] if best else None,
    }


def to_markdown(rows: list[dict], args) -> str:
    layers = rows[0]["exit_layers"]
    plain = next((r for r in rows if r["variant"] == "plain"), None)
    lines = [
        "# L_depth ablation on SmolLM2-135M (LoRA, Shakespeare; validation plays only)",
        "",
        f"`python benchmarks/ablation_lm.py --max_steps {args.max_steps} --eval_blocks {args.eval_blocks} "
        f"--exit_vocab_size {args.exit_vocab_size}"
        + (f" --variants {','.join(args.variants)}" if args.variants != list(VARIANTS) else "")
        + "`: "
        f"{args.max_steps} LoRA steps of 4 x 128 tokens per variant (a small budget: indicative, one seed), "
        f"{args.eval_blocks} validation blocks; early exits predict over the "
        f"{args.exit_vocab_size or 'whole'} most frequent training tokens. Compute fractions count every exit head "
        "(and adapter) evaluated up to the stop "
        f"(1.0 = the stock model); rules calibrated with `calibrate_lm` to >= {1 - args.calibration_target:.0%} "
        "teacher-forced agreement with the full-depth argmax on the same blocks.",
        "",
        "| variant | steps | final ppl | vs plain | "
        + " | ".join(f"ppl exit {layer}" for layer in layers[:-1])
        + " | best rule | its compute | oracle floor compute |",
        "|---|---|---|---|" + "---|" * (len(layers) - 1) + "---|---|---|",
    ]
    for r in rows:
        final = r["validation_perplexity"][str(layers[-1])]
        delta = f"{final - plain['validation_perplexity'][str(layers[-1])]:+.2f}" if plain else "–"
        early = " | ".join(f"{r['validation_perplexity'][str(layer)]:.3g}" for layer in layers[:-1])
        best = f"{r['best_rule']} | {r['best_rule_compute']:.3f}" if r["best_rule"] else "none meets the target | –"
        lines.append(
            f"| {r['variant']} | {r['steps']} | {final:.2f} | {delta} | {early} | {best} | "
            f"{r['oracle_floor']['compute_fraction']:.3f} |"
        )
    lines.append("")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.cache_dir, exist_ok=True)
    rows = []
    for name in args.variants:
        cache = os.path.join(
            args.cache_dir, f"{name}_steps{args.max_steps}_blocks{args.eval_blocks}_vocab{args.exit_vocab_size}.json"
        )
        if os.path.isfile(cache):
            with open(cache) as f:
                rows.append(json.load(f))
            print(f"{name}: cached ({cache})")
            continue
        print(f"\n== {name}", flush=True)
        row = run_variant(name, args)
        with open(cache, "w") as f:
            json.dump(row, f, indent=2, default=float)
        rows.append(row)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "ablation_lm.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=2, default=float)
    markdown = to_markdown(rows, args)
    with open(os.path.join(args.out_dir, "ablation_lm.md"), "w") as f:
        f.write(markdown)
    print("\n" + markdown)
    return rows


if __name__ == "__main__":
    main()
