# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Tests of `DepthStopViTForImageClassification` and its config, on tiny random models."""

import copy
import json
import logging

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    ViTModel,
)

from hf_depthstop import (
    DepthLossSpec,
    DepthStopTrainer,
    DepthStopTrainingArguments,
    DepthStopViTConfig,
    DepthStopViTForImageClassification,
)
from hf_depthstop.modeling_outputs import DepthStopImageClassifierOutput
from hf_depthstop.stopping import build_rule, observe, simulate_exits

from .testing_utils import tiny_image_task, tiny_vit_config


TINY = {
    "image_size": 16,
    "patch_size": 4,
    "num_channels": 3,
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 37,
    "num_labels": 3,
}
NUM_LAYERS = TINY["num_hidden_layers"]
BATCH = 8
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def make_config(**overrides) -> DepthStopViTConfig:
    return DepthStopViTConfig(**{**TINY, **overrides})


def make_model(seed: int = 0, **overrides) -> DepthStopViTForImageClassification:
    torch.manual_seed(seed)
    return DepthStopViTForImageClassification(make_config(**overrides)).eval()


def images(batch: int = BATCH, seed: int = 0, size: int = 16, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def analytic_flops(size: int = 16, head_width: int = 32):
    """(embed, layer, non-final head, final head) FLOPs of one image, by hand (multiply-add = 2 FLOPs)."""
    d, dff, c, p, ch = TINY["hidden_size"], TINY["intermediate_size"], TINY["num_labels"], TINY["patch_size"], 3
    n = (size // p) ** 2
    t = n + 1  # patches + [CLS]
    embed = 2.0 * n * (ch * p * p) * d
    layer = 2.0 * t * (4 * d * d + 2 * d * dff) + 4.0 * t * t * d
    head = 2.0 * d * head_width + 2.0 * head_width * c if head_width else 2.0 * d * c
    final = 2.0 * d * c
    return embed, layer, head, final


def split_threshold(values: torch.Tensor) -> float:
    """A threshold in the widest gap between sorted values that leaves >= 2 rows on each side (no near-ties)."""
    v = values.detach().double().sort().values
    gaps = v[2:-1] - v[1:-2]
    i = int(gaps.argmax()) + 1
    return float((v[i] + v[i + 1]) / 2)


@torch.no_grad()
def mixed_params(model, pixel_values, rule: str) -> dict:
    """Rule parameters that make some images stop at the first exit and others go on."""
    out = model(pixel_values, output_exit_logits=True)
    probs = (out.exit_logits[:, 0] / model._exit_temperatures()[0]).softmax(-1)  # what the rules read
    if rule == "confidence":
        return {"threshold": split_threshold(probs.amax(-1))}
    if rule == "entropy":
        return {"threshold": split_threshold(-(probs * probs.log()).sum(-1))}
    if rule == "asti_bound":
        # stop at exit 0 iff K_0 * ||layernorm(h_0)|| * r_0 * rho_0 (= 1) <= cost * (compute of exit 1)
        k0 = model.exit_heads[1].lipschitz()
        bound = k0 * out.exit_state_norms[:, 0] * out.exit_residual_ratios[:, 0]
        next_compute = out.exit_compute_fractions[:, 1] - out.exit_compute_fractions[:, 0]
        return {"cost": split_threshold(bound.double() / next_compute.double())}
    if rule == "asti":
        estimator = build_rule("asti", {"cost": 0.5}, model.config.calibration)
        first = observe(
            0,
            0,
            out.exit_logits[:, 0],
            model.config.calibration["temperatures"][0],
            None,
            out.exit_residual_ratios[:, 0],
            out.exit_state_norms[:, 0],
            out.exit_compute_fractions[:, 1] - out.exit_compute_fractions[:, 0],
        )
        return {"cost": split_threshold(1.0 - estimator.probability_same(first))}
    if rule == "patience":
        return {"patience": 1}
    if rule == "static":
        return {"layer": 1}
    raise AssertionError(rule)


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


def row_counting_hooks(modules):
    """Forward pre-hooks recording the leading (batch) size of the first input each module receives."""
    seen = [[] for _ in modules]

    def hook(i):
        def record(module, args, kwargs):
            hidden = args[0] if args else next(iter(kwargs.values()))
            seen[i].append(hidden.shape[0])

        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(modules)]
    return seen, handles


def stock_config(**overrides) -> ViTConfig:
    return ViTConfig(**{**TINY, **overrides})


# ----------------------------------------------------------------------------------------------------------------
# 1. Output shapes
# ----------------------------------------------------------------------------------------------------------------
def test_inference_output_shapes_and_dtypes():
    model = make_model()
    with torch.no_grad():
        out = model(images())
    assert isinstance(out, DepthStopImageClassifierOutput)
    assert out.logits.shape == (BATCH, TINY["num_labels"])
    assert out.exit_layer.shape == (BATCH,) and out.exit_layer.dtype == torch.long
    assert out.compute_fraction.shape == (BATCH,) and out.compute_fraction.dtype == torch.float32
    assert out.loss is None and out.exit_logits is None and out.exit_residual_ratios is None
    with torch.no_grad():
        out = model(images(), labels=LABELS)
        tup = model(images(), return_dict=False)
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits)


