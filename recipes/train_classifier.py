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

import os
import sys
from dataclasses import dataclass, field


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from recipe_utils import (  # noqa: E402
    calibrate_and_compare,
    ensure_data_parallel,
    parse_with_yaml,
    save_model,
    write_results_and_push,
)
from transformers import AutoTokenizer, DataCollatorWithPadding, HfArgumentParser, set_seed  # noqa: E402

from hf_depthstop import DepthStopBertForSequenceClassification, DepthStopTrainer, DepthStopTrainingArguments  # noqa: E402
from hf_depthstop.data import (  # noqa: E402
    TWEET_SENTIMENT_LABELS,
    load_tweet_sentiment,
    minilm_checkpoint_path,
    tokenize_for_classification,
)
from hf_depthstop.evaluation import run_rule  # noqa: E402
from hf_depthstop.metrics import load_depthstop_metric  # noqa: E402
from hf_depthstop.peft_utils import PeftArguments, apply_peft  # noqa: E402


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
    return parse_with_yaml(make_parser(), argv)


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
    ensure_data_parallel(trainer, "train_classifier.py")
    trainer.train()
    eval_metrics = trainer.evaluate()  # every rank: distributed evaluation, metrics reduced over ranks
    results = {"eval": eval_metrics}
    if trainer.is_world_process_zero():
        model, tables = calibrate_and_compare(
            trainer.model, tokenized["validation"], tokenized["test"], script_args, training_args
        )
        results.update(tables)
        save_model(trainer, model, script_args, training_args.output_dir)  # saved first: nothing below can lose it
        # The saved model's own rule on the test split, through the package's evaluate metric module.
        live = run_rule(model, tokenized["test"], model.config.stopping_rule, model.config.stopping_params)
        results["test_metric"] = load_depthstop_metric().compute(
            predictions=live["predictions"], references=live["labels"], exit_layers=live["exit_layer"],
            compute_fractions=live["compute_fraction"],
        )
        print(f"\nSaved rule {model.config.stopping_rule} on test (evaluate metric module): {results['test_metric']}")
        write_results_and_push(trainer, model, training_args, results)
    return results


if __name__ == "__main__":
    main(*parse_args())
