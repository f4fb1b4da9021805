# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""The paper's claim on real images: a small ViT and a small ResNet trained from scratch on MNIST, with and without
L_depth (DESIGN.md section 3 protocol: same seed, data and budget; only the loss differs).

    python benchmarks/ablation_vision.py                          # both archs, every variant (minutes each)
    python benchmarks/ablation_vision.py --archs resnet --variants multi_exit,default
    python benchmarks/ablation_vision.py --analyse_only           # tables and plot from the cache

Each variant is `recipes/train_image_classifier.py` with `recipes/configs/mnist_<arch>.yaml` plus its loss flags.
After training, every exit's outputs on validation and test are cached in benchmarks/results/vision_cache/ and the
model is saved there (re-runs skip trained variants). Reported per arch and variant: test accuracy per exit, the
oracle floor, the mean r_l per block (plotted: the diminishing-returns curve is the paper's mechanism), and for
tolerances 0.3 / 0.5 points below the *baseline's* (`multi_exit`) validation accuracy, the setting each rule picks on
validation and its test accuracy and compute; then every rule live on test at batch 256 (measured wall-clock
speed-up against `none`, the same model at full depth) at the 0.3-point settings.
Nothing is chosen on the test split.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "recipes"))

from train_image_classifier import build_trainer, exit_summary, parse_args  # noqa: E402

from hf_depthstop.calibration import (  # noqa: E402
    ExitRecords,
    calibrate_records,
    collect_exit_records,
    evaluate_records,
)
from hf_depthstop.evaluation import compare_rules, rules_table_markdown  # noqa: E402


RESULTS = os.path.join(HERE, "results")
CACHE = os.path.join(RESULTS, "vision_cache")
CONFIGS = os.path.join(HERE, "..", "recipes", "configs")
ARCHS = ("resnet", "vit")

# name -> loss flags (DepthStopTrainingArguments); everything else is the arch's yaml.
VARIANTS = {
    # without L_depth: plain multi-exit training (every exit's CE, weight 1, joint gradient; the prototype's P_A)
    "multi_exit": ["--exit_gradient", "full", "--exit_weighting", "final_heavy", "--early_exit_weight", "1.0",
                   "--depth_loss_weight", "0"],
    # without L_depth, our schedule: exit heads on detached features (the backbone sees only the final exit's CE)
    "heads_only": ["--exit_gradient", "detach", "--exit_weighting", "final_heavy", "--early_exit_weight", "1.0",
                   "--depth_loss_weight", "0"],
    # the package default (the training-argument defaults, written out): detach + distill
    "default": ["--exit_gradient", "detach", "--exit_weighting", "final_heavy", "--early_exit_weight", "1.0",
                "--depth_terms", "distill", "--depth_loss_weight", "1.0"],
    # joint training + distill
    "joint_distill": ["--exit_gradient", "full", "--exit_weighting", "final_heavy", "--early_exit_weight", "1.0",
                      "--depth_terms", "distill", "--depth_loss_weight", "1.0"],
    # the theorem's hypothesis imposed: joint training + the diminishing-returns term
    "joint_dr": ["--exit_gradient", "full", "--exit_weighting", "final_heavy", "--early_exit_weight", "1.0",
                 "--depth_terms", "dr", "--depth_loss_weight", "0.1"],
}
BASELINE = "multi_exit"
TOLERANCES = (0.003, 0.005)
RULES = ("confidence", "entropy", "patience", "asti_bound", "asti")


