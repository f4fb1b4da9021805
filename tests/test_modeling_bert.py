# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Tests of `DepthStopBertForSequenceClassification` and its config, on tiny random models (plus one real checkpoint)."""

import logging

import pytest
import torch
import transformers
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)

from hf_depthstop import DepthLossSpec, DepthStopBertConfig, DepthStopBertForSequenceClassification
from hf_depthstop.data import minilm_checkpoint_path
from hf_depthstop.flops import classification_head_flops, transformer_layer_flops
from hf_depthstop.stopping import build_rule, observe, simulate_exits


TINY = {
    "vocab_size": 99,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "num_labels": 3,
}
NUM_LAYERS = TINY["num_hidden_layers"]
LENGTHS = [12, 3, 5, 7, 9, 11, 2, 6]  # right-padded to 12; deliberately not sorted


def make_config(**overrides) -> DepthStopBertConfig:
    return DepthStopBertConfig(**{**TINY, **overrides})


def make_model(seed: int = 0, **overrides) -> DepthStopBertForSequenceClassification:
    torch.manual_seed(seed)
    return DepthStopBertForSequenceClassification(make_config(**overrides)).eval()


def padded_batch(lengths=LENGTHS, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded batch: random token ids (pad id 0) and the attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(1, TINY["vocab_size"], (len(lengths), width), generator=generator)
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def split_threshold(values: torch.Tensor) -> float:
    """A threshold in the widest gap between sorted values that leaves >= 2 rows on each side (no near-ties)."""
    v = values.detach().double().sort().values
    gaps = v[2:-1] - v[1:-2]  # gap between v[i] and v[i + 1] for i in 1 .. n-3
    i = int(gaps.argmax()) + 1
    return float((v[i] + v[i + 1]) / 2)


def flops_per_row(lengths: torch.Tensor, pooling: str = "cls"):
    c = TINY
    layer = transformer_layer_flops(lengths, c["hidden_size"], c["intermediate_size"])
    head = classification_head_flops(lengths, c["hidden_size"], c["num_labels"], pooling, dense_pooler=False)
    head = head + 2.0 * c["hidden_size"] ** 2  # the default exit head has a dense d -> d layer before its classifier
    final = classification_head_flops(
        lengths, c["hidden_size"], c["num_labels"], pooling, dense_pooler=pooling == "cls"
    )
    return layer, head, final


@torch.no_grad()
def mixed_params(model, batch, rule: str) -> dict:
    """Rule parameters that make some rows of `batch` stop at the first exit and others go on."""
    out = model(**batch, output_exit_logits=True)
    probs = out.exit_logits[:, 0].softmax(-1)
    if rule == "confidence":
        return {"threshold": split_threshold(probs.amax(-1))}
    if rule == "entropy":
        return {"threshold": split_threshold(-(probs * probs.log()).sum(-1))}
    if rule == "asti_bound":
        # stop at exit 0 iff K_0 * ||pool(h_0)|| * r_0 * rho_0 (= 1) <= cost * (compute of exit 1), K_0 = ||W_head1||_2
        k0 = model.exit_heads[1].lipschitz()
        bound = k0 * out.exit_state_norms[:, 0] * out.exit_residual_ratios[:, 0]
        layer, head, final = flops_per_row(batch["attention_mask"].sum(-1))
        next_compute = (layer + head) / (NUM_LAYERS * layer + final)
        return {"cost": split_threshold(bound.double() / next_compute)}
    if rule == "patience":
        return {"patience": 1}
    if rule == "static":
        return {"layer": 1}
    raise AssertionError(rule)


def row_counting_hooks(modules):
    """Forward pre-hooks recording (rows, seq_len) of the hidden states each module receives."""
    seen = [[] for _ in modules]

    def hook(i):
        def record(module, args, kwargs):
            hidden = args[0] if args else next(iter(kwargs.values()))
            seen[i].append(tuple(hidden.shape[:2]) if hidden.dim() == 3 else (hidden.shape[0], None))

        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    return seen, handles


# ----------------------------------------------------------------------------------------------------------------
# 1. Output shapes
# ----------------------------------------------------------------------------------------------------------------
def test_inference_output_shapes_and_dtypes():
    model = make_model()
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch)
    b = len(LENGTHS)
    assert out.logits.shape == (b, TINY["num_labels"])
    assert out.exit_layer.shape == (b,) and out.exit_layer.dtype == torch.long
    assert out.compute_fraction.shape == (b,) and out.compute_fraction.is_floating_point()
    assert out.loss is None and out.exit_logits is None  # the inference path returns no per-exit tensors
    with torch.no_grad():
        out = model(**batch, labels=torch.zeros(b, dtype=torch.long))
    assert out.loss.shape == ()
    # return_dict=False gives a tuple led by the logits
    with torch.no_grad():
        tup = model(**batch, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits)


