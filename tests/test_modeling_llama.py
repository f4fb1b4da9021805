# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Tests of `DepthStopLlamaForCausalLM` and its config (forward, training loss, loading). Generation: test_generation.py."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from hf_depthstop import DepthLossSpec, DepthStopLlamaConfig, DepthStopLlamaForCausalLM


TINY = dict(
    hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
    vocab_size=97, pad_token_id=0,
)


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return DepthStopLlamaForCausalLM(DepthStopLlamaConfig(**{**TINY, **overrides})).eval()


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 97, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def test_config_exit_layers_and_validation():
    assert DepthStopLlamaConfig(**TINY).exit_layers == [0, 1, 2, 3]
    assert DepthStopLlamaConfig(**TINY, exit_layers=[2, 0]).exit_layers == [0, 2, 3]
    with pytest.raises(ValueError, match=r"exit_layers entries .* got 4"):
        DepthStopLlamaConfig(**TINY, exit_layers=[4])
    with pytest.raises(ValueError, match="duplicates"):
        DepthStopLlamaConfig(**TINY, exit_layers=[1, 1])
    with pytest.raises(ValueError, match="stopping_rule must be one of"):
        DepthStopLlamaConfig(**TINY, stopping_rule="sometimes")


def test_full_depth_forward_equals_stock_llama():
    model = make()
    stock = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    stock.load_state_dict(model.state_dict())
    ids, mask, labels = batch()
    with torch.no_grad():
        ours, ref = model(ids, attention_mask=mask, labels=labels), stock(ids, attention_mask=mask, labels=labels)
    assert (ours.logits - ref.logits).abs().max() <= 1e-5
    assert abs(ours.loss - ref.loss) <= 1e-5


def test_training_loss_is_computed_exit_by_exit():
    model = make(exit_layers=[1, 3])
    ids, mask, labels = batch()
    spec = DepthLossSpec(exit_weighting="uniform", depth_terms=("distill",), depth_loss_weight=0.5)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=labels, output_exit_logits=True, depth_loss_spec=spec)
        exit_logits = model(ids, attention_mask=mask, output_exit_logits=True).exit_logits  # (B, T, E, V)
    shifted, valid = labels[:, 1:], labels[:, 1:] != -100
    logits = exit_logits[:, :-1][valid]  # (n, E, V)
    ce = torch.stack([torch.nn.functional.cross_entropy(logits[:, k], shifted[valid]) for k in range(2)])
    teacher = logits[:, 1].log_softmax(-1)
    kl = (teacher.exp() * (teacher - logits[:, 0].log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(out.exit_losses, ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.depth_loss, kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, ce.mean() + 0.5 * kl, atol=1e-5, rtol=1e-5)
    acc = (logits.argmax(-1) == shifted[valid][:, None]).float().mean(0)
    torch.testing.assert_close(out.exit_token_accuracies, acc)
    assert out.exit_residual_ratios.shape == (3, 10, 2) and out.logits.shape == (3, 10, 97)


@pytest.mark.parametrize("exit_gradient", ["detach", "full", 0.5, "equilibrium"])
def test_training_backward_and_exit_gradient(exit_gradient):
    model = make(exit_layers=[1, 3]).train()
    ids, mask, labels = batch()
    spec = DepthLossSpec(depth_terms=("distill", "stop", "dr"), exit_weighting="final_heavy", early_exit_weight=0.5)
    out = model(ids, attention_mask=mask, labels=labels, exit_gradient=exit_gradient, depth_loss_spec=spec)
    out.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert "model.layers.0.mlp.down_proj.weight" in grads and "lm_head.weight" in grads


@pytest.mark.parametrize("exit_gradient", ["detach", "full"])
def test_detach_keeps_early_exit_loss_out_of_the_backbone(exit_gradient):
    """With `detach`, the backbone's gradient under uniform weights (0.5 CE_0 + 0.5 CE_final) is exactly half the
    final-only one: the early exit's loss reaches only the shared head. With `full` it is not."""

    def layer0_grad(weighting):
        model = make(exit_layers=[1, 3]).train()
        ids, mask, labels = batch()
        spec = DepthLossSpec(exit_weighting=weighting, depth_loss_weight=0.0)
        model(ids, attention_mask=mask, labels=labels, exit_gradient=exit_gradient, depth_loss_spec=spec).loss.backward()
        return model.model.layers[0].mlp.down_proj.weight.grad

    uniform, final_only = layer0_grad("uniform"), layer0_grad("final_only")
    assert torch.allclose(uniform, 0.5 * final_only, atol=1e-7) == (exit_gradient == "detach")


def test_loads_stock_checkpoint_and_auto_classes(tmp_path):
    torch.manual_seed(1)
    stock = LlamaForCausalLM(LlamaConfig(**TINY)).eval()
    stock.save_pretrained(tmp_path / "stock")
    model = DepthStopLlamaForCausalLM.from_pretrained(tmp_path / "stock", exit_layers=[1]).eval()
    assert model.config.exit_layers == [1, 3] and model.config.model_type == "depthstop_llama"
    ids, mask, _ = batch()
    with torch.no_grad():
        assert (model(ids, attention_mask=mask).logits - stock(ids, attention_mask=mask).logits).abs().max() <= 1e-5
    model.set_stopping_rule("confidence", threshold=0.5)
    model.save_pretrained(tmp_path / "ours")
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "ours"), DepthStopLlamaConfig)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert isinstance(again, DepthStopLlamaForCausalLM)
    assert again.config.stopping_rule == "confidence" and again.config.exit_layers == [1, 3]


def test_rejects_non_llama_checkpoint(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=97).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        DepthStopLlamaConfig.from_pretrained(tmp_path)
