# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Runs `recipes/train_classifier.py` unchanged (its own `main` and flags) and makes every rank write a digest of its
model weights before and after training, plus its evaluation metrics, to `--digest_dir` (used by
tests/test_distributed.py under `accelerate launch`).

    accelerate launch --multi_gpu --num_processes 2 tests/distributed_runner.py --digest_dir d <recipe flags>
"""

import hashlib
import json
import os
import sys

from accelerate import PartialState
from transformers import TrainerCallback


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "recipes"))

from train_classifier import main, parse_args  # noqa: E402


def weights_digest(model, trainable_only: bool = False) -> str:
    """SHA-256 over the names and bytes of the model's parameters (sorted by name)."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        if trainable_only and not p.requires_grad:
            continue
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class WeightDigest(TrainerCallback):
    def __init__(self):
        self.record = {}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.record["before"] = weights_digest(model)
        self.record["args_world_size"] = args.world_size
        self.record["parallel_mode"] = str(args.parallel_mode)
        self.record["batches_per_epoch"] = len(train_dataloader)  # halved when the data is sharded over 2 ranks

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.record["after"] = weights_digest(model)
        self.record["trainable_after"] = weights_digest(model, trainable_only=True)
        self.record["num_trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.record["steps"] = state.global_step


if __name__ == "__main__":
    argv = sys.argv[1:]
    i = argv.index("--digest_dir")
    digest_dir = argv[i + 1]
    argv = argv[:i] + argv[i + 2 :]
    callback = WeightDigest()
    results = main(*parse_args(argv), callbacks=[callback])
    state = PartialState()
    record = dict(
        callback.record,
        rank=state.process_index,
        world_size=state.num_processes,
        distributed_type=str(state.distributed_type),
        eval=results["eval"],
        result_keys=sorted(results),
    )
    os.makedirs(digest_dir, exist_ok=True)
    with open(os.path.join(digest_dir, f"rank{state.process_index}.json"), "w") as f:
        json.dump(record, f, default=float)