@pytest.mark.parametrize("mode", ["train", "output_exit_logits"])
def test_training_path_output_shapes(mode):
    model = make_model(exit_layers=[0, 2])  # exits after layers 0, 2 and (appended) 3
    b, e, c = BATCH, 3, TINY["num_labels"]
    if mode == "train":
        out = model.train()(images(), labels=LABELS)
    else:
        with torch.no_grad():
            out = model(images(), labels=LABELS, output_exit_logits=True)
    assert out.exit_logits.shape == (b, e, c)
    for name in ("exit_compute_fractions", "exit_residual_ratios", "exit_state_norms"):
        assert getattr(out, name).shape == (b, e), name
    assert out.loss.shape == () and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits, out.exit_logits[:, -1])
    assert out.exit_layer.tolist() == [NUM_LAYERS - 1] * b
    torch.testing.assert_close(out.compute_fraction, out.exit_compute_fractions[:, -1])
    assert bool((out.exit_compute_fractions.diff(dim=1) > 0).all())


def test_residual_ratio_and_state_norm_are_the_documented_cls_statistics():
    """r_l on the [CLS] token before the final layer norm; the state norm after it (what the head reads)."""
    model = make_model()
    x = images()
    with torch.no_grad():
        out = model(x, output_exit_logits=True)
        hidden = model.vit.embeddings(x)
        states = [hidden[:, 0]]
        for layer in model.vit.layers:
            hidden = layer(hidden)
            states.append(hidden[:, 0])
    for i in range(NUM_LAYERS):
        prev, cur = states[i], states[i + 1]
        torch.testing.assert_close(out.exit_residual_ratios[:, i], (cur - prev).norm(dim=-1) / prev.norm(dim=-1))
        torch.testing.assert_close(out.exit_state_norms[:, i], model.vit.layernorm(cur).norm(dim=-1))


# ----------------------------------------------------------------------------------------------------------------
# 2. Rule `none` is the stock model; stock checkpoints (current and legacy key names) load
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_rule_none_equals_stock_vit_for_image_classification(attn_implementation):
    model = make_model(attn_implementation=attn_implementation)
    stock = ViTForImageClassification(stock_config(attn_implementation=attn_implementation)).eval()
    assert model.config._attn_implementation == stock.config._attn_implementation == attn_implementation
    result = stock.load_state_dict(model.state_dict(), strict=False)
    assert list(result.missing_keys) == []
    assert result.unexpected_keys and all(k.startswith("exit_heads.") for k in result.unexpected_keys)
    x = images()
    with torch.no_grad():
        ours = model(x)
        ref = stock(x).logits
    torch.testing.assert_close(ours.logits, ref, atol=1e-5, rtol=0)
    assert ours.exit_layer.tolist() == [NUM_LAYERS - 1] * BATCH
    torch.testing.assert_close(ours.compute_fraction, torch.ones(BATCH))