@pytest.mark.parametrize("mode", ["train", "output_exit_logits"])
def test_training_path_output_shapes(mode):
    model = make_model(exit_layers=[0, 2])  # exits after layers 0, 2 and (appended) 3
    b, e, c = len(LENGTHS), 3, TINY["num_labels"]
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    if mode == "train":
        model.train()
        out = model(**padded_batch(), labels=labels)
    else:
        with torch.no_grad():
            out = model(**padded_batch(), labels=labels, output_exit_logits=True)
    assert out.exit_logits.shape == (b, e, c)
    for name in ("exit_compute_fractions", "exit_residual_ratios", "exit_state_norms"):
        assert getattr(out, name).shape == (b, e), name
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert out.logits.shape == (b, c)
    torch.testing.assert_close(out.logits, out.exit_logits[:, -1])
    assert out.exit_layer.tolist() == [NUM_LAYERS - 1] * b
    # the full-depth compute (every head on the way) is the last exit's fraction; fractions grow with depth
    torch.testing.assert_close(out.compute_fraction, out.exit_compute_fractions[:, -1])
    assert bool((out.exit_compute_fractions.diff(dim=1) > 0).all())


# ----------------------------------------------------------------------------------------------------------------
# 2. Rule `none` is the stock model; stock checkpoints load
# ----------------------------------------------------------------------------------------------------------------
def test_rule_none_equals_stock_bert_for_sequence_classification():
    model = make_model(exit_pooling="cls")
    stock = BertForSequenceClassification(BertConfig(**TINY)).eval()
    result = stock.load_state_dict(model.state_dict(), strict=False)
    assert list(result.missing_keys) == []
    assert result.unexpected_keys and all(k.startswith("exit_heads.") for k in result.unexpected_keys)
    batch = padded_batch()
    with torch.no_grad():
        ours = model(**batch)
        ref = stock(**batch).logits
    torch.testing.assert_close(ours.logits, ref, atol=1e-5, rtol=0)
    assert ours.exit_layer.tolist() == [NUM_LAYERS - 1] * len(LENGTHS)
    torch.testing.assert_close(ours.compute_fraction, torch.ones(len(LENGTHS)))


def test_stock_checkpoint_loads_with_new_exit_heads_warning(tmp_path, caplog):
    torch.manual_seed(0)
    stock = BertForSequenceClassification(BertConfig(**TINY)).eval()
    stock.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = DepthStopBertForSequenceClassification.from_pretrained(tmp_path)
    model.eval()
    assert model.config.model_type == "depthstop_bert"
    assert model.config.exit_layers == [0, 1, 2, 3] and model.config.stopping_rule == "none"
    # classifier and pooler weights are carried over, only the exit heads are new
    torch.testing.assert_close(model.classifier.weight, stock.classifier.weight, atol=0, rtol=0)
    torch.testing.assert_close(model.bert.pooler.dense.weight, stock.bert.pooler.dense.weight, atol=0, rtol=0)
    batch = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, stock(**batch).logits, atol=1e-5, rtol=0)
    warnings = [r.getMessage() for r in caplog.records if "exit heads are new" in r.getMessage()]
    assert len(warnings) == 1
    assert all(f"exit_heads.{i}" in warnings[0] for i in range(3))
    assert "classifier" not in warnings[0]


