# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""What the recipes share: `--config file.yaml` defaults for an `HfArgumentParser`, and the fixed ending of the
classifier recipes (calibrate, compare the rules live, save, write the results, push)."""

import json
import os
import sys

import yaml
from transformers import HfArgumentParser


def parse_with_yaml(parser: HfArgumentParser, argv: list[str] | None = None):
    """Parse `argv` (default `sys.argv[1:]`) into the parser's dataclasses; `--config file.yaml` gives defaults and
    the other flags override them. A yaml key that is no field of the parser's dataclasses is an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            parser.error("--config needs a yaml file path")
        with open(argv[i + 1]) as f:
            defaults = yaml.safe_load(f) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(defaults) - known)
        if unknown:
            parser.error(f"--config {argv[i + 1]}: unknown key(s) {unknown}")
        parser.set_defaults(**defaults)
        argv = argv[:i] + argv[i + 2 :]
    return parser.parse_args_into_dataclasses(args=argv)


def ensure_data_parallel(trainer, recipe: str) -> None:
    """The recipes calibrate the trained model in memory on the main process: sharded training cannot do that."""
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        raise ValueError(
            f"{recipe} calibrates the trained model in memory on the main process, which under FSDP / DeepSpeed holds "
            "only shards: train with DDP (plain `accelerate launch`), see README 'Multi-process'"
        )


def calibrate_and_compare(model, validation, test, script_args, training_args, batch_size: int = 64):
    """Main process only. Calibrates every rule on `validation`, saves the calibrated adapter (`--use_peft`; then
    continues with the merged model) and runs every rule live on `test` at each of `eval_batch_sizes`.

    Returns:
        `(model, results)`: the (merged) calibrated model and `{"calibration": ..., "test": {"batch_<b>": rows}}`.
    """
    from hf_depthstop.calibration import calibrate
    from hf_depthstop.evaluation import compare_rules, rules_from_calibration, rules_table_markdown
    from hf_depthstop.peft_utils import save_adapter

    progress = not training_args.disable_tqdm
    report = calibrate(
        model, validation, target=script_args.calibration_target, target_type=script_args.calibration_target_type,
        rule=script_args.stopping_rule, batch_size=batch_size, progress=progress,
    )
    print("\nCalibration on the validation split (offline simulation of each rule's chosen setting):")
    print(report.to_markdown())
    if script_args.use_peft:  # the calibrated adapter (+ config), then the merged plain model for what follows
        save_adapter(model, os.path.join(training_args.output_dir, "adapter"))
        model = model.merge_and_unload()
    results = {"calibration": model.config.calibration, "test": {}}
    rules = rules_from_calibration(model)
    for bs in [int(b) for b in str(script_args.eval_batch_sizes).split(",") if b.strip()]:
        rows = compare_rules(model, test, rules, batch_size=bs, repeats=script_args.timing_repeats, progress=progress)
        results["test"][f"batch_{bs}"] = rows
        print(f"\nTest split ({len(test)} examples), every rule live, batch {bs}:")
        print(rules_table_markdown(rows))
    return model, results


def save_model(trainer, model, script_args, output_dir: str) -> None:
    """Main process only: the calibrated model (merged with `--use_peft`: `trainer.save_model` would write the
    adapter only) and the trainer's processor, if any."""
    if script_args.use_peft:
        model.save_pretrained(output_dir)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(output_dir)
    else:
        trainer.save_model(output_dir)


def write_results_and_push(trainer, model, training_args, results: dict) -> None:
    """Main process only: `depthstop_results.json` next to the saved model, then, with `--push_to_hub`, the card
    (now with the measured test tables) and the whole folder to the Hub (a failure raises `HubPushError`; the local
    save stays complete)."""
    from hf_depthstop.hub import upload_saved_folder
    from hf_depthstop.modelcard import write_model_card

    output_dir = training_args.output_dir
    with open(os.path.join(output_dir, "depthstop_results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    print(f"\nSaved the calibrated model ({model.config.stopping_rule} {model.config.stopping_params}) to {output_dir}")
    if training_args.push_to_hub:
        write_model_card(model, output_dir, repo_id=trainer.hub_model_id)
        commit = upload_saved_folder(
            output_dir, trainer.hub_model_id, token=training_args.hub_token,
            commit_message="Trained and calibrated with hf_depthstop",
        )
        print(f"Pushed {output_dir} to {commit.commit_url}")