def test_stock_checkpoint_loads_with_new_exit_heads_warning(tmp_path, caplog):
    torch.manual_seed(0)
    stock = ViTForImageClassification(stock_config()).eval()
    stock.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = DepthStopViTForImageClassification.from_pretrained(tmp_path)
    model.eval()
    assert model.config.model_type == "depthstop_vit"
    assert model.config.exit_layers == [0, 1, 2, 3] and model.config.stopping_rule == "none"
    stock_state = stock.state_dict()
    for key, value in model.state_dict().items():
        if not key.startswith("exit_heads."):
            torch.testing.assert_close(value, stock_state[key], atol=0, rtol=0, msg=key)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, stock(x).logits, atol=1e-5, rtol=0)
    warnings = [r.getMessage() for r in caplog.records if "exit heads are new" in r.getMessage()]
    assert len(warnings) == 1
    assert all(f"exit_heads.{i}" in warnings[0] for i in range(3)) and "classifier" not in warnings[0]


def test_backbone_checkpoint_loads_and_the_classifier_is_new(tmp_path, caplog):
    torch.manual_seed(0)
    backbone = ViTModel(stock_config()).eval()  # with its pooler, which our classifier does not use
    backbone.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = DepthStopViTForImageClassification.from_pretrained(tmp_path, num_labels=5)
    assert model.classifier.out_features == 5
    for name, value in model.vit.state_dict().items():
        torch.testing.assert_close(value, backbone.state_dict()[name], atol=0, rtol=0, msg=name)
    warning = next(r.getMessage() for r in caplog.records if "exit heads are new" in r.getMessage())
    assert "classifier" in warning and all(f"exit_heads.{i}" in warning for i in range(3))


def legacy_name(key: str) -> str:
    """transformers 4.x ViT parameter name of a transformers 5 one (v5 renames these back on load)."""
    renames = [
        ("vit.layers.", "vit.encoder.layer."),
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".mlp.fc1.", ".intermediate.dense."),
        (".mlp.fc2.", ".output.dense."),
    ]
    for old, new in renames:
        key = key.replace(old, new)
    return key


def test_legacy_key_checkpoint_loads_with_identical_outputs(tmp_path, caplog):
    torch.manual_seed(0)
    stock = ViTForImageClassification(stock_config()).eval()
    stock.save_pretrained(tmp_path)  # config.json (and a current-layout file, replaced below)
    legacy = {legacy_name(k): v.contiguous() for k, v in stock.state_dict().items()}
    assert "vit.encoder.layer.0.attention.attention.query.weight" in legacy
    assert (
        "vit.encoder.layer.3.output.dense.bias" in legacy and "vit.encoder.layer.3.intermediate.dense.weight" in legacy
    )
    assert not any(k.startswith("vit.layers.") for k in legacy)
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        model, info = DepthStopViTForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    model.eval()
    assert not info["unexpected_keys"]
    assert sorted({k.split(".")[0] + "." + k.split(".")[1] for k in info["missing_keys"]}) == [
        "exit_heads.0",
        "exit_heads.1",
        "exit_heads.2",
    ]
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, stock(x).logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        model.vit.layers[2].attention.q_proj.weight, stock.vit.layers[2].attention.q_proj.weight, atol=0, rtol=0
    )


def test_legacy_key_backbone_checkpoint_loads(tmp_path):
    """A legacy `ViTModel` file: keys without the `vit.` prefix (`encoder.layer.0.attention.attention.query...`)."""
    torch.manual_seed(0)
    backbone = ViTModel(stock_config(), add_pooling_layer=False).eval()
    backbone.save_pretrained(tmp_path)
    legacy = {legacy_name("vit." + k)[len("vit.") :]: v.contiguous() for k, v in backbone.state_dict().items()}
    assert "encoder.layer.0.attention.attention.query.weight" in legacy
    save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = DepthStopViTForImageClassification.from_pretrained(tmp_path, num_labels=3).eval()
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(model.vit.state_dict()[name], value, atol=0, rtol=0, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# 3. A row's result does not depend on its batch; rows really leave the batch
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["none", "static", "confidence", "entropy", "patience", "asti_bound", "asti"])
def test_batched_equals_one_by_one(rule):
    model = make_model(calibration=synthetic_calibration())
    x = images()
    params = {} if rule == "none" else mixed_params(model, x, rule)
    with torch.no_grad():
        batched = model(x, stopping_rule=rule, stopping_params=params)
        singles = [model(x[i : i + 1], stopping_rule=rule, stopping_params=params) for i in range(BATCH)]
    layers = batched.exit_layer.tolist()
    if rule == "none":
        assert layers == [NUM_LAYERS - 1] * BATCH
    elif rule == "static":
        assert layers == [1] * BATCH
    else:  # mixed: some images stop early, some go on
        assert len(set(layers)) > 1, layers
        if rule == "patience":  # patience(1) needs two agreeing exits: never stops at the first
            assert min(layers) >= 1, layers
        else:
            assert min(layers) == 0, layers
    assert layers == [int(s.exit_layer) for s in singles]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in singles]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.compute_fraction, torch.cat([s.compute_fraction for s in singles]))


