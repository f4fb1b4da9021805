# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""[`DepthStopTrainer`]: the stock [`Trainer`] with the early-exit loss (exit cross-entropies + L_depth)."""

import inspect
from collections import defaultdict

import torch
from huggingface_hub import constants as hub_constants
from transformers import GenerationMixin, Trainer

from .hub import HubPushError
from .losses import depth_stop_loss, exit_loss_weights, soft_stopping_distribution
from .modelcard import write_model_card
from .training_args import DepthStopTrainingArguments


def _is_exit_parameter(name: str) -> bool:
    """Whether parameter `name` belongs to an exit's own modules (not the backbone, not the final classifier)."""
    return "exit_heads." in name or "exit_adapters." in name


class DepthStopTrainer(Trainer):
    r"""
    [`Trainer`] that trains every exit of a `DepthStop*` model with the loss of [`DepthStopTrainingArguments`].

    Overrides `compute_loss` (what is computed) and `log` (what is reported) only. Logged, averaged over the steps
    since the last log and over processes, under `train` or the evaluation prefix: `exit_<k>_accuracy` per exit position
    k (0-based), `ce_<k>`, `exit_ce`, `depth_loss` and its active terms, and `mean_exit_layer`: the expected 0-based
    exit layer under the soft stopping distribution of the `stop` term (a training-time proxy; the stopping rule's
    real exits are measured by `hf_depthstop.calibrate` and the benchmarks).

    Decoder LMs (`DepthStopLlamaForCausalLM`, `DepthStopGPT2LMHeadModel`, also wrapped by PEFT) compute their loss
    inside the model, exit by exit, from `labels` (`(batch_size, seq_len)`, shifted inside, -100 ignored) and
    `depth_loss_spec`; the trainer passes both and `exit_gradient`, and logs, averaged over non-ignored target tokens:
    `ce_<k>` (next-token cross-entropy of exit k), `exit_<k>_accuracy` (next-token top-1 accuracy), `exit_ce` and
    `depth_loss`. Set `prediction_loss_only=True` to evaluate an LM without gathering `(batch, seq, vocab)` logits.

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
        if self._is_causal_lm(model):
            return self._compute_causal_lm_loss(model, inputs, return_outputs)
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

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """The stock optimizer; with `exit_head_learning_rate`, the exits' own parameters (names containing
        `exit_heads.` or `exit_adapters.`, PEFT copies included) move to groups of their own at that learning rate
        (the scheduler then scales every group alike)."""
        optimizer = super().create_optimizer(model)
        lr = self.args.exit_head_learning_rate
        if lr is None:
            return optimizer
        opt_model = self.model if model is None else model
        exit_params = {id(p) for n, p in opt_model.named_parameters() if p.requires_grad and _is_exit_parameter(n)}
        if not exit_params:
            raise ValueError(
                f"exit_head_learning_rate={lr} was set, but the model has no trainable exit parameters "
                "(exit_heads.* / exit_adapters.*)"
            )
        groups = []
        for group in optimizer.param_groups:
            inside = [p for p in group["params"] if id(p) in exit_params]
            outside = [p for p in group["params"] if id(p) not in exit_params]
            if outside:
                groups.append({**group, "params": outside})
            if inside:
                groups.append({**group, "params": inside, "lr": lr})
        optimizer.param_groups.clear()
        for group in groups:
            optimizer.add_param_group(group)
        return optimizer

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

    # ---- Decoder LMs: the loss is computed inside the model (never (batch, seq, exits, vocab) logits) --------------
    def _is_causal_lm(self, model) -> bool:
        """True for an early-exit decoder LM (a `GenerationMixin` whose forward takes `depth_loss_spec`), PEFT or not."""
        base = self.accelerator.unwrap_model(model)
        if hasattr(base, "get_base_model"):  # PeftModel
            base = base.get_base_model()
        return isinstance(base, GenerationMixin) and "depth_loss_spec" in inspect.signature(base.forward).parameters

    def _compute_causal_lm_loss(self, model, inputs, return_outputs):
        inputs = dict(inputs)
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError(
                "DepthStopTrainer needs `labels` (batch_size, seq_len) to train a decoder LM (next-token targets, "
                f"-100 ignored; a copy of input_ids works); the batch has only {sorted(inputs)}."
            )
        exit_gradient = self.args.exit_gradient if model.training else "full"
        spec = self.args.depth_loss_spec()
        outputs = model(**inputs, output_exit_logits=True, exit_gradient=exit_gradient, depth_loss_spec=spec)
        if outputs.exit_losses is None or outputs.exit_token_accuracies is None:
            raise TypeError(
                f"{type(model).__name__} returned no exit_losses/exit_token_accuracies with labels: it is not an "
                "hf_depthstop early-exit LM."
            )
        n_tokens = (labels[:, 1:] != -100).sum()
        self._record_causal_lm(model.training, outputs, n_tokens, spec)
        if return_outputs and not model.training:
            # evaluation gathers every tensor field across batches: keep the batch-shaped ones only
            outputs = type(outputs)(loss=outputs.loss, logits=outputs.logits)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    @torch.no_grad()
    def _record_causal_lm(self, training, outputs, n_tokens, spec):
        """Accumulates token-weighted sums of the LM exit metrics (reduced over processes) for `log`."""
        mode = "train" if training else "eval"
        exit_losses = outputs.exit_losses.detach().float()  # (num_exits,)
        accuracies = outputs.exit_token_accuracies.detach().float()  # (num_exits,)
        weights = exit_loss_weights(exit_losses.shape[0], spec.exit_weighting, spec.early_exit_weight)
        means = {f"ce_{k}": exit_losses[k] for k in range(exit_losses.shape[0])}
        means.update({f"exit_{k}_accuracy": accuracies[k] for k in range(accuracies.shape[0])})
        means["exit_ce"] = (exit_losses * weights.to(exit_losses.device)).sum()
        if outputs.depth_loss is not None:
            means["depth_loss"] = outputs.depth_loss.detach().float()
        names = sorted(means)
        n = n_tokens.to(exit_losses.device, torch.float32)
        stacked = torch.stack([means[name].to(exit_losses.device) * n for name in names] + [n])
        stacked = stacked.nan_to_num(0.0)  # a batch whose targets are all -100 has NaN means and weight 0
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

    # ---- Hub: the early-exit model card, and push errors that name the repo and the cause --------------------------
    def create_model_card(
        self, language=None, license=None, tags=None, model_name=None, finetuned_from=None, tasks=None,
        dataset_tags=None, dataset=None, dataset_args=None,
    ) -> None:
        """Writes the `hf_depthstop` model card into `output_dir` ([`hf_depthstop.modelcard.write_model_card`]:
        metadata, usage, exits and rule, calibration table and plot; the prose of an existing README.md is kept)
        instead of the stock training summary. A PEFT-wrapped model gets the stock (PEFT) card."""
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        if type(model).__module__.startswith("peft.") or not hasattr(getattr(model, "config", None), "exit_layers"):
            return super().create_model_card(
                language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
                tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
            )
        write_model_card(
            model, self.args.output_dir, repo_id=self.hub_model_id or self.args.hub_model_id,
            base_model=finetuned_from, datasets=dataset_tags or dataset, tags=[tags] if isinstance(tags, str) else tags,
            language=language, license=license, model_name=model_name,
        )

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True, token=None,
                    revision=None, private=None, **kwargs):
        """[`Trainer.push_to_hub`]: saves the model to `output_dir` (weights, config, remote code, card), then
        uploads it. A failure raises [`hf_depthstop.hub.HubPushError`] naming the repo and the cause; the local save
        in `output_dir` is complete either way (it is written first, also when creating the repo fails)."""
        repo_id = self.hub_model_id or self.args.hub_model_id or self.args.output_dir
        if self.hub_model_id is None:
            try:
                self.init_hf_repo(token=token, private=private)
            except Exception as exc:
                self.save_model(_internal_call=True)
                raise HubPushError(repo_id, hub_constants.ENDPOINT, exc, self.args.output_dir) from exc
        try:
            return super().push_to_hub(
                commit_message=commit_message, blocking=blocking, token=token, revision=revision, private=private,
                **kwargs,
            )
        except Exception as exc:
            repo_id = self.hub_model_id or repo_id
            raise HubPushError(repo_id, hub_constants.ENDPOINT, exc, self.args.output_dir) from exc
