# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForSequenceClassification

from hf_depthstop import DepthLossSpec, DepthStopBertForSequenceClassification
from hf_depthstop.losses import (
    depth_stop_loss,
    diminishing_returns_loss,
    distill_loss,
    exit_loss_weights,
    per_exit_cross_entropy,
    soft_stopping_distribution,
    stop_loss,
)

from .testing_utils import tiny_bert_config


def _logits(b=6, e=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, e, c, generator=g), torch.randint(0, c, (b,), generator=g)


def test_lambda_zero_is_plain_multi_exit_loss():
    logits, labels = _logits()
    for scheme in ("uniform", "linear", "final_heavy"):
        spec = DepthLossSpec(exit_weighting=scheme, depth_loss_weight=0.0, depth_terms=("stop", "distill"))
        loss, parts = depth_stop_loss(logits, labels, spec, torch.rand(6, 4))
        w = exit_loss_weights(4, scheme, spec.early_exit_weight)
        expected = sum(w[k] * F.cross_entropy(logits[:, k], labels) for k in range(4))
        torch.testing.assert_close(loss, expected)
        assert parts["depth_loss"] == 0


def test_final_only_lambda_zero_is_stock_fine_tuning_loss():
    logits, labels = _logits()
    loss, _ = depth_stop_loss(logits, labels, DepthLossSpec(exit_weighting="final_only", depth_loss_weight=0.0))
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, -1], labels))


def test_final_only_model_loss_equals_stock_bert_loss():
    torch.manual_seed(0)
    cfg = tiny_bert_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = DepthStopBertForSequenceClassification(cfg).train()
    stock_cfg = BertConfig(**{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
        "max_position_embeddings", "num_labels", "hidden_dropout_prob", "attention_probs_dropout_prob")})
    stock = BertForSequenceClassification(stock_cfg).train()
    stock.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(1, 99, (5, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = torch.tensor([0, 1, 2, 1, 0])
    spec = DepthLossSpec(exit_weighting="final_only", depth_loss_weight=0.0)
    ours = model(input_ids=ids, attention_mask=mask, labels=labels, depth_loss_spec=spec).loss
    theirs = stock(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("terms", [(), ("distill",), ("stop",), ("stop", "distill"), ("dr",)])
@pytest.mark.parametrize("exit_gradient", ["full", "detach", "equilibrium"])
def test_gradients_reach_every_exit_head(terms, exit_gradient):
    torch.manual_seed(0)
    model = DepthStopBertForSequenceClassification(tiny_bert_config()).train()
    ids = torch.randint(1, 99, (4, 7))
    spec = DepthLossSpec(exit_weighting="final_heavy", depth_terms=terms, depth_loss_weight=1.0)
    out = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0]), depth_loss_spec=spec, exit_gradient=exit_gradient)
    out.loss.backward()
    for k, head in enumerate(model.exit_heads):
        assert head.classifier.weight.grad is not None and head.classifier.weight.grad.abs().sum() > 0, k
    assert model.classifier.weight.grad.abs().sum() > 0
    assert model.bert.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0


def test_soft_stopping_distribution_sums_to_one_and_favours_confident_exits():
    logits, _ = _logits(b=32, e=5)
    q = soft_stopping_distribution(logits, sharpness=10.0, threshold=0.7)
    assert q.shape == (32, 5) and (q >= 0).all()
    torch.testing.assert_close(q.sum(1), torch.ones(32))
    confident = torch.zeros(1, 3, 2)
    confident[0, 0] = torch.tensor([20.0, 0.0])  # exit 0 sure, later exits unsure
    q = soft_stopping_distribution(confident, sharpness=10.0, threshold=0.7)
    assert q[0, 0] > 0.9 and q[0, 0] > q[0, 1:].sum()


def test_stop_loss_by_hand():
    logits, labels = _logits(b=3, e=2, c=2)
    c = torch.tensor([0.5, 1.0])
    got = stop_loss(logits, labels, c, compute_cost=0.2, sharpness=5.0, threshold=0.6)
    ce = per_exit_cross_entropy(logits, labels)
    s0 = torch.sigmoid(5.0 * (logits[:, 0].softmax(-1).amax(-1) - 0.6))
    q = torch.stack([s0, 1 - s0], 1)
    expected = (q * (ce + 0.2 * c)).sum(1).mean()
    torch.testing.assert_close(got, expected)


def test_distill_is_zero_when_exits_agree_and_never_trains_the_final_exit():
    same = torch.randn(4, 1, 3).repeat(1, 3, 1)
    assert distill_loss(same).abs() < 1e-6
    logits, _ = _logits()
    logits.requires_grad_(True)
    value = distill_loss(logits, temperature=2.0)
    assert value > 0
    value.backward()
    assert logits.grad[:, -1].abs().sum() == 0
    assert logits.grad[:, :-1].abs().sum() > 0


def test_dr_loss_by_hand():
    r = torch.tensor([[0.5, 0.2], [0.1, 0.4]])
    got = diminishing_returns_loss(r, exit_layers=[1, 3], num_layers=4)
    expected = ((r**2) * torch.tensor([0.5, 1.0])).sum(1).mean()
    torch.testing.assert_close(got, expected)


def test_exit_weight_schemes():
    torch.testing.assert_close(exit_loss_weights(4, "uniform"), torch.full((4,), 0.25))
    torch.testing.assert_close(exit_loss_weights(3, "linear"), torch.tensor([1.0, 2.0, 3.0]) / 6)
    torch.testing.assert_close(exit_loss_weights(3, "final_heavy", 0.1), torch.tensor([0.1, 0.1, 1.0]))
    torch.testing.assert_close(exit_loss_weights(3, "final_only"), torch.tensor([0.0, 0.0, 1.0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"exit_weighting": "cubic"}, "exit_weighting.*cubic"),
        ({"depth_terms": ("stop", "halting")}, "depth_terms.*halting"),
        ({"depth_loss_weight": -1.0}, "depth_loss_weight.*-1.0"),
        ({"compute_cost": -0.1}, "compute_cost.*-0.1"),
        ({"distill_temperature": 0.0}, "distill_temperature.*0.0"),
    ],
)
def test_bad_loss_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DepthLossSpec(**kwargs)


def test_depth_terms_parse_from_string():
    assert DepthLossSpec(depth_terms="stop,distill").depth_terms == ("stop", "distill")
    assert DepthLossSpec(depth_terms="none").depth_terms == ()
