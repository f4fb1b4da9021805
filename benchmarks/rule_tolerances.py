# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Stopping rules at equal accuracy: every rule calibrated on validation at tolerances 0, 0.5 and 1 point below the
model's own full-depth validation accuracy, scored on test, next to the oracle floor.

    python benchmarks/rule_tolerances.py [--model outputs/quickstart]

Offline simulation from every exit's outputs (the same rule code the model runs live; `benchmarks/bench_inference.py`
measures wall-clock). Writes benchmarks/results/rule_tolerances.md and .json.
"""

import argparse
import json
import os

from transformers import AutoTokenizer

from hf_depthstop import DepthStopBertForSequenceClassification
from hf_depthstop.calibration import CALIBRATED_RULES, calibrate_records, collect_exit_records, evaluate_records
from hf_depthstop.data import load_tweet_sentiment, tokenize_for_classification


HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCES = (0.0, 0.005, 0.01)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="outputs/quickstart", help="a saved DepthStop BERT classifier")
    parser.add_argument("--output_prefix", default=os.path.join(HERE, "results", "rule_tolerances"))
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise SystemExit(f"error: no saved model in {args.model!r}; run `python recipes/quickstart.py` first")
    model = DepthStopBertForSequenceClassification.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = tokenize_for_classification(load_tweet_sentiment(8000, 2000, 2000, seed=0), tokenizer, max_length=64)
    val = collect_exit_records(model, data["validation"], progress=True)
    test = collect_exit_records(model, data["test"], progress=True)
    lips = model._exit_lipschitz()
    none_test = evaluate_records(test, {"temperatures": [1.0] * len(test.exit_layers)}, lips, "none", {})
    oracle = evaluate_records(test, {"temperatures": [1.0] * len(test.exit_layers)}, lips, "oracle floor", {})
    rows, lines = [], []
    lines.append("| tolerance (pts) | " + " | ".join(CALIBRATED_RULES) + " | best baseline | asti vs best baseline |")
    lines.append("|---|" + "---|" * (len(CALIBRATED_RULES) + 2))
    for tol in TOLERANCES:
        cal = calibrate_records(val, lips, target=tol)
        cells, results = [], {}
        for rule in CALIBRATED_RULES:
            out = evaluate_records(test, cal, lips, rule, cal["settings"][rule])
            val_row = next(r for r in cal["table"] if r["rule"] == rule)
            results[rule] = {
                "setting": cal["settings"][rule], "val_accuracy": val_row["accuracy"],
                "val_compute": val_row["compute_fraction"], "test_accuracy": out["accuracy"],
                "test_drop": none_test["accuracy"] - out["accuracy"], "test_compute": out["compute_fraction"],
            }
            cells.append(f"{-100 * results[rule]['test_drop']:+.2f} / {out['compute_fraction']:.3f}")
        baselines = [r for r in ("confidence", "entropy", "patience", "static") if r in results]
        best = min(baselines, key=lambda r: results[r]["val_compute"])  # chosen on validation
        gap = results["asti"]["test_compute"] - results[best]["test_compute"]
        lines.append(f"| {100 * tol:.1f} | " + " | ".join(cells) + f" | {best} | {gap:+.3f} compute |")
        rows.append({"tolerance": tol, "rules": results, "best_baseline_on_val": best})
    lines += [
        "",
        f"Cells: test accuracy vs full depth (pts) / test compute fraction. Full depth on test: "
        f"{100 * none_test['accuracy']:.2f}%. Oracle floor on test: compute {oracle['compute_fraction']:.3f} at "
        f"full-depth accuracy. 'best baseline' is the baseline rule with the least validation compute at that "
        "tolerance.",
    ]
    table = "\n".join(lines)
    with open(args.output_prefix + ".md", "w") as f:
        f.write(f"# Stopping rules at equal accuracy ({args.model})\n\nCommand: `python benchmarks/rule_tolerances.py "
                f"--model {args.model}`\n\n{table}\n")
    with open(args.output_prefix + ".json", "w") as f:
        json.dump({"full_test_accuracy": none_test["accuracy"], "oracle_floor_test_compute": oracle["compute_fraction"],
                   "tolerances": rows}, f, indent=2)
    print(table)


if __name__ == "__main__":
    main()
