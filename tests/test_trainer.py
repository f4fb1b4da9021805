# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from hf_depthstop import DepthStopBertForSequenceClassification, DepthStopTrainer, DepthStopTrainingArguments

from .testing_utils import pad_collator, tiny_bert_config, tiny_task


def _args(tmp_path, **kwargs):
    values = dict(
        per_device_train_batch_size=8, per_device_eval_batch_size=16, max_steps=3, learning_rate=1e-3,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1, seed=0,
    )
    values.update(kwargs)
    return DepthStopTrainingArguments(str(tmp_path), **values)


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return DepthStopBertForSequenceClassification(tiny_bert_config(**kwargs))


def test_training_logs_exit_metrics_and_updates_every_part(tmp_path):
    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _args(tmp_path, exit_weighting="uniform", depth_terms="stop,distill,dr", depth_loss_weight=0.5)
    trainer = DepthStopTrainer(model=model, args=args, train_dataset=tiny_task(64), data_collator=pad_collator)
    trainer.train()
    logged = trainer.state.log_history[0]
    for key in ("loss", "exit_0_accuracy", "exit_3_accuracy", "ce_0", "exit_ce", "depth_loss", "stop", "distill", "dr",
                "mean_exit_layer"):
        assert key in logged, key
    assert 0.0 <= logged["mean_exit_layer"] <= 3.0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    for name in ("exit_heads.0.classifier.weight", "exit_heads.2.classifier.weight", "classifier.weight",
                 "bert.encoder.layer.0.attention.self.query.weight", "bert.embeddings.word_embeddings.weight"):
        assert name in changed, name


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    data = tiny_task(32)
    results = []
    for batch, accumulation in ((8, 1), (4, 2)):
        model = _model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        args = _args(tmp_path / f"{batch}", per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                     max_steps=1, max_grad_norm=1e9, depth_terms="distill")
        DepthStopTrainer(model=model, args=args, train_dataset=data, data_collator=pad_collator).train()
        results.append(dict(model.named_parameters()))
    for name, p in results[0].items():
        torch.testing.assert_close(p, results[1][name], atol=2e-6, rtol=1e-5, msg=name)


def test_final_only_without_l_depth_reproduces_stock_fine_tuning(tmp_path):
    """DepthStopTrainer with final-only weights and lambda = 0 trains exactly like Trainer + BertForSequenceClassification."""
    cfg = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    ours = _model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    stock = BertForSequenceClassification(BertConfig(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "num_labels", "hidden_dropout_prob", "attention_probs_dropout_prob")}))
    stock.load_state_dict(ours.state_dict(), strict=False)
    data = tiny_task(48)
    common = dict(per_device_train_batch_size=8, max_steps=4, learning_rate=1e-3, report_to="none", save_strategy="no",
                  use_cpu=True, disable_tqdm=True, seed=0)
    DepthStopTrainer(
        model=ours, args=DepthStopTrainingArguments(str(tmp_path / "a"), exit_weighting="final_only",
                                                    depth_loss_weight=0.0, **common),
        train_dataset=data, data_collator=pad_collator,
    ).train()
    Trainer(model=stock, args=TrainingArguments(str(tmp_path / "b"), **common), train_dataset=data,
            data_collator=pad_collator).train()
    theirs = dict(stock.named_parameters())
    for name, p in ours.named_parameters():
        if name in theirs:
            torch.testing.assert_close(p, theirs[name], atol=1e-5, rtol=1e-4, msg=name)


def test_evaluate_and_predict(tmp_path):
    model = _model()
    trainer = DepthStopTrainer(model=model, args=_args(tmp_path), train_dataset=tiny_task(32),
                               eval_dataset=tiny_task(40, seed=3), data_collator=pad_collator)
    metrics = trainer.evaluate()
    for k in range(4):
        assert 0.0 <= metrics[f"eval_exit_{k}_accuracy"] <= 1.0
    assert "eval_loss" in metrics and "eval_depth_loss" in metrics
    out = trainer.predict(tiny_task(20, seed=4))
    logits = out.predictions[0]
    assert logits.shape == (20, 3)
    assert out.predictions[1].shape == (20, 4, 3)  # exit_logits
    model.eval()
    assert model(input_ids=torch.tensor([[5, 6, 7]])).exit_layer.shape == (1,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exit_gradient": "sideways"}, "exit_gradient.*sideways"),
        ({"depth_terms": "stop,halt"}, "depth_terms.*halt"),
        ({"exit_weighting": "cubic"}, "exit_weighting.*cubic"),
        ({"compute_cost": -1.0}, "compute_cost.*-1.0"),
        ({"exit_head_learning_rate": 0.0}, "exit_head_learning_rate.*0.0"),
    ],
)
def test_bad_training_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthStopTrainingArguments(str(tmp_path), report_to="none", **kwargs)


def test_trainer_requires_depthstop_arguments(tmp_path):
    with pytest.raises(TypeError, match="DepthStopTrainingArguments"):
        DepthStopTrainer(model=_model(), args=TrainingArguments(str(tmp_path), report_to="none", use_cpu=True))


def test_exit_head_learning_rate_gives_the_exit_heads_their_own_groups(tmp_path):
    model = _model()
    trainer = DepthStopTrainer(
        model=model, args=_args(tmp_path, exit_head_learning_rate=0.05, weight_decay=0.01),
        train_dataset=tiny_task(16), data_collator=pad_collator,
    )
    optimizer = trainer.create_optimizer()
    lr_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(lr_of) == len(names)  # every parameter once
    for name, p in names.items():
        assert lr_of[id(p)] == (0.05 if name.startswith("exit_heads.") else 1e-3), name
    decay = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    assert decay[id(names["exit_heads.0.dense.weight"])] == 0.01 and decay[id(names["exit_heads.0.dense.bias"])] == 0.0
    trainer.train()  # the scheduler scales both groups: after warm-up-free linear decay both end at 0
    assert {group["lr"] for group in trainer.optimizer.param_groups} == {0.0}
    # a model without exit parameters: a clear error instead of a silently ignored setting
    from hf_depthstop import DepthStopLlamaConfig, DepthStopLlamaForCausalLM

    lm = DepthStopLlamaForCausalLM(DepthStopLlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                               intermediate_size=32, vocab_size=50))
    with pytest.raises(ValueError, match="no trainable exit parameters"):
        DepthStopTrainer(model=lm, args=_args(tmp_path, exit_head_learning_rate=0.05)).create_optimizer()