# ----------------------------------------------------------------------------------------------------------------
# 3. Mean pooling
# ----------------------------------------------------------------------------------------------------------------
def test_mean_pooling_rule_none_matches_hand_computation():
    model = make_model(exit_pooling="mean")
    assert model.bert.pooler is None
    batch = padded_batch()
    with torch.no_grad():
        out = model(**batch)
        hidden = model.bert(**batch).last_hidden_state  # stock BertModel forward on the same weights
        m = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * m).sum(1) / m.sum(1)
        expected = model.classifier(model.dropout(pooled))
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    assert out.exit_layer.tolist() == [NUM_LAYERS - 1] * len(LENGTHS)


# ----------------------------------------------------------------------------------------------------------------
# 4. A row's result does not depend on its batch
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience", "static", "asti_bound"])
def test_batched_equals_one_by_one(rule):
    model = make_model()
    batch = padded_batch()
    params = mixed_params(model, batch, rule)
    with torch.no_grad():
        batched = model(**batch, stopping_rule=rule, stopping_params=params)
        singles = [
            model(input_ids=batch["input_ids"][i : i + 1, :n], stopping_rule=rule, stopping_params=params)
            for i, n in enumerate(LENGTHS)
        ]
    layers = batched.exit_layer.tolist()
    if rule == "static":
        assert layers == [1] * len(LENGTHS)
    else:  # mixed: some rows stop early, some go on
        assert len(set(layers)) > 1, layers
        # patience(1) needs two agreeing exits, so its earliest stop is the second exit
        assert min(layers) == (1 if rule == "patience" else 0), layers
    assert layers == [int(s.exit_layer) for s in singles]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in singles]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.compute_fraction, torch.cat([s.compute_fraction for s in singles]))


@pytest.mark.parametrize("rule", ["confidence", "entropy", "asti_bound"])
def test_inference_path_agrees_with_training_path_exits(rule):
    """A row stopping at exit k returns exit k's logits from the all-exits path; exit 0 fires exactly as documented."""
    model = make_model()
    batch = padded_batch()
    params = mixed_params(model, batch, rule)
    with torch.no_grad():
        full = model(**batch, output_exit_logits=True)
        out = model(**batch, stopping_rule=rule, stopping_params=params)
    positions = out.exit_layer  # exit_layers == [0, 1, 2, 3]: position == layer
    picked = full.exit_logits[torch.arange(len(LENGTHS)), positions]
    torch.testing.assert_close(out.logits, picked, atol=1e-5, rtol=0)
    probs = full.exit_logits[:, 0].softmax(-1)
    if rule == "confidence":
        stops_at_0 = probs.amax(-1) >= params["threshold"]
    elif rule == "entropy":
        stops_at_0 = -(probs * probs.log()).sum(-1) <= params["threshold"]
    else:
        k0 = model.exit_heads[1].lipschitz()
        layer, head, final = flops_per_row(batch["attention_mask"].sum(-1))
        bound = (k0 * full.exit_state_norms[:, 0] * full.exit_residual_ratios[:, 0]).double()
        stops_at_0 = bound <= params["cost"] * (layer + head) / (NUM_LAYERS * layer + final)
    assert (positions == 0).tolist() == stops_at_0.tolist()


def synthetic_calibration(num_labels: int = 3, num_exits: int = 4) -> dict:
    """Per-exit temperatures and an ASTI estimator with fixed random coefficients (what `calibrate` would write)."""
    generator = torch.Generator().manual_seed(1)
    num_features = 2 * num_labels + 7
    return {
        "temperatures": [0.5, 0.8, 1.2, 1.0][:num_exits],
        "asti": {
            "mean": [[0.0] * num_features] * (num_exits - 1),
            "std": [[1.0] * num_features] * (num_exits - 1),
            "coef": (torch.randn(num_exits - 1, num_features, generator=generator) * 0.5).tolist(),
            "intercept": [0.0] * (num_exits - 1),
        },
    }


