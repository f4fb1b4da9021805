# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
import copy
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

from hf_depthstop.calibration import (
    build_observations,
    calibrate,
    calibrate_records,
    collect_exit_records,
    evaluate_records,
    fit_temperatures,
)
from hf_depthstop.evaluation import run_rule

from .testing_utils import tiny_task, train_tiny_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, _ = train_tiny_model(str(tmp_path_factory.mktemp("tiny")), steps=150)
    return model


@pytest.fixture(scope="module")
def calib_set():
    return tiny_task(400, seed=1)


def test_fit_temperatures_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 1, 4, generator=g) * 3
    labels = torch.multinomial((z[:, 0] / 2.5).softmax(-1), 1, generator=g).squeeze(1)
    (t,) = fit_temperatures(z, labels)
    assert abs(t - 2.5) < 0.25


def test_tiny_model_learned_the_task(trained, calib_set):
    records = collect_exit_records(trained, calib_set)
    acc = (records.exit_logits[:, -1].argmax(-1) == records.labels).float().mean()
    assert acc > 0.6  # chance is about 0.33


def test_calibrate_meets_the_target_and_stores_everything(trained, calib_set):
    model = copy.deepcopy(trained)
    report = calibrate(model, calib_set, target=0.02)
    calib = model.config.calibration
    assert model.config.stopping_rule == "asti" and model.config.stopping_params == calib["settings"]["asti"]
    assert set(calib["settings"]) == {"static", "entropy", "confidence", "patience", "asti_bound", "asti"}
    assert len(calib["temperatures"]) == 4 and len(calib["asti"]["coef"]) == 3
    for row in report.table:
        if row["rule"] != "asti":  # asti's row is scored on cross-fitted probabilities
            assert row["accuracy"] >= report.full_accuracy - 0.02 - 1e-9, row
    assert report.oracle_floor["accuracy"] == pytest.approx(report.full_accuracy)
    assert report.oracle_floor["compute_fraction"] <= 1.0
    assert "| asti |" in report.to_markdown() and "| oracle floor |" in report.to_markdown()


def test_live_model_reproduces_the_offline_simulation(trained, calib_set):
    """Every rule's live batched exits equal the offline simulation the calibration scores."""
    model = copy.deepcopy(trained)
    calibrate(model, calib_set, target=0.02)
    records = collect_exit_records(model, calib_set)
    lips = model._exit_lipschitz()
    for rule, params in model.config.calibration["settings"].items():
        offline = evaluate_records(records, model.config.calibration, lips, rule, params)
        live = run_rule(model, calib_set, rule, params, batch_size=32)
        layers = np.array(records.exit_layers)[offline["exit_pos"].numpy()]
        agreement = (layers == live["exit_layer"]).mean()
        assert agreement >= 0.995, (rule, agreement)  # ties at a threshold may flip on float noise
        assert live["compute_fraction"].mean() == pytest.approx(offline["compute_fraction"], abs=0.01)


def test_compute_budget_and_risk_control(trained, calib_set):
    records = collect_exit_records(trained, calib_set)
    lips = trained._exit_lipschitz()
    budget = calibrate_records(records, lips, target=0.5, target_type="compute_budget")
    for row in budget["table"][1:]:
        assert row["compute_fraction"] <= 0.5 + 1e-9 or row["rule"] == "patience", row
    loose = calibrate_records(records, lips, target=0.05, target_type="max_accuracy_drop")
    safe = calibrate_records(records, lips, target=0.05, target_type="risk_controlled", epsilon=0.1)
    for name in ("confidence", "entropy", "asti"):
        c_loose = next(r for r in loose["table"] if r["rule"] == name)["compute_fraction"]
        c_safe = next(r for r in safe["table"] if r["rule"] == name)["compute_fraction"]
        assert c_safe >= c_loose - 1e-9, name  # certifying the drop w.p. 0.9 costs compute


def test_longstaff_schwartz_estimator_runs(trained, calib_set):
    model = copy.deepcopy(trained)
    report = calibrate(model, calib_set, target=0.02, asti_estimator="longstaff_schwartz")
    assert model.config.calibration["asti"]["estimator"] == "longstaff_schwartz"
    model.eval()
    live = run_rule(model, calib_set, "asti", model.config.stopping_params)
    assert live["compute_fraction"].mean() <= 1.0 and report.settings["asti"] == {"cost": 0.5}


def test_calibration_survives_save_and_load(trained, calib_set, tmp_path):
    model = copy.deepcopy(trained)
    calibrate(model, calib_set, target=0.02)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(model)
    assert loaded.config.calibration == model.config.calibration
    a = run_rule(model, calib_set, "asti", model.config.stopping_params)
    b = run_rule(loaded, calib_set, "asti", loaded.config.stopping_params)
    assert (a["exit_layer"] == b["exit_layer"]).all() and (a["predictions"] == b["predictions"]).all()


def test_observations_use_the_calibrated_temperatures(trained, calib_set):
    records = collect_exit_records(trained, calib_set)
    hot = build_observations(records, [0.5] * 4)
    cold = build_observations(records, [2.0] * 4)
    assert (hot[0].max_prob >= cold[0].max_prob).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"target": 1.5}, "target.*1.5"),
        ({"target": 0.0, "target_type": "compute_budget"}, "target.*compute_budget"),
        ({"target_type": "latency"}, "target_type.*latency"),
        ({"rule": "halting"}, "rule.*halting"),
        ({"epsilon": 0.0}, "epsilon.*0.0"),
        ({"asti_estimator": "trees"}, "asti_estimator.*trees"),
    ],
)
def test_bad_calibration_arguments(trained, calib_set, kwargs, match):
    with pytest.raises(ValueError, match=match):
        calibrate(copy.deepcopy(trained), calib_set, **kwargs)


def test_empty_or_unlabelled_calibration_set_is_refused(trained, calib_set):
    model = copy.deepcopy(trained)
    with pytest.raises(ValueError, match="empty"):
        calibrate(model, calib_set.select([]))
    with pytest.raises(ValueError, match="label"):
        calibrate(model, calib_set.remove_columns("label"))
    assert model.config.calibration is None  # nothing half-written
    assert not math.isnan(float(model.classifier.weight.detach().sum()))
