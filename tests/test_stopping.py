# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Stopping rules on hand-made tensors (no model)."""

import math

import pytest
import torch

from hf_depthstop.stopping import (
    AstiBoundStop,
    AstiStop,
    ConfidenceStop,
    EntropyStop,
    NoStop,
    PatienceStop,
    StaticStop,
    asti_features,
    build_rule,
    observe,
    simulate_exits,
    validate_rule,
)


def _observations(logit_rows, ratios=None, norms=None, next_compute=None, layers=None):
    """logit_rows: list over exits of (batch, C) tensors."""
    num_exits = len(logit_rows)
    batch = logit_rows[0].shape[0]
    ratios = ratios if ratios is not None else [torch.full((batch,), 0.5)] * num_exits
    norms = norms if norms is not None else [torch.ones(batch)] * num_exits
    next_compute = next_compute if next_compute is not None else [torch.full((batch,), 0.25)] * num_exits
    layers = layers if layers is not None else list(range(num_exits))
    obs, prev = [], None
    for k in range(num_exits):
        prev = observe(k, layers[k], logit_rows[k], 1.0, prev, ratios[k], norms[k], next_compute[k])
        obs.append(prev)
    return obs


def test_observe_computes_confidence_features():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    obs = observe(0, 0, logits, 1.0, None, torch.ones(2), torch.ones(2), torch.ones(2))
    p = math.exp(2) / (math.exp(2) + 2)
    torch.testing.assert_close(obs.max_prob, torch.tensor([p, 1 / 3]))
    torch.testing.assert_close(obs.margin, torch.tensor([p - (1 - p) / 2, 0.0]))
    torch.testing.assert_close(obs.entropy[1], torch.tensor(math.log(3)))
    assert obs.agree_count.tolist() == [0, 0]
    hot = observe(0, 0, logits, 0.5, None, torch.ones(2), torch.ones(2), torch.ones(2))  # temperature 0.5 sharpens
    assert hot.max_prob[0] > obs.max_prob[0]


def test_agree_count_and_rho_follow_the_history():
    a, b = torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    obs = _observations([a, a, a, b], ratios=[torch.tensor([0.8]), torch.tensor([0.4]), torch.tensor([0.2]), torch.tensor([0.1])])
    assert [o.agree_count.item() for o in obs] == [0, 1, 2, 0]
    torch.testing.assert_close(torch.stack([o.rho for o in obs]).squeeze(1), torch.tensor([1.0, 0.5, 0.5, 0.5]))


def test_confidence_entropy_static_none():
    sure, unsure = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.1, 0.0, 0.0]])
    rows = [torch.cat([unsure, sure]), torch.cat([sure, sure]), torch.cat([sure, sure])]
    obs = _observations(rows)
    assert simulate_exits(ConfidenceStop(0.9), obs).tolist() == [1, 0]
    assert simulate_exits(EntropyStop(0.3), obs).tolist() == [1, 0]
    assert simulate_exits(NoStop(), obs).tolist() == [2, 2]
    assert simulate_exits(StaticStop(1), obs).tolist() == [1, 1]
    assert simulate_exits(ConfidenceStop(1.0), obs).tolist() == [2, 2]  # never confident enough: full depth


def test_patience_counts_consecutive_agreement():
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    rows = [torch.cat(x) for x in ([a, a], [b, a], [b, a], [b, b], [b, b])]
    obs = _observations(rows)
    # row 0: a b b b b -> agree counts 0 0 1 2 3; row 1: a a a b b -> 0 1 2 0 1
    assert simulate_exits(PatienceStop(2), obs).tolist() == [3, 2]
    assert simulate_exits(PatienceStop(1), obs).tolist() == [2, 1]


def test_asti_bound_stops_when_the_bound_cannot_pay_for_the_next_block():
    logits = torch.zeros(2, 2)
    obs = _observations(
        [logits, logits, logits],
        ratios=[torch.tensor([0.5, 0.5]), torch.tensor([0.1, 0.4]), torch.tensor([0.05, 0.4])],
        norms=[torch.tensor([10.0, 10.0])] * 3,
        next_compute=[torch.tensor([0.3, 0.3])] * 3,
    )
    # exit 1: bound = K * norm * r * min(rho, 1) = 2 * 10 * 0.1 * 0.2 = 0.4 (row 0); 2 * 10 * 0.4 * 0.8 = 6.4 (row 1)
    rule = AstiBoundStop(cost=2.0, lipschitz=[2.0, 2.0, 0.0])  # pays 2 * 0.3 = 0.6 per next block
    assert simulate_exits(rule, obs).tolist() == [1, 2]
    assert simulate_exits(AstiBoundStop(cost=0.0, lipschitz=[2.0, 2.0, 0.0]), obs).tolist() == [2, 2]


def test_asti_probability_is_the_fitted_logistic_model():
    logits = [torch.tensor([[2.0, 0.0], [0.0, 0.1]]), torch.tensor([[2.0, 0.0], [0.0, 0.1]])]
    obs = _observations(logits)
    num_features = asti_features(obs[0]).shape[1]
    assert num_features == 2 * 2 + 7
    coef = [0.0] * num_features
    coef[4] = 3.0  # the max-prob feature
    model = {"mean": [[0.0] * num_features], "std": [[1.0] * num_features], "coef": [coef], "intercept": [-2.0]}
    rule = AstiStop(cost=0.5, model=model)
    p = rule.probability_same(obs[0])
    torch.testing.assert_close(p, torch.sigmoid(3.0 * obs[0].max_prob.double() - 2.0))
    assert rule(obs[0]).tolist() == (p >= 0.5).tolist()
    assert rule.probability_same(obs[1]).tolist() == [1.0, 1.0]  # the final exit is the final prediction
    assert simulate_exits(AstiStop(cost=0.0, model=model), obs).tolist() == [1, 1]


def test_observation_select_keeps_rows():
    obs = _observations([torch.randn(5, 3)])[0]
    sub = obs.select(torch.tensor([True, False, True, False, False]))
    assert sub.probs.shape == (2, 3) and sub.exit_index == obs.exit_index
    torch.testing.assert_close(sub.max_prob, obs.max_prob[[0, 2]])


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("halting", {}, "stopping_rule.*halting"),
        ("confidence", {"threshold": 1.5}, "threshold.*1.5"),
        ("confidence", {"patience": 2}, "confidence.*threshold.*patience"),
        ("entropy", {}, "entropy.*needs.*threshold"),
        ("entropy", {"threshold": -1}, "threshold.*-1"),
        ("patience", {"patience": 0}, "patience.*0"),
        ("static", {"layer": 9}, r"layer.*\[0, 3\].*9"),
        ("asti_bound", {"cost": -0.5}, "cost.*-0.5"),
        ("asti", {"cost": 0.1}, "asti.*needs calibration"),
        ("confidence", {"threshold": "high"}, "threshold.*high"),
    ],
)
def test_bad_rules_name_field_and_value(name, params, match):
    with pytest.raises(ValueError, match=match):
        validate_rule(name, params, [0, 1, 2, 3], None)


def test_asti_without_cost_uses_the_calibrated_setting():
    calibration = {"asti": {}, "settings": {"asti": {"cost": 0.07}}}
    assert validate_rule("asti", {}, [0, 1], calibration) == {"cost": 0.07}
    assert validate_rule("static", {"layer": 2.0}, [0, 1, 2], None) == {"layer": 2}
    assert isinstance(build_rule("patience", {"patience": 2}), PatienceStop)
