# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""[`DepthStopTrainer`]: the stock [`Trainer`] with the early-exit loss (exit cross-entropies + L_depth)."""

from collections import defaultdict

import torch
from transformers import Trainer

from .losses import depth_stop_loss, soft_stopping_distribution
from .training_args import DepthStopTrainingArguments


class DepthStopTrainer(Trainer):
    r"""
    [`Trainer`] that trains every exit of a `DepthStop*` model with the loss of [`DepthStopTrainingArguments`].

    Overrides `compute_loss` (what is computed) and `log` (what is reported) only. Logged, averaged over the steps
    since the last log and over processes, under `train` or the evaluation prefix: `exit_<k>_accuracy` per exit position
    k (0-based), `ce_<k>`, `exit_ce`, `depth_loss` and its active terms, and `mean_exit_layer`: the expected 0-based
    exit layer under the soft stopping distribution of the `stop` term (a training-time proxy; the stopping rule's
    real exits are measured by `hf_depthstop.calibrate` and the benchmarks).

    Example:

    ```python
    >>> args = DepthStopTrainingArguments("out", depth_loss_weight=1.0, depth_terms="distill")
    >>> trainer = DepthStopTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
    >>> trainer.train(); trainer.evaluate()["eval_exit_0_accuracy"]
    ```
    """

    loss_is_scaled_for_ga = False  # compute_loss returns a batch mean; Trainer divides by the accumulation steps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DepthStopTrainingArguments):
            raise TypeError(f"DepthStopTrainer needs DepthStopTrainingArguments, got {type(self.args).__name__}")
        self._metric_sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._metric_counts = {"train": defaultdict(int), "eval": defaultdict(int)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        exit_gradient = self.args.exit_gradient if model.training else "full"
        outputs = model(**inputs, output_exit_logits=True, exit_gradient=exit_gradient)
        config = self.accelerator.unwrap_model(model).config
        spec = self.args.depth_loss_spec()
        loss, parts = depth_stop_loss(
            outputs.exit_logits, labels, spec, outputs.exit_compute_fractions, outputs.exit_residual_ratios,
            config.exit_layers, config.num_hidden_layers,
        )
        outputs.loss = loss
        self._record(model.training, outputs.exit_logits.detach(), labels, parts, spec, config.exit_layers)
        return (loss, outputs) if return_outputs else loss

    @torch.no_grad()
    def _record(self, training, exit_logits, labels, parts, spec, exit_layers):
        mode = "train" if training else "eval"
        n = labels.shape[0]
        correct = (exit_logits.argmax(-1) == labels[:, None]).float().sum(0)  # (num_exits,)
        q = soft_stopping_distribution(exit_logits, spec.stop_sharpness, spec.stop_threshold)
        layers = torch.tensor(exit_layers, dtype=q.dtype, device=q.device)
        sums = {f"exit_{k}_accuracy": correct[k] for k in range(correct.shape[0])}
        sums["mean_exit_layer"] = (q * layers).sum()
        sums.update({name: value * n for name, value in parts.items()})
        names = sorted(sums)
        stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=q.device) for k in names])
        stacked = torch.cat([stacked, torch.tensor([float(n)], device=q.device)])
        stacked = self.accelerator.reduce(stacked, reduction="sum")  # sums over processes
        total = int(stacked[-1].item())
        for name, value in zip(names, stacked[:-1].tolist()):
            self._metric_sums[mode][name] += value
            self._metric_counts[mode][name] += total

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        prefix = ""
        if mode == "eval":  # evaluate() logs "<prefix>_loss"; keep its prefix (eval_, test_, ...)
            loss_key = next((key for key in logs if key.endswith("_loss")), "eval_loss")
            prefix = loss_key[: -len("loss")]
        sums, counts = self._metric_sums[mode], self._metric_counts[mode]
        # update in place: Trainer.evaluate returns this same dict
        logs.update({f"{prefix}{name}": sums[name] / max(counts[name], 1) for name in sums})
        sums.clear()
        counts.clear()
        super().log(logs, start_time)