@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience", "asti_bound", "asti"])
def test_live_forward_matches_offline_simulation_and_training_path(rule):
    """The live batched forward stops every image where `simulate_exits` (what calibration uses) says it would,
    with the logits of that exit from the all-exits path."""
    model = make_model(calibration=synthetic_calibration())
    x = images()
    params = mixed_params(model, x, rule)
    with torch.no_grad():
        full = model(x, output_exit_logits=True)
        live = model(x, stopping_rule=rule, stopping_params=params)
    num_exits = full.exit_logits.shape[1]
    observations, previous = [], None
    for k in range(num_exits):
        nxt = (
            full.exit_compute_fractions[:, k + 1] - full.exit_compute_fractions[:, k]
            if k + 1 < num_exits
            else (torch.zeros(BATCH))
        )
        previous = observe(
            k,
            k,
            full.exit_logits[:, k],
            model.config.calibration["temperatures"][k],
            previous,
            full.exit_residual_ratios[:, k],
            full.exit_state_norms[:, k],
            nxt,
        )
        observations.append(previous)
    lipschitz = model._exit_lipschitz() if rule == "asti_bound" else None
    simulated = simulate_exits(build_rule(rule, params, model.config.calibration, lipschitz), observations)
    assert len(set(live.exit_layer.tolist())) > 1
    assert live.exit_layer.tolist() == simulated.tolist()  # exit_layers == [0, 1, 2, 3]: position == layer
    torch.testing.assert_close(live.logits, full.exit_logits[torch.arange(BATCH), simulated], atol=1e-5, rtol=0)


def test_stopped_rows_leave_the_batch():
    model = make_model()
    x = images()
    params = mixed_params(model, x, "confidence")
    seen, handles = row_counting_hooks(list(model.vit.layers))
    try:
        with torch.no_grad():
            out = model(x, stopping_rule="confidence", stopping_params=params)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i in range(NUM_LAYERS):
        running = int((out.exit_layer >= i).sum())  # images that reach layer i
        assert seen[i] == ([running] if running else []), (i, seen)
        rows.append(running)
    assert rows[0] == BATCH and rows[1] < rows[0]


def test_static_and_none_skip_layers_and_heads():
    model = make_model()
    layer_seen, layer_handles = row_counting_hooks(list(model.vit.layers))
    head_seen, head_handles = row_counting_hooks([*model.exit_heads, model.classifier])
    try:
        with torch.no_grad():
            out = model(images(), stopping_rule="static", stopping_params={"layer": 1})
        assert out.exit_layer.tolist() == [1] * BATCH
        assert [len(s) for s in layer_seen] == [1, 1, 0, 0]  # layers 2-3 never run
        assert [len(s) for s in head_seen] == [0, 1, 0, 0]  # only the head of the exit used
        for s in (*layer_seen, *head_seen):
            s.clear()
        with torch.no_grad():
            model(images(), stopping_rule="none")
        assert [len(s) for s in layer_seen] == [1] * NUM_LAYERS
        assert [len(s) for s in head_seen] == [0, 0, 0, 1]  # intermediate exit heads never run
    finally:
        for h in (*layer_handles, *head_handles):
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# 4. compute_fraction
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_width", [32, 0])
def test_compute_fractions_are_analytic(head_width):
    model = make_model(exit_head_hidden_size=head_width)
    embed, layer, head, final = analytic_flops(head_width=head_width)
    full = embed + NUM_LAYERS * layer + final
    for k in range(NUM_LAYERS):
        this_head = final if k == NUM_LAYERS - 1 else head
        with torch.no_grad():
            out = model(images(), stopping_rule="static", stopping_params={"layer": k})
        assert out.exit_layer.tolist() == [k] * BATCH
        expected = (embed + (k + 1) * layer + this_head) / full  # static pays for its own head only
        torch.testing.assert_close(out.compute_fraction, torch.full((BATCH,), expected, dtype=torch.float32))
    with torch.no_grad():
        train_path = model(images(), output_exit_logits=True)
    all_heads, single = model._exit_fractions({"pixel_values": images()})
    for k in range(NUM_LAYERS):
        this_head = final if k == NUM_LAYERS - 1 else head
        every = (embed + (k + 1) * layer + k * head + this_head) / full  # every earlier head ran too
        only = (embed + (k + 1) * layer + this_head) / full
        torch.testing.assert_close(all_heads[:, k], torch.full((BATCH,), every, dtype=torch.float32))
        torch.testing.assert_close(single[:, k], torch.full((BATCH,), only, dtype=torch.float32))
    torch.testing.assert_close(train_path.exit_compute_fractions, all_heads)
    assert all_heads.dtype == single.dtype == torch.float32
    torch.testing.assert_close(single[:, -1], torch.ones(BATCH))


