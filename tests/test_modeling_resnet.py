# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Tests of `DepthStopResNetForImageClassification` and its config, on tiny random ResNets (basic and bottleneck)."""

import copy
import json
import logging

import datasets
import numpy as np
import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassFieldValidationError
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    ConvNextImageProcessorPil,
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
)

from hf_depthstop import (
    DepthLossSpec,
    DepthStopResNetConfig,
    DepthStopResNetForImageClassification,
    DepthStopTrainer,
    DepthStopTrainingArguments,
    calibrate,
    compare_rules,
)
from hf_depthstop.flops import adaptive_avg_pool_flops, resnet_flops
from hf_depthstop.losses import depth_stop_loss
from hf_depthstop.stopping import build_rule, observe, simulate_exits


BASIC = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [2, 2], "layer_type": "basic", "num_labels": 3}
BOTTLENECK = {**BASIC, "hidden_sizes": [16, 32], "layer_type": "bottleneck"}
ARCHS = {"basic": BASIC, "bottleneck": BOTTLENECK}
NUM_BLOCKS = 4
BATCH = 8


def make_config(arch: str = "basic", **overrides) -> DepthStopResNetConfig:
    return DepthStopResNetConfig(**{**ARCHS[arch], **overrides})


def make_model(arch: str = "basic", seed: int = 0, **overrides) -> DepthStopResNetForImageClassification:
    torch.manual_seed(seed)
    return DepthStopResNetForImageClassification(make_config(arch, **overrides)).eval()


def images(n: int = BATCH, size: int | tuple[int, int] = 32, channels: int = 3, seed: int = 0) -> torch.Tensor:
    height, width = (size, size) if isinstance(size, int) else size
    return torch.randn(n, channels, height, width, generator=torch.Generator().manual_seed(seed))


def stock_model(arch: str, model: DepthStopResNetForImageClassification) -> ResNetForImageClassification:
    """A stock `ResNetForImageClassification` with `model`'s backbone and final classifier weights."""
    stock = ResNetForImageClassification(ResNetConfig(**ARCHS[arch])).eval()
    result = stock.load_state_dict(model.state_dict(), strict=False)
    assert list(result.missing_keys) == []
    assert result.unexpected_keys and all(k.startswith("exit_heads.") for k in result.unexpected_keys)
    return stock


def split_threshold(values: torch.Tensor) -> float:
    """A threshold in the widest gap between sorted values that leaves >= 2 rows on each side (no near-ties)."""
    v = values.detach().double().sort().values
    gaps = v[2:-1] - v[1:-2]
    i = int(gaps.argmax()) + 1
    return float((v[i] + v[i + 1]) / 2)


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


def full_observations(model, full) -> list:
    """The observation at every exit from the all-exits outputs, built as the calibration builds them."""
    temperatures = model._exit_temperatures()
    observations, previous = [], None
    num_exits = full.exit_logits.shape[1]
    for k in range(num_exits):
        if k + 1 < num_exits:
            next_compute = full.exit_compute_fractions[:, k + 1] - full.exit_compute_fractions[:, k]
        else:
            next_compute = torch.zeros(full.exit_logits.shape[0])
        previous = observe(
            k,
            model.config.exit_layers[k],
            full.exit_logits[:, k],
            temperatures[k],
            previous,
            full.exit_residual_ratios[:, k],
            full.exit_state_norms[:, k],
            next_compute,
        )
        observations.append(previous)
    return observations


@torch.no_grad()
def mixed_params(model, pixel_values, rule: str) -> dict:
    """Rule parameters that make some images stop at the first exit and others go on."""
    full = model(pixel_values, output_exit_logits=True)
    first = full_observations(model, full)[0]
    if rule == "confidence":
        return {"threshold": split_threshold(first.max_prob)}
    if rule == "entropy":
        return {"threshold": split_threshold(first.entropy)}
    if rule == "asti_bound":
        # stop at exit 0 iff K_0 * ||pooled_0|| * r_0 * rho_0 (= 1) <= cost * (compute of exit 1), K_0 = ||W_head1||_2
        k0 = model.exit_heads[1].lipschitz()
        return {"cost": split_threshold(k0 * first.state_norm * first.residual_ratio / first.next_compute)}
    if rule == "asti":
        estimator = build_rule("asti", {"cost": 0.5}, model.config.calibration)
        return {"cost": split_threshold(1.0 - estimator.probability_same(first))}
    if rule == "patience":
        return {"patience": 1}
    if rule == "static":
        return {"layer": 1}
    raise AssertionError(rule)