@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience", "asti_bound", "asti"])
def test_live_forward_matches_offline_simulation(rule):
    """The live batched forward stops every row where `simulate_exits` (used by calibration) says it would."""
    model = make_model(calibration=synthetic_calibration())
    batch = padded_batch()
    with torch.no_grad():
        full = model(**batch, output_exit_logits=True)
    num_exits = full.exit_logits.shape[1]
    observations, previous = [], None
    for k in range(num_exits):
        if k + 1 < num_exits:
            next_compute = full.exit_compute_fractions[:, k + 1] - full.exit_compute_fractions[:, k]
        else:
            next_compute = torch.zeros(len(LENGTHS))
        previous = observe(
            k,
            model.config.exit_layers[k],
            full.exit_logits[:, k],
            model.config.calibration["temperatures"][k],
            previous,
            full.exit_residual_ratios[:, k],
            full.exit_state_norms[:, k],
            next_compute,
        )
        observations.append(previous)
    first = observations[0]
    if rule == "confidence":
        params = {"threshold": split_threshold(first.max_prob)}
    elif rule == "entropy":
        params = {"threshold": split_threshold(first.entropy)}
    elif rule == "patience":
        params = {"patience": 1}
    elif rule == "asti_bound":
        k0 = model.exit_heads[1].lipschitz()
        params = {"cost": split_threshold(k0 * first.state_norm * first.residual_ratio / first.next_compute)}
    else:
        estimator = build_rule("asti", {"cost": 0.5}, model.config.calibration)
        params = {"cost": split_threshold(1.0 - estimator.probability_same(first))}
    lipschitz = model._exit_lipschitz() if rule == "asti_bound" else None
    simulated = simulate_exits(build_rule(rule, params, model.config.calibration, lipschitz), observations)
    with torch.no_grad():
        live = model(**batch, stopping_rule=rule, stopping_params=params)
    assert len(set(live.exit_layer.tolist())) > 1, live.exit_layer.tolist()
    assert live.exit_layer.tolist() == [model.config.exit_layers[k] for k in simulated.tolist()]
    torch.testing.assert_close(live.logits, full.exit_logits[torch.arange(len(LENGTHS)), simulated], atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# 5. Stopped rows really leave the batch
# ----------------------------------------------------------------------------------------------------------------
def test_stopped_rows_leave_the_batch():
    model = make_model()
    batch = padded_batch()
    params = mixed_params(model, batch, "confidence")
    seen, handles = row_counting_hooks(list(model.bert.encoder.layer))
    try:
        with torch.no_grad():
            out = model(**batch, stopping_rule="confidence", stopping_params=params)
    finally:
        for h in handles:
            h.remove()
    exit_layer = out.exit_layer
    lengths = torch.tensor(LENGTHS)
    rows = []
    for i in range(NUM_LAYERS):
        running = exit_layer >= i  # rows that reach layer i
        if not bool(running.any()):
            assert seen[i] == []
            continue
        assert len(seen[i]) == 1
        n, width = seen[i][0]
        rows.append(n)
        assert n == int(running.sum()), (i, seen)
        # padding columns no remaining row needs are dropped (right padding)
        assert width == int(lengths[running].max()), (i, seen)
    assert rows[0] == len(LENGTHS)
    assert rows[1] < rows[0]
    assert rows == sorted(rows, reverse=True)


def test_static_and_none_skip_layers_and_heads():
    model = make_model()
    batch = padded_batch()
    layer_seen, layer_handles = row_counting_hooks(list(model.bert.encoder.layer))
    head_seen, head_handles = row_counting_hooks([*model.exit_heads, model.classifier])
    try:
        with torch.no_grad():
            out = model(**batch, stopping_rule="static", stopping_params={"layer": 1})
        assert out.exit_layer.tolist() == [1] * len(LENGTHS)
        assert [len(s) for s in layer_seen] == [1, 1, 0, 0]  # layers 2-3 never run
        assert [len(s) for s in head_seen] == [0, 1, 0, 0]  # only the head of the exit used
        for s in (*layer_seen, *head_seen):
            s.clear()
        with torch.no_grad():
            out = model(**batch, stopping_rule="none")
        assert out.exit_layer.tolist() == [NUM_LAYERS - 1] * len(LENGTHS)
        assert [len(s) for s in layer_seen] == [1] * NUM_LAYERS
        assert [len(s) for s in head_seen] == [0, 0, 0, 1]  # intermediate exit heads never run
    finally:
        for h in (*layer_handles, *head_handles):
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# 6. compute_fraction
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_compute_fraction_static_is_analytic(pooling):
    model = make_model(exit_pooling=pooling)
    batch = padded_batch()
    lengths = batch["attention_mask"].sum(-1)
    layer, head, final = flops_per_row(lengths, pooling)
    full = NUM_LAYERS * layer + final
    fractions = []
    for k in range(NUM_LAYERS):
        with torch.no_grad():
            single = model(input_ids=batch["input_ids"][:1, :7], stopping_rule="static", stopping_params={"layer": k})
            batched = model(**batch, stopping_rule="static", stopping_params={"layer": k})
        layer7, head7, final7 = flops_per_row(torch.tensor([7]), pooling)
        this_head7 = head7 if k < NUM_LAYERS - 1 else final7
        expected7 = ((k + 1) * layer7 + this_head7) / (NUM_LAYERS * layer7 + final7)
        torch.testing.assert_close(single.compute_fraction, expected7.float())
        this_head = head if k < NUM_LAYERS - 1 else final
        # per row at its own true length: padding and batch-mates do not count
        torch.testing.assert_close(batched.compute_fraction, (((k + 1) * layer + this_head) / full).float())
        assert single.exit_layer.tolist() == [k]
        fractions.append(float(single.compute_fraction))
    assert fractions == sorted(fractions) and len(set(fractions)) == NUM_LAYERS
    assert fractions[-1] == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# 7. save / load round trip through the Auto classes
# ----------------------------------------------------------------------------------------------------------------
def test_save_and_auto_load_round_trip(tmp_path):
    model = make_model()
    batch = padded_batch()
    params = mixed_params(model, batch, "confidence")
    model.set_stopping_rule("confidence", **params)
    model.save_pretrained(tmp_path / "mixed")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "mixed").eval()
    assert type(loaded) is DepthStopBertForSequenceClassification
    assert loaded.config.stopping_rule == "confidence"
    assert loaded.config.stopping_params == params
    assert loaded.config.exit_layers == model.config.exit_layers
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert len(set(a.exit_layer.tolist())) > 1
    assert torch.equal(a.exit_layer, b.exit_layer)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.compute_fraction, b.compute_fraction, atol=0, rtol=0)

    model.set_stopping_rule("confidence", threshold=0.5)
    model.save_pretrained(tmp_path / "half")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "half")
    assert (loaded.config.stopping_rule, loaded.config.stopping_params) == ("confidence", {"threshold": 0.5})