def test_rules_reading_every_exit_pay_for_every_head():
    model = make_model()
    x = images()
    params = mixed_params(model, x, "confidence")
    with torch.no_grad():
        out = model(x, stopping_rule="confidence", stopping_params=params)
    embed, layer, head, final = analytic_flops()
    full = embed + NUM_LAYERS * layer + final
    for layer_index, fraction in zip(out.exit_layer.tolist(), out.compute_fraction.tolist()):
        this_head = final if layer_index == NUM_LAYERS - 1 else head
        expected = (embed + (layer_index + 1) * layer + layer_index * head + this_head) / full
        assert fraction == pytest.approx(expected, rel=1e-6)


def test_interpolate_pos_encoding_larger_images():
    model = make_model()
    x = images(batch=2, size=24)  # 6x6 patches instead of 4x4
    with pytest.raises(ValueError, match=r"24x24.*image_size=16.*interpolate_pos_encoding=True"):
        model(x)
    with torch.no_grad():
        out = model(x, interpolate_pos_encoding=True, stopping_rule="static", stopping_params={"layer": 0})
        stock = ViTForImageClassification(stock_config()).eval()
        stock.load_state_dict(model.state_dict(), strict=False)
        ref = stock(x, interpolate_pos_encoding=True).logits
        ours = model(x, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    embed, layer, head, final = analytic_flops(size=24)
    expected = (embed + layer + head) / (embed + NUM_LAYERS * layer + final)
    torch.testing.assert_close(out.compute_fraction, torch.full((2,), expected, dtype=torch.float32))


# ----------------------------------------------------------------------------------------------------------------
# 5. save / load round trip through the Auto classes
# ----------------------------------------------------------------------------------------------------------------
def test_save_and_auto_load_round_trip(tmp_path):
    model = make_model()
    x = images()
    params = mixed_params(model, x, "confidence")
    model.set_stopping_rule("confidence", **params)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "depthstop_vit" and saved["exit_layers"] == [0, 1, 2, 3]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DepthStopViTConfig)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is DepthStopViTForImageClassification
    assert (loaded.config.stopping_rule, loaded.config.stopping_params) == ("confidence", params)
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert len(set(a.exit_layer.tolist())) > 1
    assert torch.equal(a.exit_layer, b.exit_layer)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.compute_fraction, b.compute_fraction, atol=0, rtol=0)
    # a plain AutoConfig/Auto model built from our config is ours too
    fresh = AutoModelForImageClassification.from_config(make_config(exit_layers=[1]))
    assert type(fresh) is DepthStopViTForImageClassification and len(fresh.exit_heads) == 1


def test_per_call_rule_override_leaves_config_unchanged():
    model = make_model()
    model.set_stopping_rule("patience", patience=1)
    with torch.no_grad():
        before = model(images())
        out = model(images(), stopping_rule="static", stopping_params={"layer": 0})
        after = model(images())
    assert out.exit_layer.tolist() == [0] * BATCH
    assert (model.config.stopping_rule, model.config.stopping_params) == ("patience", {"patience": 1})
    assert torch.equal(before.exit_layer, after.exit_layer)