def row_counting_hooks(modules):
    """Forward pre-hooks recording the batch size each module receives."""
    seen = [[] for _ in modules]
    handles = [
        m.register_forward_pre_hook(lambda module, args, i=i: seen[i].append(args[0].shape[0]))
        for i, m in enumerate(modules)
    ]
    return seen, handles


# ----------------------------------------------------------------------------------------------------------------
# 1. Config
# ----------------------------------------------------------------------------------------------------------------
def test_config_defaults_and_num_hidden_layers_is_derived_not_saved(tmp_path):
    config = make_config()
    assert config.model_type == "depthstop_resnet"
    assert config.num_hidden_layers == NUM_BLOCKS and config.exit_layers == [0, 1, 2, 3]
    assert config.exit_mode == "block" and config.exit_pool_size == 4
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "num_hidden_layers" not in saved and saved["exit_layers"] == [0, 1, 2, 3]
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is DepthStopResNetConfig and loaded.num_hidden_layers == NUM_BLOCKS
    # a config dict that carries a consistent num_hidden_layers (written by another tool) still loads
    saved["num_hidden_layers"] = NUM_BLOCKS
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert DepthStopResNetConfig.from_pretrained(tmp_path).num_hidden_layers == NUM_BLOCKS
    assert make_config(depths=[1, 3]).num_hidden_layers == 4


def test_exit_mode_stage_uses_stage_ends():
    config = make_config(depths=[2, 3], exit_mode="stage")
    assert config.stage_ends == [1, 4] and config.exit_layers == [1, 4]
    model = DepthStopResNetForImageClassification(config)
    assert len(model.exit_heads) == 1
    assert model.exit_heads[0].classifier.in_features == 8 * 4 * 4  # stage 0 has 8 channels, pooled 4 x 4
    assert make_config(exit_mode="stage", exit_layers=[1]).exit_layers == [1, 3]


def test_exit_layers_sorted_final_added_and_empty_means_final_only():
    assert make_config(exit_layers=[2, 0]).exit_layers == [0, 2, 3]
    assert make_config(exit_layers=[]).exit_layers == [NUM_BLOCKS - 1]


# ----------------------------------------------------------------------------------------------------------------
# 2. Output shapes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_inference_output_shapes_and_dtypes(arch):
    model = make_model(arch)
    x = images()
    with torch.no_grad():
        out = model(x)
        with_loss = model(x, labels=torch.zeros(BATCH, dtype=torch.long))
        tup = model(x, return_dict=False)
    assert out.logits.shape == (BATCH, 3)
    assert out.exit_layer.shape == (BATCH,) and out.exit_layer.dtype == torch.long
    assert out.compute_fraction.shape == (BATCH,) and out.compute_fraction.dtype == torch.float32
    assert out.loss is None and out.exit_logits is None  # the inference path returns no per-exit tensors
    assert with_loss.loss.shape == () and torch.isfinite(with_loss.loss)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits)


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
@pytest.mark.parametrize("mode", ["train", "output_exit_logits"])
def test_training_path_output_shapes(arch, mode):
    model = make_model(arch, exit_layers=[0, 2])  # exits after blocks 0, 2 and (appended) 3
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    if mode == "train":
        out = model.train()(images(), labels=labels)
    else:
        with torch.no_grad():
            out = model(images(), labels=labels, output_exit_logits=True)
    assert out.exit_logits.shape == (BATCH, 3, 3)
    for name in ("exit_compute_fractions", "exit_residual_ratios", "exit_state_norms"):
        assert getattr(out, name).shape == (BATCH, 3), name
    assert out.loss.shape == () and torch.isfinite(out.loss)
    torch.testing.assert_close(out.logits, out.exit_logits[:, -1])
    assert out.exit_layer.tolist() == [NUM_BLOCKS - 1] * BATCH
    torch.testing.assert_close(out.compute_fraction, out.exit_compute_fractions[:, -1])
    assert bool((out.exit_compute_fractions.diff(dim=1) > 0).all())
    assert bool((out.exit_residual_ratios > 0).all())