def train_variant(arch: str, name: str, extra: list[str]) -> dict:
    path = os.path.join(CACHE, f"{arch}_{name}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    out_dir = os.path.join(CACHE, f"run_{arch}_{name}")
    args, training_args = parse_args(
        ["--config", os.path.join(CONFIGS, f"mnist_{arch}.yaml"), *VARIANTS[name], *extra, "--output_dir", out_dir,
         "--disable_tqdm", "true"]
    )
    trainer, data = build_trainer(args, training_args)
    start = time.time()
    trainer.train()
    train_seconds = time.time() - start
    model = trainer.model.eval()
    trainer.save_model(out_dir)
    blob = {
        "arch": arch, "name": name, "flags": VARIANTS[name], "train_seconds": train_seconds, "model_dir": out_dir,
        "lipschitz": model._exit_lipschitz(),
        "val": collect_exit_records(model, data["validation"], batch_size=256).__dict__,
        "test": collect_exit_records(model, data["test"], batch_size=256).__dict__,
    }
    os.makedirs(CACHE, exist_ok=True)
    torch.save(blob, path + ".tmp")
    os.replace(path + ".tmp", path)  # never a half-written cache file
    return blob


def _full_correct(records: ExitRecords) -> np.ndarray:
    return (records.exit_logits[:, -1].argmax(-1) == records.labels).numpy()


def analyse(arch: str, blobs: dict) -> tuple[list[str], dict]:
    """Markdown lines and a summary for one arch."""
    recs = {n: (ExitRecords(**b["val"]), ExitRecords(**b["test"])) for n, b in blobs.items()}
    base_val = float(_full_correct(recs[BASELINE][0]).mean())
    base_test = float(_full_correct(recs[BASELINE][1]).mean())
    summary = {}
    lines = [f"### {arch}", "",
             "| variant | val final | test final | test acc per exit | mean r_l per block (test) | oracle floor (test) "
             "| train s |", "|---|---|---|---|---|---|---|"]
    for name, (val, test) in recs.items():
        s = exit_summary(test)
        s.update(val_final=float(_full_correct(val).mean()), test_final=float(_full_correct(test).mean()),
                 train_seconds=blobs[name]["train_seconds"], rules={})
        summary[name] = s
        lines.append(
            f"| {name} | {100 * s['val_final']:.2f} | {100 * s['test_final']:.2f} | "
            + " / ".join(f"{100 * a:.1f}" for a in s["exit_accuracy"]) + " | "
            + " / ".join(f"{r:.2f}" for r in s["residual_ratio_mean"])
            + f" | {s['oracle_floor']['compute_fraction']:.3f} | {s['train_seconds']:.0f} |"
        )
    lines += ["", f"Settings chosen on validation: accuracy >= the baseline's (`{BASELINE}`) validation accuracy "
              f"({100 * base_val:.2f}) minus the tolerance; applied to test. Cells: test accuracy vs the baseline's test "
              f"accuracy ({100 * base_test:.2f}), in points / test compute fraction. `-`: no setting meets the target "
              "on validation (the rule then runs at full depth).", ""]
    lines += ["| variant | tolerance | " + " | ".join(RULES) + " | best |", "|---|---|" + "---|" * (len(RULES) + 1)]
    for name, (val, test) in recs.items():
        lips = blobs[name]["lipschitz"]
        for tol in TOLERANCES:
            cal = calibrate_records(val, lips, target=tol, reference_accuracy=base_val)
            cells, best = [], None
            for rule in RULES:
                row = next(r for r in cal["table"] if r["rule"] == rule)
                feasible = row["accuracy"] >= base_val - tol - 1e-12
                out = evaluate_records(test, cal, lips, rule, cal["settings"][rule])
                summary[name]["rules"][f"{rule}@{tol}"] = {
                    "setting": cal["settings"][rule], "val_accuracy": row["accuracy"],
                    "val_compute": row["compute_fraction"], "feasible_on_val": bool(feasible),
                    "test_accuracy": out["accuracy"], "test_vs_baseline": 100 * (out["accuracy"] - base_test),
                    "test_compute": out["compute_fraction"],
                }
                if feasible and (best is None or row["compute_fraction"] < best[1]):
                    best = (rule, row["compute_fraction"], out)
                cells.append(
                    f"{100 * (out['accuracy'] - base_test):+.2f} / {out['compute_fraction']:.3f}" if feasible else "-"
                )
            summary[name]["val_best@" + str(tol)] = None if best is None else best[1]
            best_cell = "-" if best is None else f"{best[0]}: {best[2]['compute_fraction']:.3f}"
            summary[name]["best@" + str(tol)] = None if best is None else {
                "rule": best[0], "test_compute": best[2]["compute_fraction"], "test_accuracy": best[2]["accuracy"]}
            lines.append(f"| {name} | {100 * tol:.1f} | " + " | ".join(cells) + f" | {best_cell} |")
    # The winner, on validation only: among variants whose validation final-exit accuracy is within 0.3 points of the
    # baseline's, the least validation compute at the 0.3-point tolerance under its best rule.
    eligible = [n for n in summary if summary[n]["val_final"] >= base_val - 0.003]
    scores = {n: summary[n]["val_best@0.003"] for n in eligible if summary[n]["val_best@0.003"] is not None}
    winner = min(scores, key=scores.get) if scores else BASELINE
    summary["_winner"] = winner
    lines += ["", "Validation compute at the 0.3-point tolerance (best rule): "
              + ", ".join(f"{n} {v:.3f}" for n, v in sorted(scores.items(), key=lambda kv: kv[1]))
              + f". **Chosen on validation: `{winner}`**"
              + ("" if winner == BASELINE else f" (flags: `{' '.join(VARIANTS[winner])}`)") + "."]
    return lines, summary


def live_rules(arch: str, blob: dict, tol: float, batch_size: int, repeats: int) -> list[dict]:
    """Every rule live on test (batch `batch_size`) at the settings calibrated on validation within `tol` of the
    model's own validation accuracy; measured speed-up against the same model at full depth."""
    from transformers import AutoModelForImageClassification

    from hf_depthstop.data import load_mnist

    model = AutoModelForImageClassification.from_pretrained(blob["model_dir"]).eval()
    cal = calibrate_records(ExitRecords(**blob["val"]), blob["lipschitz"], target=tol)
    model.config.calibration = cal
    rules = {"none": {}, **{rule: dict(cal["settings"][rule]) for rule in RULES}}
    test = load_mnist()["test"]
    return compare_rules(model, test, rules, batch_size=batch_size, repeats=repeats)


def plot_residual_ratios(summaries: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4), squeeze=False)
    for ax, (arch, summary) in zip(axes[0], summaries.items()):
        for name, s in summary.items():
            if name.startswith("_"):
                continue
            blocks = [layer + 1 for layer in s["exit_layers"]]
            ax.plot(blocks, s["residual_ratio_mean"], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("block (1-based)")
        ax.set_ylabel("mean residual ratio r_l (test)")
        ax.set_title(f"{arch} on MNIST: residual ratio per block")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of " + ", ".join(ARCHS))
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ", ".join(VARIANTS))
    parser.add_argument("--analyse_only", action="store_true", help="only tables from cached variants")
    parser.add_argument("--extra", default="", help="extra recipe flags for every variant, e.g. '--train_size 2000'")
    parser.add_argument("--live_repeats", type=int, default=3, help="timing rounds of the live rule table")
    parser.add_argument("--no_live", action="store_true", help="skip the live (timed) rule tables")
    parser.add_argument("--live_variants", default=None,
                        help="variants timed live (default: the baseline, the validation winner and `default`)")
    args = parser.parse_args()
    archs = [a for a in args.archs.split(",") if a]
    names = [n for n in args.variants.split(",") if n]
    if bad := [a for a in archs if a not in ARCHS]:
        parser.error(f"--archs: unknown arch(s) {bad}; choose from {list(ARCHS)}")
    if bad := [n for n in names if n not in VARIANTS]:
        parser.error(f"--variants: unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if BASELINE not in names:
        names = [BASELINE, *names]
    md = ["# The paper's claim on MNIST: early-exit ViT and ResNet with and without L_depth", "",
          "Command: `python benchmarks/ablation_vision.py` (configs `recipes/configs/mnist_{resnet,vit}.yaml`: "
          "ResNet 20k training images x 1 epoch, ViT 50k x 2 epochs; validation 10k / test 10k, fixed split; one "
          "seed; 2-core CPU).", ""]
    all_summaries, out = {}, {}
    for arch in archs:
        blobs = {}
        for name in names:
            path = os.path.join(CACHE, f"{arch}_{name}.pt")
            if args.analyse_only:
                if os.path.exists(path):
                    blobs[name] = torch.load(path, weights_only=False)
                continue
            print(f"== {arch} / {name}", flush=True)
            blobs[name] = train_variant(arch, name, args.extra.split())
        if BASELINE not in blobs:
            raise SystemExit(f"{arch}: the baseline {BASELINE} is not trained yet: run without --analyse_only first")
        lines, summary = analyse(arch, blobs)
        all_summaries[arch] = summary
        md += lines + [""]
        if not args.no_live:
            md += [f"Live on test, batch 256, settings calibrated on validation within 0.3 points of each model's own "
                   f"validation accuracy; speed-up = time of `none` / time of the rule ({args.live_repeats} alternating "
                   "rounds, median).", ""]
            live = [n for n in (args.live_variants or f"{BASELINE},{summary['_winner']},default").split(",") if n in blobs]
            for name in dict.fromkeys(live):
                rows = live_rules(arch, blobs[name], 0.003, 256, args.live_repeats)
                summary[name]["live_batch_256"] = rows
                md += [f"**{arch} / {name}** (full depth {100 * summary[name]['test_final']:.2f}%)", "",
                       rules_table_markdown(rows, reference_accuracy=summary[name]["test_final"]), ""]
        out[arch] = summary
    os.makedirs(RESULTS, exist_ok=True)
    plot = os.path.join(RESULTS, "vision_residual_ratios.png")
    plot_residual_ratios(all_summaries, plot)
    md += [f"![mean r_l per block]({os.path.basename(plot)})", ""]
    with open(os.path.join(RESULTS, "ablation_vision.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    with open(os.path.join(RESULTS, "ablation_vision.json"), "w") as f:
        json.dump(out, f, indent=2, default=float)
    print("\n".join(md))


if __name__ == "__main__":
    main()