# ----------------------------------------------------------------------------------------------------------------
# 6. Gradients
# ----------------------------------------------------------------------------------------------------------------
def backward(model, exit_gradient, spec=None):
    model.zero_grad(set_to_none=True)
    out = model(images(), labels=LABELS, exit_gradient=exit_gradient, depth_loss_spec=spec)
    out.loss.backward()
    return out


def grad_of(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


def backbone_parts(model):
    return {
        "embeddings": model.vit.embeddings,
        "layernorm": model.vit.layernorm,
        **{f"layer {i}": layer for i, layer in enumerate(model.vit.layers)},
    }


def test_gradients_reach_every_exit_head_and_the_backbone():
    model = make_model().train()
    backward(model, "full")
    for i, head in enumerate(model.exit_heads):
        for p in head.parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, i
    assert model.classifier.weight.grad.abs().sum() > 0
    for name, part in backbone_parts(model).items():
        params = list(part.parameters())
        assert all(p.grad is not None for p in params) and grad_of(part).abs().sum() > 0, name


def test_detach_mode_backbone_sees_only_the_final_exit_loss():
    """`detach`: the exits' losses train their heads only; the backbone, including the shared final layer norm,
    gets exactly the gradient of the final exit's loss."""
    model = make_model().train()
    backward(model, "detach")  # default spec: final_heavy exit CE + distill
    detached = {name: grad_of(part).clone() for name, part in backbone_parts(model).items()}
    head_grads = [h.classifier.weight.grad.clone() for h in model.exit_heads]
    backward(model, "full", DepthLossSpec(exit_weighting="final_only", depth_loss_weight=0.0))
    for name, part in backbone_parts(model).items():
        torch.testing.assert_close(detached[name], grad_of(part), atol=1e-6, rtol=1e-5, msg=name)
    assert all(g.abs().sum() > 0 for g in head_grads)  # the exit heads still train


def test_equilibrium_mode_same_forward_rescaled_gradients():
    model = make_model().train()
    spec = DepthLossSpec(exit_weighting="final_only", depth_loss_weight=0.0)
    full = backward(model, "full", spec)
    full_grads = [grad_of(layer).clone() for layer in model.vit.layers]
    eq = backward(model, "equilibrium", spec)
    for name in ("loss", "logits", "exit_logits", "exit_residual_ratios", "exit_state_norms"):
        assert torch.equal(getattr(full, name), getattr(eq, name)), name
    num_exits = len(model.config.exit_layers)
    for i, layer in enumerate(model.vit.layers):
        torch.testing.assert_close(grad_of(layer), full_grads[i] / (num_exits - i), atol=1e-7, rtol=1e-4)


def test_scaled_exit_gradient_interpolates_detach_and_full():
    spec = DepthLossSpec(exit_weighting="uniform", depth_terms=("distill",), depth_loss_weight=1.0)
    grads = {}
    for mode in ("detach", 0.0, "full", 1.0, "0.5"):
        model = make_model().train()
        backward(model, mode, spec)
        grads[mode] = torch.cat([grad_of(model.vit.layers[0]), grad_of(model.vit.layernorm)])
    torch.testing.assert_close(grads[0.0], grads["detach"])
    torch.testing.assert_close(grads[1.0], grads["full"])
    assert not torch.allclose(grads["0.5"], grads["full"]) and not torch.allclose(grads["0.5"], grads["detach"])
    with pytest.raises(ValueError, match="exit_gradient.*1.5"):
        make_model().train()(images(), labels=LABELS, exit_gradient=1.5)


# ----------------------------------------------------------------------------------------------------------------
# 7. Bad inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"exit_layers": [7]}, r"exit_layers.*\[0, 3\].*got 7"),
        ({"exit_layers": [-1, 3]}, r"exit_layers.*-1"),
        ({"exit_layers": [1, 1]}, r"exit_layers.*\[1, 1\]"),
        ({"image_size": 18}, r"image_size=18.*patch_size=4"),
        ({"image_size": [16, 18]}, r"image_size=\[16, 18\].*patch_size=4"),
        ({"patch_size": 5}, r"image_size=16.*patch_size=5"),
        ({"exit_head_hidden_size": -3}, r"exit_head_hidden_size.*-3"),
        ({"stopping_rule": "bogus"}, r"stopping_rule.*'bogus'"),
        ({"stopping_rule": "static", "stopping_params": {"layer": 4}}, r"static\(layer.*\[0, 3\].*got 4"),
        ({"stopping_rule": "confidence", "stopping_params": {"threshold": 1.5}}, r"confidence\(threshold.*1\.5"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(**overrides)


def test_wrong_channel_count_raises_before_any_work():
    model = make_model()  # num_channels=3
    seen, handles = row_counting_hooks([model.vit.embeddings])
    try:
        for kwargs in ({}, {"output_exit_logits": True}):
            with pytest.raises(ValueError, match=r"1 channels.*num_channels=3"):
                model(images(channels=1), **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert seen == [[]]


@pytest.mark.parametrize(
    ("pixel_values", "kwargs", "error", "match"),
    [
        (torch.zeros(2, 3, 18, 18), {"interpolate_pos_encoding": True}, ValueError, r"18x18.*patch_size=4"),
        (torch.zeros(2, 3, 16, 14), {"interpolate_pos_encoding": True}, ValueError, r"16x14.*patch_size=4"),
        (torch.zeros(2, 3, 20, 20), {}, ValueError, r"20x20.*image_size=16"),
        (torch.zeros(3, 16, 16), {}, ValueError, r"pixel_values must have shape.*\(3, 16, 16\)"),
        (None, {}, ValueError, r"pixel_values is required"),
        (np.zeros((2, 3, 16, 16), dtype=np.float32), {}, TypeError, r"pixel_values must be a torch.Tensor.*ndarray"),
    ],
)
def test_bad_pixel_values_raise(pixel_values, kwargs, error, match):
    with pytest.raises(error, match=match):
        make_model()(pixel_values, **kwargs)


def test_bad_stopping_rule_raises_and_keeps_config():
    model = make_model()
    model.set_stopping_rule("static", layer=2)
    for name, params, match in [
        ("static", {"layer": 4}, r"static\(layer.*\[0, 3\].*got 4"),
        ("asti", {"cost": 0.1}, r"'asti' needs calibration"),
        ("patience", {"patience": 0}, r"patience\(patience.*got 0"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.set_stopping_rule(name, **params)
        with pytest.raises(ValueError, match=match):
            model(images(), stopping_rule=name, stopping_params=params)
    assert (model.config.stopping_rule, model.config.stopping_params) == ("static", {"layer": 2})


def test_non_vit_checkpoint_raises(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"not a ViT checkpoint.*model_type='gpt2'"):
        DepthStopViTForImageClassification.from_pretrained(tmp_path)


def test_num_labels_mismatch_and_exit_layers_on_load(tmp_path):
    torch.manual_seed(0)
    ViTForImageClassification(stock_config()).save_pretrained(tmp_path / "stock")  # 3 labels
    with pytest.raises(ValueError, match=r"num_labels=2.*3 labels"):
        DepthStopViTForImageClassification.from_pretrained(tmp_path / "stock", num_labels=2)
    model = DepthStopViTForImageClassification.from_pretrained(
        tmp_path / "stock", num_labels=2, ignore_mismatched_sizes=True
    )
    assert model.classifier.out_features == 2 and all(h.classifier.out_features == 2 for h in model.exit_heads)
    with torch.no_grad():
        assert model.eval()(images()).logits.shape == (BATCH, 2)
    make_model().save_pretrained(tmp_path / "ours")
    with pytest.raises(ValueError, match=r"exit_layers=\[1, 3\].*checkpoint's exit_layers=\[0, 1, 2, 3\]"):
        DepthStopViTForImageClassification.from_pretrained(tmp_path / "ours", exit_layers=[1, 3])
    # a stock checkpoint has no exit heads yet: any exit layers are fine
    model = DepthStopViTForImageClassification.from_pretrained(tmp_path / "stock", exit_layers=[1])
    assert model.config.exit_layers == [1, 3] and len(model.exit_heads) == 1


def test_stock_vit_config_loads_into_ours(tmp_path):
    stock_config(image_size=[16, 8]).save_pretrained(tmp_path)
    config = DepthStopViTConfig.from_pretrained(tmp_path)
    assert config.model_type == "depthstop_vit" and config.exit_layers == [0, 1, 2, 3]
    assert config.exit_head_hidden_size == TINY["hidden_size"]
    model = DepthStopViTForImageClassification(config).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 8))
    assert out.logits.shape == (2, 3)


# ----------------------------------------------------------------------------------------------------------------
# 8. Pipeline, trainer, calibration
# ----------------------------------------------------------------------------------------------------------------
def test_image_classification_pipeline_follows_the_exits():
    from PIL import Image

    model = make_model(id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    processor = ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(6)]
    pixel_values = processor(pictures, return_tensors="pt")["pixel_values"]
    params = mixed_params(model, pixel_values, "confidence")
    model.set_stopping_rule("confidence", **params)
    with torch.no_grad():
        direct = model(pixel_values)
    assert len(set(direct.exit_layer.tolist())) > 1  # the pipeline output follows exits that differ per image
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    results = pipe(pictures, top_k=1)
    for result, logits in zip(results, direct.logits):
        probs = logits.softmax(-1)
        assert result[0]["label"] == model.config.id2label[int(probs.argmax())]
        assert result[0]["score"] == pytest.approx(float(probs.max()), abs=1e-5)


def image_collator(features):
    return {
        "pixel_values": torch.stack([torch.as_tensor(f["pixel_values"], dtype=torch.float32) for f in features]),
        "labels": torch.tensor([f["label"] for f in features]),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny single-channel early-exit ViT trained by `DepthStopTrainer` on `tiny_image_task` (seconds)."""
    torch.manual_seed(0)
    model = DepthStopViTForImageClassification(tiny_vit_config())  # 1 channel, as tiny_image_task
    args = DepthStopTrainingArguments(
        str(tmp_path_factory.mktemp("vit")),
        per_device_train_batch_size=32,
        max_steps=30,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        exit_weighting="uniform",
        logging_steps=10,
        exit_gradient="full",
    )
    trainer = DepthStopTrainer(
        model=model, args=args, train_dataset=tiny_image_task(256), data_collator=image_collator
    )
    trainer.train()
    return trainer


def test_trainer_trains_a_few_steps(trained):
    losses = [entry["loss"] for entry in trained.state.log_history if "loss" in entry]
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    assert all(f"exit_{k}_accuracy" in trained.state.log_history[0] for k in range(NUM_LAYERS))
    metrics = trained.evaluate(tiny_image_task(64, seed=1))
    assert metrics["eval_exit_3_accuracy"] > 0.6, metrics  # 3 classes: chance is 1/3


def test_calibrate_and_compare_rules_on_images(trained):
    """`calibrate` and `compare_rules` run on a `pixel_values` dataset, and the calibration's offline numbers are
    what the live forward then does on the same split."""
    from hf_depthstop import calibrate, compare_rules
    from hf_depthstop.evaluation import rules_from_calibration, run_rule

    model = copy.deepcopy(trained.model).eval()
    calib_set, test_set = tiny_image_task(96, seed=2), tiny_image_task(64, seed=3)
    report = calibrate(model, calib_set, target=0.05)
    assert len(model.config.calibration["temperatures"]) == NUM_LAYERS
    assert model.config.stopping_rule == "asti"
    full = run_rule(model, calib_set, "none", {})
    assert report.full_accuracy == pytest.approx(float((full["predictions"] == full["labels"]).mean()))
    assert full["compute_fraction"] == pytest.approx(np.ones(len(calib_set)))
    table = {row["rule"]: row for row in report.table}
    for rule in ("static", "confidence", "asti"):
        live = run_rule(model, calib_set, rule, report.settings[rule])
        assert float(live["compute_fraction"].mean()) == pytest.approx(table[rule]["compute_fraction"], rel=1e-5), rule
        assert float((live["predictions"] == live["labels"]).mean()) == pytest.approx(table[rule]["accuracy"]), rule
    rows = compare_rules(model, test_set, rules_from_calibration(model), repeats=1)
    by_rule = {row["rule"]: row for row in rows}
    assert by_rule["none"]["compute_fraction"] == pytest.approx(1.0)
    assert {"static", "confidence", "asti"} <= set(by_rule)
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["compute_fraction"] > 0 for row in rows)