# ----------------------------------------------------------------------------------------------------------------
# 3. Rule `none` is the stock model; the residual ratio is the stock block's two branches
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_rule_none_equals_stock_resnet_for_image_classification(arch):
    model = make_model(arch)
    stock = stock_model(arch, model)
    x = images()
    with torch.no_grad():
        ours = model(x)
        ref = stock(x).logits
        all_exits = model(x, output_exit_logits=True)  # the training path's final exit is the stock model too
    torch.testing.assert_close(ours.logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(all_exits.logits, ref, atol=1e-5, rtol=0)
    assert ours.exit_layer.tolist() == [NUM_BLOCKS - 1] * BATCH
    torch.testing.assert_close(ours.compute_fraction, torch.ones(BATCH))


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_residual_ratios_are_the_stock_blocks_branch_norms(arch):
    """r_l = ||F(h)|| / ||s(h)|| with F and s captured by hooks inside the *stock* block forward."""
    model = make_model(arch)
    captured = {}
    blocks = model._blocks()
    handles = []
    for i, block in enumerate(blocks):
        # clone: the stock block adds the shortcut into the residual branch's output in place
        handles.append(
            block.layer.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(("F", i), o.clone()))
        )
        handles.append(
            block.shortcut.register_forward_hook(lambda m, a, o, i=i: captured.__setitem__(("s", i), o.clone()))
        )
    x = images()
    try:
        with torch.no_grad():
            model.resnet(x)  # the stock ResNetModel forward
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out = model(x, output_exit_logits=True)
    expected = torch.stack(
        [captured[("F", i)].flatten(1).norm(dim=1) / captured[("s", i)].flatten(1).norm(dim=1) for i in range(4)],
        dim=1,
    )
    torch.testing.assert_close(out.exit_residual_ratios, expected, atol=1e-5, rtol=1e-5)
    # blocks 0 (basic) / 2 have projection shortcuts only where the shape changes
    assert isinstance(blocks[1].shortcut, torch.nn.Identity) and not isinstance(blocks[2].shortcut, torch.nn.Identity)


# ----------------------------------------------------------------------------------------------------------------
# 4. Loading: stock checkpoints, save / load, Auto classes
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_stock_checkpoint_loads_completely_with_new_exit_heads_warning(arch, tmp_path, caplog):
    torch.manual_seed(0)
    stock = ResNetForImageClassification(ResNetConfig(**ARCHS[arch])).eval()
    stock.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = DepthStopResNetForImageClassification.from_pretrained(tmp_path).eval()
    assert model.config.model_type == "depthstop_resnet" and model.config.exit_layers == [0, 1, 2, 3]
    torch.testing.assert_close(model.classifier[1].weight, stock.classifier[1].weight, atol=0, rtol=0)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, stock(x).logits, atol=1e-5, rtol=0)
    warnings = [r.getMessage() for r in caplog.records if "exit heads are new" in r.getMessage()]
    assert len(warnings) == 1 and all(f"exit_heads.{i}" in warnings[0] for i in range(3))
    assert "classifier" not in warnings[0]


def test_backbone_checkpoint_loads_and_stage_mode_on_load(tmp_path, caplog):
    torch.manual_seed(0)
    backbone = ResNetModel(ResNetConfig(**BASIC)).eval()
    backbone.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = DepthStopResNetForImageClassification.from_pretrained(tmp_path, exit_mode="stage").eval()
    assert model.config.exit_layers == [1, 3] and len(model.exit_heads) == 1  # stage ends, chosen at load time
    weight = "encoder.stages.1.layers.1.layer.0.convolution.weight"
    torch.testing.assert_close(model.resnet.get_parameter(weight), backbone.get_parameter(weight), atol=0, rtol=0)
    warning = next(r.getMessage() for r in caplog.records if "exit heads are new" in r.getMessage())
    assert "classifier" in warning and "exit_heads.0" in warning