# ----------------------------------------------------------------------------------------------------------------
# 8. Per-call override
# ----------------------------------------------------------------------------------------------------------------
def test_per_call_rule_override_leaves_config_unchanged():
    model = make_model()
    model.set_stopping_rule("patience", patience=1)
    batch = padded_batch()
    with torch.no_grad():
        before = model(**batch)
        out = model(**batch, stopping_rule="static", stopping_params={"layer": 0})
        after = model(**batch)
    assert out.exit_layer.tolist() == [0] * len(LENGTHS)
    assert (model.config.stopping_rule, model.config.stopping_params) == ("patience", {"patience": 1})
    assert torch.equal(before.exit_layer, after.exit_layer)
    assert before.exit_layer.tolist() != out.exit_layer.tolist()
    with pytest.raises(ValueError, match="confidence"):
        model(**batch, stopping_rule="confidence", stopping_params={"threshold": 2.0})


# ----------------------------------------------------------------------------------------------------------------
# 9. The real checkpoint through a pipeline
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_pipeline_with_real_minilm_checkpoint(caplog):
    path = minilm_checkpoint_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with caplog.at_level(logging.WARNING):
        model = DepthStopBertForSequenceClassification.from_pretrained(path, num_labels=3, exit_pooling="mean")
    model.eval()
    assert len(model.exit_heads) == 5 and model.config.exit_layers == [0, 1, 2, 3, 4, 5]
    assert model.bert.pooler is None
    warning = next(r.getMessage() for r in caplog.records if "exit heads are new" in r.getMessage())
    assert "classifier" in warning and all(f"exit_heads.{i}" in warning for i in range(5))
    reference = BertModel.from_pretrained(path)
    for name in ("embeddings.word_embeddings.weight", "encoder.layer.5.output.dense.weight"):
        torch.testing.assert_close(
            model.bert.get_parameter(name), reference.get_parameter(name), atol=0, rtol=0, msg=name
        )

    model.set_stopping_rule("confidence", threshold=0.35)
    sentences = ["What a wonderful day!", "I hate waiting in line.", "The meeting is at noon."]
    pipe = transformers.pipeline("text-classification", model=model, tokenizer=tokenizer, device="cpu")
    results = pipe(sentences)
    assert len(results) == 3
    labels = set(model.config.id2label.values())
    for sentence, result in zip(sentences, results):
        assert set(result) == {"label", "score"} and result["label"] in labels
        assert 0.0 < result["score"] <= 1.0
        with torch.no_grad():
            logits = model(**tokenizer(sentence, return_tensors="pt")).logits[0]
        assert result["label"] == model.config.id2label[int(logits.argmax())]
        assert result["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# 10. Gradients
# ----------------------------------------------------------------------------------------------------------------
NO_DROPOUT = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def backward(model, exit_gradient, spec=None):
    model.zero_grad(set_to_none=True)
    out = model(**padded_batch(), labels=LABELS, exit_gradient=exit_gradient, depth_loss_spec=spec)
    out.loss.backward()
    return out


def grad_of(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def test_gradients_reach_every_exit_head_and_the_backbone():
    model = make_model(**NO_DROPOUT).train()
    backward(model, "full")
    for i, head in enumerate(model.exit_heads):
        assert head.classifier.weight.grad is not None and head.classifier.weight.grad.abs().sum() > 0, i
    for name in ("classifier", "bert.pooler.dense", "bert.embeddings.word_embeddings"):
        assert model.get_submodule(name).weight.grad.abs().sum() > 0, name
    for i, layer in enumerate(model.bert.encoder.layer):
        params = list(layer.parameters())
        assert all(p.grad is not None for p in params) and grad_of(layer).abs().sum() > 0, i


def test_detach_mode_backbone_sees_only_the_final_exit_loss():
    model = make_model(**NO_DROPOUT).train()
    backward(model, "detach")  # default spec: final_heavy exit CE + distill
    detached = {i: grad_of(layer).clone() for i, layer in enumerate(model.bert.encoder.layer)}
    head_grads = [h.classifier.weight.grad.clone() for h in model.exit_heads]
    backward(model, "full", DepthLossSpec(exit_weighting="final_only", depth_loss_weight=0.0))
    for i, layer in enumerate(model.bert.encoder.layer):
        torch.testing.assert_close(detached[i], grad_of(layer), atol=1e-6, rtol=1e-5, msg=f"layer {i}")
    assert all(g.abs().sum() > 0 for g in head_grads)  # the exit heads still train
    assert all(h.classifier.weight.grad is None or h.classifier.weight.grad.abs().sum() == 0 for h in model.exit_heads)


def test_equilibrium_mode_same_forward_rescaled_gradients():
    model = make_model(**NO_DROPOUT).train()
    spec = DepthLossSpec(exit_weighting="final_only", depth_loss_weight=0.0)
    full = backward(model, "full", spec)
    full_grads = [grad_of(layer).clone() for layer in model.bert.encoder.layer]
    eq = backward(model, "equilibrium", spec)
    for name in ("loss", "logits", "exit_logits", "exit_residual_ratios", "exit_state_norms"):
        assert torch.equal(getattr(full, name), getattr(eq, name)), name
    # gradient equilibrium: the final exit's loss reaches layer i scaled by 1 / (number of exits from layer i on)
    num_exits = len(model.config.exit_layers)
    for i, layer in enumerate(model.bert.encoder.layer):
        torch.testing.assert_close(grad_of(layer), full_grads[i] / (num_exits - i), atol=1e-7, rtol=1e-4)
    # with the default loss, equilibrium's forward still equals full mode's exactly
    torch.manual_seed(0)
    a = backward(model, "full")
    b = backward(model, "equilibrium")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.exit_logits, b.exit_logits)


# ----------------------------------------------------------------------------------------------------------------
# 11. Bad inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"exit_layers": [7]}, r"exit_layers.*7"),
        ({"exit_layers": [-1, 3]}, r"exit_layers.*-1"),
        ({"exit_layers": [1, 1]}, r"exit_layers.*\[1, 1\]"),
        ({"exit_pooling": "max"}, r"exit_pooling.*'max'"),
        ({"stopping_rule": "bogus"}, r"stopping_rule.*'bogus'"),
        ({"stopping_rule": "confidence", "stopping_params": {"threshold": 1.5}}, r"confidence\(threshold.*1\.5"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(**overrides)


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("bogus", {}, r"stopping_rule.*'bogus'"),
        ("asti_bound", {"cost": -1.0}, r"asti_bound\(cost.*-1\.0"),
        ("asti", {"cost": 0.1}, r"'asti' needs calibration"),
        ("confidence", {"threshold": 1.5}, r"confidence\(threshold.*1\.5"),
        ("static", {"layer": 4}, r"static\(layer.*\[0, 3\].*got 4"),
        ("patience", {"patience": 0}, r"patience\(patience.*got 0"),
        ("confidence", {"patience": 2}, r"'confidence' takes threshold.*patience"),
        ("confidence", {}, r"'confidence' needs the parameter 'threshold'"),
    ],
)
def test_bad_stopping_rule_raises_and_keeps_config(name, params, match):
    model = make_model()
    model.set_stopping_rule("static", layer=2)
    with pytest.raises(ValueError, match=match):
        model.set_stopping_rule(name, **params)
    assert (model.config.stopping_rule, model.config.stopping_params) == ("static", {"layer": 2})


