# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""DepthStopTrainer on early-exit decoder LMs: the loss computed inside the model, exit metrics, LoRA adapters."""

import datasets
import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import default_data_collator

from hf_depthstop import (
    DepthStopLlamaConfig,
    DepthStopLlamaForCausalLM,
    DepthStopTrainer,
    DepthStopTrainingArguments,
)
from hf_depthstop.losses import exit_loss_weights
from hf_depthstop.peft_utils import load_adapter, lora_config, save_adapter


VOCAB = 61
SEQ = 16
USED = 8  # the task uses tokens 0-7 of the vocabulary: even an attention-only LoRA learns that quickly


def tiny_llama(seed: int = 0, **kwargs) -> DepthStopLlamaForCausalLM:
    torch.manual_seed(seed)
    values = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        exit_layers=[1, 3],
    )
    values.update(kwargs)
    return DepthStopLlamaForCausalLM(DepthStopLlamaConfig(**values))


def counting_task(n: int, seed: int = 0) -> datasets.Dataset:
    """Arithmetic sequences mod USED (random start, step 1-3): each next token follows from the previous two."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, USED, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    rows = ((start + step * torch.arange(SEQ)) % USED).tolist()
    return datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * SEQ] * n, "labels": rows})


def make_args(tmp_path, **kwargs) -> DepthStopTrainingArguments:
    values = dict(
        per_device_train_batch_size=16,
        per_device_eval_batch_size=32,
        max_steps=12,
        learning_rate=2e-2,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=4,
        seed=0,
        prediction_loss_only=True,
        exit_gradient="full",
    )
    values.update(kwargs)
    return DepthStopTrainingArguments(str(tmp_path / "out"), **values)


def test_logged_metrics_are_the_models_own_exit_losses(tmp_path):
    model = tiny_llama()
    data = counting_task(32, seed=1)
    labels = torch.tensor(data["labels"])
    labels[:, :5] = -100  # ignored targets must not count
    data = data.remove_columns("labels").add_column("labels", labels.tolist())
    args = make_args(tmp_path, depth_terms="distill", exit_weighting="final_heavy", early_exit_weight=0.3)
    trainer = DepthStopTrainer(model=model, args=args, eval_dataset=data, data_collator=default_data_collator)
    metrics = trainer.evaluate()  # one batch of 32

    batch = default_data_collator(list(data))
    with torch.no_grad():
        out = model.eval()(**batch, output_exit_logits=True, depth_loss_spec=args.depth_loss_spec())
    assert metrics["eval_loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    for k in range(2):
        assert metrics[f"eval_ce_{k}"] == pytest.approx(out.exit_losses[k].item(), rel=1e-5)
        assert metrics[f"eval_exit_{k}_accuracy"] == pytest.approx(out.exit_token_accuracies[k].item(), abs=1e-6)
    weights = exit_loss_weights(2, "final_heavy", 0.3)
    assert metrics["eval_exit_ce"] == pytest.approx((out.exit_losses * weights).sum().item(), rel=1e-5)
    assert metrics["eval_depth_loss"] == pytest.approx(out.depth_loss.item(), rel=1e-4)
    assert metrics["eval_depth_loss"] > 0  # distill between a random exit 1 and the final exit
    # the loss is the weighted exit CEs plus lambda * L_depth, as configured
    assert out.loss.item() == pytest.approx(metrics["eval_exit_ce"] + args.depth_loss_weight * out.depth_loss.item())


def test_lora_training_lowers_the_loss_and_logs_exit_metrics(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    peft_config = lora_config(
        base, r=8, lora_alpha=16, lora_dropout=0.0, target_modules="q_proj,k_proj,v_proj,o_proj", task_type="CAUSAL_LM"
    )
    assert peft_config.modules_to_save in (None, [])  # exits share the LM head: no new modules to save
    model = get_peft_model(base, peft_config)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    train, val = counting_task(256, seed=0), counting_task(64, seed=1)
    args = make_args(tmp_path)
    trainer = DepthStopTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=val, data_collator=default_data_collator
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_loss"] < 0.97 * before["eval_loss"], (before, after)  # measured: 8.22 -> 7.78
    assert after["eval_exit_1_accuracy"] > 0.15 > before["eval_exit_1_accuracy"]  # measured: 0.0 -> 0.25
    for k in range(2):
        assert after[f"eval_ce_{k}"] < before[f"eval_ce_{k}"]  # the early exit learns too (exit_gradient=full)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:
        assert {"ce_0", "ce_1", "exit_0_accuracy", "exit_1_accuracy", "exit_ce", "depth_loss"} <= set(entry)
        assert all(0.0 <= entry[f"exit_{k}_accuracy"] <= 1.0 for k in range(2))
    for name, p in model.named_parameters():  # LoRA trains the adapters only
        if name in frozen:
            assert torch.equal(p, frozen[name]), name

    save_adapter(model, str(tmp_path / "adapter"))
    reloaded = load_adapter(str(tmp_path / "adapter"), base_model_name_or_path=str(tmp_path / "base"))
    assert isinstance(reloaded, PeftModel)
    assert isinstance(reloaded.get_base_model(), DepthStopLlamaForCausalLM)
    assert reloaded.get_base_model().config.exit_layers == [1, 3]
    ids = torch.tensor(val["input_ids"][:4])
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
        merged = reloaded.merge_and_unload()
        assert type(merged) is DepthStopLlamaForCausalLM
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_detach_keeps_the_backbone_on_the_final_loss(tmp_path):
    """exit_gradient=detach: early exits' losses do not reach the backbone, so the backbone update equals the one of
    final-only training (the shared norm and LM head, which every exit reads, are frozen here)."""
    grads = {}
    for name, extra in (("detach", dict(exit_gradient="detach")), ("final_only", dict(exit_weighting="final_only"))):
        model = tiny_llama()
        for p_name, p in model.named_parameters():
            p.requires_grad_(p_name.startswith("model.layers."))
        args = make_args(tmp_path, max_steps=1, learning_rate=1e-3, depth_loss_weight=0.0, **extra)
        trainer = DepthStopTrainer(model=model, args=args, data_collator=default_data_collator)
        model.train()
        batch = default_data_collator(list(counting_task(8)))
        trainer.compute_loss(model, batch).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["detach"].keys() == grads["final_only"].keys() and grads["detach"]
    for n in grads["detach"]:
        torch.testing.assert_close(grads["detach"][n], grads["final_only"][n])


def test_lm_batch_without_labels_is_refused(tmp_path):
    model = tiny_llama()
    trainer = DepthStopTrainer(model=model, args=make_args(tmp_path), data_collator=default_data_collator)
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    with pytest.raises(ValueError, match="needs `labels`"):
        trainer.compute_loss(model.train(), batch)


@pytest.mark.slow  # the recipe end to end on the real plays and tokenizer, with a tiny random model
def test_recipe_end_to_end_with_a_tiny_model(tmp_path):
    import json
    import os
    import sys

    from transformers import AutoTokenizer

    from hf_depthstop.data import smollm2_checkpoint_path

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
    from train_lm import main, parse_args

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint_path())
    base = tiny_llama(vocab_size=len(tokenizer), exit_layers=None)
    base.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    config = os.path.join(os.path.dirname(__file__), "..", "recipes", "configs", "smollm2_shakespeare.yaml")
    out = tmp_path / "run"
    script_args, training_args = parse_args(
        ["--config", config, "--model_name_or_path", str(tmp_path / "tiny"), "--output_dir", str(out),
         "--exit_layers", "1,2,3", "--block_size", "32", "--max_train_blocks", "64", "--max_eval_blocks", "8",
         "--max_steps", "3", "--max_train_seconds", "1e-6", "--num_threads", "1", "--disable_tqdm", "true"]
    )  # fmt: skip
    results = main(script_args, training_args)
    assert results["train"]["steps"] == 1 and results["train"]["stopped_by_time_budget"]  # the budget stopped it
    assert results["exit_layers"] == [1, 2, 3]
    for key in ("eval_before", "eval"):
        assert {"eval_loss", "eval_ce_0", "eval_exit_2_accuracy", "exit_0_perplexity"} <= set(results[key])
    saved = DepthStopLlamaForCausalLM.from_pretrained(out)
    assert saved.config.stopping_rule == "asti" and saved.config.calibration["num_tokens"] == 8 * 32
    assert json.loads((out / "depthstop_results.json").read_text())["calibration"]["tokens"] == 8 * 32
    reloaded = load_adapter(str(out / "adapter"), base_model_name_or_path=str(tmp_path / "tiny"))
    assert reloaded.get_base_model().config.calibration == saved.config.calibration
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, saved.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip


def test_recipe_rejects_bad_arguments(tmp_path):
    import os
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
    from train_lm import TrainTimeBudget, _exit_layers

    with pytest.raises(ValueError, match="max_train_seconds=0"):
        TrainTimeBudget(0)
    with pytest.raises(ValueError, match="exit_layers='1,x'"):
        _exit_layers("1,x")
    assert _exit_layers("all") is None and _exit_layers("3,1") == [3, 1]