def test_num_labels_mismatch_with_stock_classifier(tmp_path):
    torch.manual_seed(0)
    ResNetForImageClassification(ResNetConfig(**BASIC)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_labels=5 .*3 labels.*ignore_mismatched_sizes"):
        DepthStopResNetForImageClassification.from_pretrained(tmp_path, num_labels=5)
    model = DepthStopResNetForImageClassification.from_pretrained(tmp_path, num_labels=5, ignore_mismatched_sizes=True)
    assert model.classifier[1].out_features == 5 and all(h.classifier.out_features == 5 for h in model.exit_heads)


def test_non_resnet_checkpoint_raises(tmp_path):
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='gpt2'"):
        DepthStopResNetForImageClassification.from_pretrained(tmp_path)


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_save_and_auto_load_round_trip(arch, tmp_path):
    model = make_model(arch, exit_pool_size=2)
    x = images()
    params = mixed_params(model, x, "confidence")
    model.set_stopping_rule("confidence", **params)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert type(loaded) is DepthStopResNetForImageClassification
    assert (loaded.config.stopping_rule, loaded.config.stopping_params) == ("confidence", params)
    assert loaded.config.exit_layers == model.config.exit_layers and loaded.config.exit_pool_size == 2
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert len(set(a.exit_layer.tolist())) > 1
    assert torch.equal(a.exit_layer, b.exit_layer)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    torch.testing.assert_close(a.compute_fraction, b.compute_fraction, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"exit_layers=\[1\] differs"):
        DepthStopResNetForImageClassification.from_pretrained(tmp_path, exit_layers=[1])


# ----------------------------------------------------------------------------------------------------------------
# 5. An image's result does not depend on its batch; rows really leave the batch
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience", "static", "asti_bound", "asti", "none"])
def test_batched_equals_one_by_one(arch, rule):
    model = make_model(arch, calibration=synthetic_calibration())
    x = images()
    params = mixed_params(model, x, rule) if rule != "none" else {}
    with torch.no_grad():
        batched = model(x, stopping_rule=rule, stopping_params=params)
        singles = [model(x[i : i + 1], stopping_rule=rule, stopping_params=params) for i in range(BATCH)]
    layers = batched.exit_layer.tolist()
    if rule in ("static", "none"):
        assert layers == [1 if rule == "static" else NUM_BLOCKS - 1] * BATCH
    else:  # mixed: some images stop early, some go on
        assert len(set(layers)) > 1, layers
        # patience(1) needs two agreeing exits, so its earliest stop is the second exit
        assert min(layers) >= 1 if rule == "patience" else min(layers) == 0, layers
    assert layers == [int(s.exit_layer) for s in singles]
    torch.testing.assert_close(batched.logits, torch.cat([s.logits for s in singles]), atol=1e-5, rtol=0)
    torch.testing.assert_close(batched.compute_fraction, torch.cat([s.compute_fraction for s in singles]))


@pytest.mark.parametrize("rule", ["confidence", "entropy", "patience", "asti_bound", "asti"])
def test_live_forward_matches_offline_simulation(rule):
    """The live batched forward stops every image where `simulate_exits` (used by calibration) says it would."""
    model = make_model(calibration=synthetic_calibration())
    x = images()
    with torch.no_grad():
        full = model(x, output_exit_logits=True)
        params = mixed_params(model, x, rule)
        live = model(x, stopping_rule=rule, stopping_params=params)
    lipschitz = model._exit_lipschitz() if rule == "asti_bound" else None
    rule_object = build_rule(rule, params, model.config.calibration, lipschitz)
    simulated = simulate_exits(rule_object, full_observations(model, full))
    assert len(set(live.exit_layer.tolist())) > 1
    assert live.exit_layer.tolist() == [model.config.exit_layers[k] for k in simulated.tolist()]
    torch.testing.assert_close(live.logits, full.exit_logits[torch.arange(BATCH), simulated], atol=1e-5, rtol=0)
    torch.testing.assert_close(live.compute_fraction, full.exit_compute_fractions[torch.arange(BATCH), simulated])


def test_stopped_rows_leave_the_batch():
    model = make_model()
    x = images()
    params = mixed_params(model, x, "confidence")
    blocks = model._blocks()
    seen, handles = row_counting_hooks([b.layer for b in blocks])
    try:
        with torch.no_grad():
            out = model(x, stopping_rule="confidence", stopping_params=params)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i in range(NUM_BLOCKS):
        running = int((out.exit_layer >= i).sum())  # images that reach block i
        assert seen[i] == ([running] if running else []), (i, seen)
        rows.append(running)
    assert rows[0] == BATCH and rows[1] < rows[0]


def test_static_and_none_skip_blocks_and_heads():
    model = make_model()
    x = images()
    block_seen, block_handles = row_counting_hooks([b.layer for b in model._blocks()])
    head_seen, head_handles = row_counting_hooks([*model.exit_heads, model.classifier])
    try:
        with torch.no_grad():
            out = model(x, stopping_rule="static", stopping_params={"layer": 1})
        assert out.exit_layer.tolist() == [1] * BATCH
        assert [len(s) for s in block_seen] == [1, 1, 0, 0]  # blocks 2-3 never run
        assert [len(s) for s in head_seen] == [0, 1, 0, 0]  # only the head of the exit used
        for s in (*block_seen, *head_seen):
            s.clear()
        with torch.no_grad():
            out = model(x, stopping_rule="none")
        assert [len(s) for s in block_seen] == [1] * NUM_BLOCKS
        assert [len(s) for s in head_seen] == [0, 0, 0, 1]  # intermediate exit heads never run
    finally:
        for h in (*block_handles, *head_handles):
            h.remove()


# ----------------------------------------------------------------------------------------------------------------
# 6. FLOPs and compute_fraction
# ----------------------------------------------------------------------------------------------------------------
# Hand computation, basic tiny config, 3 x 32 x 32 images (conv k x k: 2 k^2 C_in C_out H_out W_out):
STEM = 2 * 49 * 3 * 8 * 16 * 16  # 7x7 stride 2: 3 -> 8 channels at 16 x 16 (then max pool to 8 x 8, not counted)
BLOCK_0 = 2 * (2 * 9 * 8 * 8 * 8 * 8)  # two 3x3 convs 8 -> 8 at 8 x 8, identity shortcut
BLOCK_2 = 2 * 9 * 8 * 16 * 4 * 4 + 2 * 9 * 16 * 16 * 4 * 4 + 2 * 8 * 16 * 4 * 4  # stride 2 + 1x1 projection
BLOCK_3 = 2 * (2 * 9 * 16 * 16 * 4 * 4)
HEAD_STAGE0 = 8 * 8 * 8 + 2 * (8 * 4 * 4) * 3  # 4x4 average pool (one add per input) + linear 128 -> 3
HEAD_STAGE1 = 16 * 4 * 4 + 2 * (16 * 4 * 4) * 3
FINAL_HEAD = 16 * 4 * 4 + 2 * 16 * 3  # global pool + linear 16 -> 3
FULL = STEM + 2 * BLOCK_0 + BLOCK_2 + BLOCK_3 + FINAL_HEAD


def test_resnet_flops_match_a_hand_computation():
    stem, blocks, shapes = resnet_flops(32, 32, 3, 8, [8, 16], [2, 2], "basic")
    assert stem == STEM and blocks == [BLOCK_0, BLOCK_0, BLOCK_2, BLOCK_3]
    assert shapes == [(8, 8, 8), (8, 8, 8), (16, 4, 4), (16, 4, 4)]
    assert BLOCK_2 != BLOCK_0  # blocks differ in cost across stages


def test_compute_fractions_match_the_hand_computation():
    model = make_model()
    x = images()
    single_expected = [
        STEM + BLOCK_0 + HEAD_STAGE0,
        STEM + 2 * BLOCK_0 + HEAD_STAGE0,
        STEM + 2 * BLOCK_0 + BLOCK_2 + HEAD_STAGE1,
        FULL,
    ]
    all_expected = [
        single_expected[0],
        single_expected[1] + HEAD_STAGE0,
        single_expected[2] + 2 * HEAD_STAGE0,
        FULL + 2 * HEAD_STAGE0 + HEAD_STAGE1,
    ]
    all_heads, single = model._exit_fractions({"pixel_values": x})
    torch.testing.assert_close(single, torch.tensor([single_expected] * BATCH) / FULL)
    torch.testing.assert_close(all_heads, torch.tensor([all_expected] * BATCH) / FULL)
    torch.testing.assert_close(model.exit_compute_fractions(x), all_heads)
    for layer in range(NUM_BLOCKS):  # static pays only the head it stops at
        with torch.no_grad():
            out = model(x, stopping_rule="static", stopping_params={"layer": layer})
        torch.testing.assert_close(out.compute_fraction, torch.full((BATCH,), single_expected[layer] / FULL))


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
@pytest.mark.parametrize("size", [32, (29, 17), (5, 3)])
@pytest.mark.parametrize("flags", [{}, {"downsample_in_first_stage": True, "downsample_in_bottleneck": True}])
def test_backbone_flops_equal_torch_flop_counter(arch, size, flags):
    """The analytic count (stem + blocks) equals what torch's FlopCounterMode counts in the stock forward."""
    config = ResNetConfig(**{**ARCHS[arch], **flags})
    backbone = ResNetModel(config).eval()
    x = images(1, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(x)
    stem, blocks, shapes = resnet_flops(
        x.shape[2], x.shape[3], 3, 8, config.hidden_sizes, config.depths, arch, **flags
    )
    assert stem + sum(blocks) == counter.get_total_flops()
    with torch.no_grad():
        assert shapes[-1] == tuple(backbone(x).last_hidden_state.shape[1:])


def test_adaptive_pool_flops_count_overlapping_windows():
    assert adaptive_avg_pool_flops(2, 8, 8, 4) == 2 * 64  # each input read once
    assert adaptive_avg_pool_flops(1, 1, 1, 4) == 16  # a 1 x 1 map replicated into 16 cells
    assert adaptive_avg_pool_flops(1, 5, 5, 4) == (2 + 2 + 2 + 2) ** 2  # windows [0,2) [1,3) [2,4) [3,5)


def test_compute_fraction_of_mixed_rule_follows_its_exits():
    model = make_model()
    x = images()
    params = mixed_params(model, x, "confidence")
    with torch.no_grad():
        out = model(x, stopping_rule="confidence", stopping_params=params)
    all_heads, _ = model._exit_fractions({"pixel_values": x})
    torch.testing.assert_close(out.compute_fraction, all_heads[torch.arange(BATCH), out.exit_layer])
    assert bool((out.compute_fraction[out.exit_layer < 3] < 1).all())


# ----------------------------------------------------------------------------------------------------------------
# 7. Pool size and image size
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pool", [1, 2, 4])
@pytest.mark.parametrize("size", [8, 32, (45, 23)])
def test_any_pool_size_and_image_size(pool, size):
    model = make_model(exit_pool_size=pool)
    assert model.exit_heads[0].classifier.in_features == 8 * pool * pool
    x = images(3, size)
    with torch.no_grad():
        full = model(x, output_exit_logits=True)
        out = model(x, stopping_rule="static", stopping_params={"layer": 0})
    assert full.exit_logits.shape == (3, 4, 3) and torch.isfinite(full.exit_logits).all()
    torch.testing.assert_close(out.logits, full.exit_logits[:, 0], atol=1e-5, rtol=0)
    if pool == 1:  # global average pooling: the head reads the channel means
        features = model.resnet.encoder.stages[0].layers[0](model.resnet.embedder(x))
        expected = model.exit_heads[0].classifier(features.mean((2, 3)))
        torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# 8. Gradients
# ----------------------------------------------------------------------------------------------------------------
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def backward(model, exit_gradient, spec=None):
    model.zero_grad(set_to_none=True)
    out = model(images(), labels=LABELS, exit_gradient=exit_gradient, depth_loss_spec=spec)
    out.loss.backward()
    return out


def grad_of(module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("arch", ["basic", "bottleneck"])
def test_gradients_reach_every_exit_head_and_every_block(arch):
    model = make_model(arch).train()
    backward(model, "full", DepthLossSpec(depth_terms=("distill", "dr")))
    for i, head in enumerate(model.exit_heads):
        assert head.classifier.weight.grad is not None and head.classifier.weight.grad.abs().sum() > 0, i
    assert model.classifier[1].weight.grad.abs().sum() > 0
    assert model.resnet.embedder.embedder.convolution.weight.grad.abs().sum() > 0
    for i, block in enumerate(model._blocks()):
        assert all(p.grad is not None for p in block.parameters()) and grad_of(block).abs().sum() > 0, i


def test_detach_mode_backbone_sees_only_the_final_exit_loss():
    model = make_model().train()
    backward(model, "detach", DepthLossSpec(depth_terms=("distill", "dr")))
    detached = [grad_of(block).clone() for block in model._blocks()]
    head_grads = [h.classifier.weight.grad.clone() for h in model.exit_heads]
    # dr of the final exit only reaches the backbone; the non-final r_l are detached
    spec = DepthLossSpec(exit_weighting="final_only", depth_terms=("dr",))
    full = make_model().train()
    full.zero_grad(set_to_none=True)
    out = full(images(), labels=LABELS, exit_gradient="full", output_exit_logits=True)
    ratios = torch.cat([out.exit_residual_ratios[:, :-1].detach(), out.exit_residual_ratios[:, -1:]], dim=1)
    loss, _ = depth_stop_loss(out.exit_logits, LABELS, spec, out.exit_compute_fractions, ratios, [0, 1, 2, 3], 4)
    loss.backward()
    for i, block in enumerate(full._blocks()):
        torch.testing.assert_close(detached[i], grad_of(block), atol=1e-6, rtol=1e-5, msg=f"block {i}")
    assert all(g.abs().sum() > 0 for g in head_grads)  # the exit heads still train


def test_equilibrium_and_alpha_modes():
    model = make_model().train()
    spec = DepthLossSpec(exit_weighting="final_only", depth_loss_weight=0.0)
    full = backward(model, "full", spec)
    full_grads = [grad_of(block).clone() for block in model._blocks()]
    eq = backward(model, "equilibrium", spec)
    for name in ("loss", "logits", "exit_logits", "exit_residual_ratios", "exit_state_norms"):
        assert torch.equal(getattr(full, name), getattr(eq, name)), name
    # the final exit's loss reaches block i scaled by 1 / (number of exits from block i on)
    for i, block in enumerate(model._blocks()):
        torch.testing.assert_close(grad_of(block), full_grads[i] / (NUM_BLOCKS - i), atol=1e-7, rtol=1e-4)
    # alpha = 1 is `full`, alpha = 0 is `detach`, with the default loss
    for alpha, mode in ((1.0, "full"), (0.0, "detach")):
        backward(model, mode)
        reference = [grad_of(block).clone() for block in model._blocks()]
        backward(model, alpha)
        for i, block in enumerate(model._blocks()):
            torch.testing.assert_close(grad_of(block), reference[i], atol=1e-6, rtol=1e-5, msg=f"{alpha} {i}")


# ----------------------------------------------------------------------------------------------------------------
# 9. Bad inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"exit_layers": [4]}, r"exit_layers.*\[0, 3\].*got 4"),
        ({"exit_layers": [-1, 3]}, r"exit_layers.*-1"),
        ({"exit_layers": [1, 1]}, r"exit_layers.*\[1, 1\]"),
        ({"exit_mode": "layer"}, r"exit_mode.*'layer'"),
        ({"exit_mode": "stage", "exit_layers": [0]}, r"exit_mode='stage'.*\[1, 3\].*got 0"),
        ({"exit_pool_size": 0}, r"exit_pool_size.*got exit_pool_size=0"),
        ({"depths": [2, 0]}, r"depths.*\[2, 0\]"),
        ({"depths": [2, 2, 2]}, r"hidden_sizes and depths"),
        ({"num_hidden_layers": 7}, r"num_hidden_layers.*sum\(depths\)=4.*7"),
        ({"num_labels": 0}, r"num_labels.*0"),
        ({"stopping_rule": "bogus"}, r"stopping_rule.*'bogus'"),
        ({"stopping_rule": "static", "stopping_params": {"layer": 4}}, r"static\(layer.*\[0, 3\].*got 4"),
    ],
)
def test_bad_config_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config(**overrides)


@pytest.mark.parametrize("value", [True, "4", 2.0])
def test_exit_pool_size_of_the_wrong_type_is_rejected_by_the_strict_config(value):
    with pytest.raises(StrictDataclassFieldValidationError, match=r"exit_pool_size.*expected int"):
        make_config(exit_pool_size=value)


def test_bad_config_set_after_construction_raises_when_the_model_is_built():
    config = make_config()
    config.exit_pool_size = 0
    with pytest.raises(ValueError, match=r"exit_pool_size.*0"):
        DepthStopResNetForImageClassification(config)


@pytest.mark.parametrize(
    ("pixel_values", "error", "match"),
    [
        (None, ValueError, r"pixel_values is required"),
        (torch.randn(2, 1, 32, 32), ValueError, r"1 channels.*num_channels=3"),
        (torch.randn(3, 32, 32), ValueError, r"\(batch_size, num_channels, height, width\), got \(3, 32, 32\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.long), TypeError, r"floating-point.*torch.int64"),
        (torch.randn(0, 3, 32, 32), ValueError, r"empty.*\(0, 3, 32, 32\)"),
    ],
)
def test_bad_pixel_values_raise(pixel_values, error, match):
    model = make_model()
    with pytest.raises(error, match=match):
        model(pixel_values)
    with pytest.raises(error, match=match):
        model.train()(pixel_values)


def test_bad_stopping_rule_raises_and_keeps_config():
    model = make_model()
    model.set_stopping_rule("static", layer=2)
    with pytest.raises(ValueError, match=r"static\(layer.*\[0, 3\].*got 9"):
        model.set_stopping_rule("static", layer=9)
    with pytest.raises(ValueError, match=r"static\(layer.*got 9"):
        model(images(), stopping_rule="static", stopping_params={"layer": 9})
    assert (model.config.stopping_rule, model.config.stopping_params) == ("static", {"layer": 2})


def test_one_channel_images():
    model = make_model(num_channels=1)
    with torch.no_grad():
        out = model(images(channels=1), output_exit_logits=True)
    assert out.exit_logits.shape == (BATCH, 4, 3)
    with pytest.raises(ValueError, match=r"3 channels.*num_channels=1"):
        model(images())


# ----------------------------------------------------------------------------------------------------------------
# 10. Trainer, calibration, pipeline on a tiny learnable image task
# ----------------------------------------------------------------------------------------------------------------
def tiny_image_task(n: int, seed: int = 0, size: int = 16) -> datasets.Dataset:
    """Noise images with a bright square in one of three places (top-left, top-right, bottom); the label is the
    place. The square's brightness varies, so some images are easy (decided early) and some hard."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    labels = torch.randint(0, 3, (n,), generator=g)
    brightness = torch.rand(n, generator=g) * 2.0 + 0.3
    half = size // 2
    for i, (label, b) in enumerate(zip(labels.tolist(), brightness.tolist())):
        rows = slice(0, half) if label < 2 else slice(half, size)
        cols = (
            slice(0, half) if label == 0 else slice(half, size) if label == 1 else slice(half // 2, half // 2 + half)
        )
        x[i, :, rows, cols] += b
    return datasets.Dataset.from_dict({"pixel_values": x.numpy(), "label": labels.tolist()}).with_format("torch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = DepthStopResNetForImageClassification(make_config())
    args = DepthStopTrainingArguments(
        str(tmp_path_factory.mktemp("resnet")),
        per_device_train_batch_size=32,
        max_steps=20,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        exit_weighting="uniform",
        logging_steps=5,
    )
    trainer = DepthStopTrainer(model=model, args=args, train_dataset=tiny_image_task(320))
    trainer.train()
    return trainer


def test_trainer_trains_every_exit(trained):
    losses = [entry["loss"] for entry in trained.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    logged = next(entry for entry in trained.state.log_history if "exit_0_accuracy" in entry)
    assert {f"exit_{k}_accuracy" for k in range(4)} <= set(logged)
    model = trained.model.eval()
    test = tiny_image_task(200, seed=2)[:]
    with torch.no_grad():
        out = model(test["pixel_values"], output_exit_logits=True)
    accuracy = (out.exit_logits.argmax(-1) == test["label"][:, None]).float().mean(0)
    assert bool((accuracy > 0.5).all()), accuracy  # chance is 1/3


def test_calibrate_and_compare_rules(trained):
    model = copy.deepcopy(trained.model).eval()
    calib, test = tiny_image_task(256, seed=1), tiny_image_task(128, seed=2)
    report = calibrate(model, calib, target=0.02)
    settings = model.config.calibration["settings"]
    assert set(settings) == {"static", "entropy", "confidence", "patience", "asti_bound", "asti"}
    assert model.config.stopping_rule == "asti"
    static_row = next(row for row in report.table if row["rule"] == "static")
    layer = settings["static"]["layer"]
    with torch.no_grad():
        fraction = model._exit_fractions({"pixel_values": calib["pixel_values"][:1]})[1][0, layer]
    assert static_row["compute_fraction"] == pytest.approx(float(fraction), abs=1e-6)
    rows = compare_rules(model, test, {"none": {}, **settings}, batch_size=128, repeats=1)
    by_rule = {row["rule"]: row for row in rows}
    assert by_rule["none"]["compute_fraction"] == pytest.approx(1.0)
    assert by_rule["none"]["mean_exit_layer"] == NUM_BLOCKS - 1
    assert all(0 < row["compute_fraction"] <= 1.0 + 1e-6 for row in rows)
    assert any(row["compute_fraction"] < 0.99 for row in rows)  # some rule exits early on this easy task


def test_image_classification_pipeline_follows_the_exits():
    model = make_model()
    processor = ConvNextImageProcessorPil(
        size={"shortest_edge": 32}, crop_pct=1.0, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")) for _ in range(BATCH)]
    pixel_values = processor(pictures, return_tensors="pt")["pixel_values"]
    params = mixed_params(model, pixel_values, "confidence")
    model.set_stopping_rule("confidence", **params)
    with torch.no_grad():
        out = model(pixel_values)
    assert len(set(out.exit_layer.tolist())) > 1
    pipe = transformers.pipeline("image-classification", model=model, image_processor=processor, device="cpu")
    results = pipe(pictures, top_k=1)
    for result, logits in zip(results, out.logits):
        assert result[0]["label"] == model.config.id2label[int(logits.argmax())]
        assert result[0]["score"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)