def test_empty_exit_layers_means_final_exit_only():
    config = make_config(exit_layers=[])
    assert config.exit_layers == [NUM_LAYERS - 1]


def test_non_bert_checkpoint_raises(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='gpt2'"):
        DepthStopBertForSequenceClassification.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='gpt2'"):
        DepthStopBertForSequenceClassification.from_pretrained(tmp_path, num_labels=3)


def test_num_labels_mismatch_on_load(tmp_path):
    make_model().save_pretrained(tmp_path)  # 3 labels
    with pytest.raises(ValueError, match=r"num_labels=2.*3 labels"):
        DepthStopBertForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    model = DepthStopBertForSequenceClassification.from_pretrained(
        tmp_path, num_labels=2, ignore_mismatched_sizes=True
    )
    assert model.config.num_labels == 2
    assert model.classifier.out_features == 2 and all(h.classifier.out_features == 2 for h in model.exit_heads)
    with torch.no_grad():
        assert model.eval()(**padded_batch()).logits.shape == (len(LENGTHS), 2)
    # the same label count is fine
    assert DepthStopBertForSequenceClassification.from_pretrained(tmp_path, num_labels=3).config.num_labels == 3


def test_input_longer_than_position_table_raises():
    model = make_model(max_position_embeddings=16)
    ids = torch.randint(1, TINY["vocab_size"], (2, 20))
    with pytest.raises(ValueError, match=r"input length 20.*max_position_embeddings=16"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"max_position_embeddings=16"):
        model(input_ids=ids, output_exit_logits=True)
    with torch.no_grad():
        assert model(input_ids=ids[:, :16]).logits.shape == (2, 3)  # exactly the table size is fine


def test_unknown_exit_gradient_raises():
    model = make_model().train()
    with pytest.raises(ValueError, match=r"exit_gradient.*'sideways'"):
        model(**padded_batch(), labels=LABELS, exit_gradient="sideways")


# ----------------------------------------------------------------------------------------------------------------
# 12. Config
# ----------------------------------------------------------------------------------------------------------------
def test_config_exit_layers_normalised_and_saved(tmp_path):
    assert make_config().exit_layers == [0, 1, 2, 3]
    config = make_config(exit_layers=[2, 0], exit_pooling="mean", stopping_rule="static", stopping_params={"layer": 1})
    assert config.exit_layers == [0, 2, 3]
    config.save_pretrained(tmp_path)
    loaded = DepthStopBertConfig.from_pretrained(tmp_path)
    assert loaded.exit_layers == [0, 2, 3]
    assert (loaded.exit_pooling, loaded.stopping_rule, loaded.stopping_params) == ("mean", "static", {"layer": 1})
    assert transformers.AutoConfig.from_pretrained(tmp_path).exit_layers == [0, 2, 3]
    # the model follows: one head per non-final exit; static(layer=1) stops at the first exit at or after layer 1
    torch.manual_seed(0)
    model = DepthStopBertForSequenceClassification(loaded).eval()
    assert len(model.exit_heads) == 2
    with torch.no_grad():
        out = model(**padded_batch())
        all_exits = model(**padded_batch(), output_exit_logits=True)
    assert out.exit_layer.tolist() == [2] * len(LENGTHS)
    assert all_exits.exit_logits.shape[1] == 3
    torch.testing.assert_close(out.logits, all_exits.exit_logits[:, 1], atol=1e-5, rtol=0)


def test_loading_with_other_exit_layers_is_refused(tmp_path):
    make_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"exit_layers=\[1, 3\].*checkpoint's exit_layers=\[0, 1, 2, 3\]"):
        DepthStopBertForSequenceClassification.from_pretrained(tmp_path, exit_layers=[1, 3])
    same = DepthStopBertForSequenceClassification.from_pretrained(tmp_path, exit_layers=[0, 1, 2])
    assert same.config.exit_layers == [0, 1, 2, 3]


def test_from_pretrained_overrides_are_validated(tmp_path):
    make_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="exit_pooling.*max"):
        DepthStopBertForSequenceClassification.from_pretrained(tmp_path, exit_pooling="max")
    with pytest.raises(ValueError, match="stopping_rule.*halting"):
        DepthStopBertForSequenceClassification.from_pretrained(tmp_path, stopping_rule="halting")


def test_mlp_exit_heads_shapes_flops_and_lipschitz():
    model = make_model(exit_head_hidden_size=16).eval()
    assert model.exit_heads[0].dense.weight.shape == (16, TINY["hidden_size"])
    batch = padded_batch()
    out = model(**batch, output_exit_logits=True)
    assert out.exit_logits.shape[1] == NUM_LAYERS
    lengths = batch["attention_mask"].sum(-1)
    layer = transformer_layer_flops(lengths, TINY["hidden_size"], TINY["intermediate_size"])
    d, c = TINY["hidden_size"], model.config.num_labels
    head = 2.0 * d * 16 + 2.0 * 16 * c
    final = classification_head_flops(lengths, d, c, "cls", dense_pooler=True)
    expected = (layer + head) / (NUM_LAYERS * layer + final)
    torch.testing.assert_close(out.exit_compute_fractions[:, 0].double(), expected, atol=1e-6, rtol=1e-6)
    head0 = model.exit_heads[0]
    bound = torch.linalg.matrix_norm(head0.classifier.weight, ord=2) * torch.linalg.matrix_norm(head0.dense.weight, ord=2)
    assert head0.lipschitz() == pytest.approx(bound.item(), rel=1e-5)
    with pytest.raises(ValueError, match="exit_head_hidden_size.*-3"):
        make_config(exit_head_hidden_size=-3)


def test_scaled_exit_gradient_interpolates_detach_and_full():
    batch = padded_batch()
    labels = torch.tensor([i % 3 for i in range(batch["input_ids"].shape[0])])
    spec = DepthLossSpec(exit_weighting="uniform", depth_terms=("distill",), depth_loss_weight=1.0)
    grads = {}
    for mode in ("detach", 0.0, "full", 1.0, "0.5"):
        model = make_model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()
        model(**batch, labels=labels, depth_loss_spec=spec, exit_gradient=mode).loss.backward()
        grads[mode] = model.bert.encoder.layer[0].output.dense.weight.grad.clone()
    torch.testing.assert_close(grads[0.0], grads["detach"])
    torch.testing.assert_close(grads[1.0], grads["full"])
    assert not torch.allclose(grads["0.5"], grads["full"]) and not torch.allclose(grads["0.5"], grads["detach"])
    model = make_model().train()
    with pytest.raises(ValueError, match="exit_gradient.*1.5"):
        model(**batch, labels=labels, exit_gradient=1.5)
