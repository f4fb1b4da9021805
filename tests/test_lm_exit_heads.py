# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""The decoder LMs' optional exit-head pieces, on tiny random Llama and GPT-2 models: per-exit affine adapters
(`exit_adapter="affine"`) and the early exits' restricted vocabulary (`exit_vocab`). Zero init (also when loading a
stock checkpoint), logits and FLOPs, generation invariants (stock equality, padded batch == one by one, lossless ==
stock greedy, cache lengths), the training loss, PEFT, save / load, calibration and bad inputs."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassFieldValidationError
from peft import get_peft_model
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from hf_depthstop import DepthStopGPT2LMHeadModel, DepthStopLlamaForCausalLM, calibrate_lm, exit_vocab_from_corpus
from hf_depthstop.losses import DepthLossSpec
from hf_depthstop.peft_utils import load_adapter, lora_config, save_adapter

from .testing_utils import TINY_LM_PROMPT as PROMPT
from .testing_utils import TINY_LM_VOCAB as VOCAB
from .testing_utils import damp_last_layers, left_padded, median_threshold
from .testing_utils import tiny_lm_config as tiny_config


ARCHS = ("llama", "gpt2")
EXIT_VOCAB = list(range(0, VOCAB, 2))  # 49 of the 97 tokens
GREEDY = {"max_new_tokens": 12, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}


MODEL = {"llama": DepthStopLlamaForCausalLM, "gpt2": DepthStopGPT2LMHeadModel}
STOCK = {"llama": LlamaForCausalLM, "gpt2": GPT2LMHeadModel}


def make_model(arch: str, seed: int = 0, adapter_scale: float = 0.2, damp_last: float | None = None, **overrides):
    """A tiny model with trained-looking (random, non-zero) adapters and the restricted early vocabulary."""
    torch.manual_seed(seed)
    overrides = {"exit_adapter": "affine", "exit_vocab": EXIT_VOCAB, **overrides}
    model = MODEL[arch](tiny_config(arch, **overrides))
    with torch.no_grad():
        for adapter in model.exit_adapters or []:
            adapter.weight.normal_(0.0, adapter_scale)
            adapter.bias.normal_(0.0, adapter_scale)
    if damp_last is not None:
        damp_last_layers(model, damp_last)
    return model.eval()


def stock_copy(arch: str, model):
    """The stock model with `model`'s backbone and LM head (the adapters have no stock counterpart)."""
    stock = STOCK[arch](model.config)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("exit_adapters.")}
    stock.load_state_dict(state)
    return stock.eval()


# ----------------------------------------------------------------------------------------------------------------
# Heads: initialisation, logits, FLOPs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_new_adapters_are_zero_and_leave_the_shared_head_unchanged(arch, tmp_path):
    torch.manual_seed(0)
    stock = STOCK[arch](tiny_config(arch)).eval()
    stock.save_pretrained(tmp_path)
    model = MODEL[arch].from_pretrained(tmp_path, exit_adapter="affine", exit_layers=[1, 2, 3]).eval()
    assert len(model.exit_adapters) == 2  # early exits only
    for adapter in model.exit_adapters:
        assert adapter.weight.abs().sum() == 0 and adapter.bias.abs().sum() == 0
    ids, _ = left_padded(batch=2)
    with torch.no_grad():
        out = model(ids, output_exit_logits=True)
        hidden = model._ds_backbone()(ids, output_hidden_states=True).hidden_states
    shared = model.lm_head(model._ds_norm()(hidden[2]))  # after layer 1 (hidden_states[0] is the embedding)
    torch.testing.assert_close(out.exit_logits[:, :, 0], shared, atol=1e-5, rtol=1e-5)
    # a model built from a config (not loaded) starts at zero too
    fresh = MODEL[arch](tiny_config(arch, exit_adapter="affine"))
    assert all(a.weight.abs().sum() == 0 for a in fresh.exit_adapters)


@pytest.mark.parametrize("arch", ARCHS)
def test_restricted_vocabulary_logits_and_flops(arch):
    model = make_model(arch, exit_layers=[1, 3])
    ids, _ = left_padded(batch=2)
    with torch.no_grad():
        hidden = model._ds_backbone()(ids, output_hidden_states=True).hidden_states[2]  # after layer 1
        early = model._exit_logits(hidden, 0)
        wide = model(ids, output_exit_logits=True).exit_logits[:, :, 0]
    expected = model.lm_head(model._ds_norm()(model.exit_adapters[0](hidden)))[..., EXIT_VOCAB]
    assert early.shape == (2, PROMPT, len(EXIT_VOCAB))
    torch.testing.assert_close(early, expected, atol=1e-5, rtol=1e-5)
    outside = [t for t in range(VOCAB) if t not in EXIT_VOCAB]
    torch.testing.assert_close(wide[..., EXIT_VOCAB], early)
    assert bool((wide[..., outside] == torch.finfo(wide.dtype).min).all())
    assert float(wide.softmax(-1)[..., outside].sum()) == 0.0
    # FLOPs: an early head costs adapter + restricted product, the last the full head
    layer_f, head_f = model._ds_flops()
    d = model.lm_head.in_features
    assert model.exit_head_flops() == [2.0 * d * d + 2.0 * d * len(EXIT_VOCAB), head_f]
    full = 4 * layer_f + head_f
    early_f = 2 * layer_f + 2.0 * d * d + 2.0 * d * len(EXIT_VOCAB)
    torch.testing.assert_close(
        model.exit_compute_fractions(), torch.tensor([early_f / full, (early_f + 2 * layer_f + head_f) / full], dtype=torch.float64)
    )
    torch.testing.assert_close(
        model.single_exit_compute_fractions(), torch.tensor([early_f / full, 1.0], dtype=torch.float64)
    )


def test_exit_vocab_from_corpus_keeps_the_most_frequent_ids():
    ids = torch.tensor([[5, 5, 5, 7, 7, 9], [9, 9, 9, 9, 1, 2]])
    assert exit_vocab_from_corpus(ids, 2) == [5, 9]
    assert exit_vocab_from_corpus(ids, 2, always_include=[0]) == [0, 5, 9]
    assert exit_vocab_from_corpus([[1, 2], [2, 3]], 2) == [1, 2]  # tie between 1 and 3 goes to the smaller id
    assert exit_vocab_from_corpus(ids, 100) == [1, 2, 5, 7, 9]  # never ids that do not occur
    with pytest.raises(ValueError, match="size must be an integer >= 1, got size=0"):
        exit_vocab_from_corpus(ids, 0)
    with pytest.raises(ValueError, match="empty"):
        exit_vocab_from_corpus([], 4)
    with pytest.raises(ValueError, match="non-negative"):
        exit_vocab_from_corpus([[-1, 2]], 4)


# ----------------------------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_rule_none_and_a_rule_that_never_fires_equal_stock(arch):
    model = make_model(arch)
    stock = stock_copy(arch, model)
    ids, mask = left_padded()
    reference = stock.generate(ids, attention_mask=mask, **GREEDY)
    for kwargs in ({}, {"stopping_rule": "confidence", "stopping_params": {"threshold": 1.0}}):
        out = model.generate(ids, attention_mask=mask, **GREEDY, **kwargs)
        assert torch.equal(out.sequences, reference.sequences)
        assert max((x - y).abs().max().item() for x, y in zip(out.logits, reference.logits)) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_early_tokens_come_from_the_exit_vocabulary_and_caches_stay_equal(arch):
    model = make_model(arch)
    ids, mask = left_padded()
    model.set_stopping_rule("static", layer=1)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    new = out.sequences[:, PROMPT + 1 :]  # the first new token comes from the full-depth prefill
    assert bool((out.exit_layers[:, 1:] == 1).all())
    assert bool(torch.isin(new, torch.tensor(EXIT_VOCAB)).all())
    lengths = {layer.keys.shape[-2] for layer in out.cache.layers} | {layer.values.shape[-2] for layer in out.cache.layers}
    assert lengths == {out.sequences.shape[1] - 1}


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_one_by_one(arch):
    model = make_model(arch)
    ids, mask = left_padded()
    model.set_stopping_rule("confidence", threshold=median_threshold(model, ids, mask))
    batched = model.generate(ids, attention_mask=mask, **GREEDY)
    exits = batched.exit_layers[:, 1:]
    assert bool((exits < 3).any()) and bool((exits == 3).any()), "the test needs a mix of early and full-depth exits"
    for i in range(3):
        n = int(mask[i].sum())
        single = model.generate(ids[i : i + 1, PROMPT - n :], **GREEDY)
        assert torch.equal(single.sequences[0, n:], batched.sequences[i, PROMPT:])
        assert torch.equal(single.exit_layers[0], batched.exit_layers[i])


@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_equals_stock_greedy(arch):
    model = make_model(arch, damp_last=0.2, adapter_scale=0.05)
    stock = stock_copy(arch, model)
    ids, mask = left_padded()
    threshold = median_threshold(model, ids, mask)
    reference = stock.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=16, depthstop_mode="lossless", stopping_rule="confidence",
        stopping_params={"threshold": threshold}, return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, reference)
    assert bool((out.exit_layers < 3).any()), "no early draft: the test would not exercise the restricted head"


# ----------------------------------------------------------------------------------------------------------------
# Training, PEFT, save / load, calibration
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_detached_exits_train_the_adapters_only(arch):
    """exit_gradient="detach": the early exits' loss reaches their adapters (and the shared head) but never the
    layers, so the layers' gradient is the final exit's alone; the early CE averages over targets inside the exit
    vocabulary."""
    model = make_model(arch).train()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (2, 10), generator=g)
    spec = DepthLossSpec(exit_weighting="final_heavy", early_exit_weight=0.3, depth_terms=("distill",), depth_loss_weight=1.0)
    torch.manual_seed(5)  # the same dropout masks (GPT-2) in both passes
    out = model(input_ids=ids, labels=ids, depth_loss_spec=spec, exit_gradient="detach")
    out.loss.backward()
    layers = {n for n, _ in model.named_parameters() if ".layers." in n or ".h." in n}
    assert len(layers) > 10
    backbone = {n: p.grad.clone() for n, p in model.named_parameters() if n in layers}
    assert all(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in model.exit_adapters)
    model.zero_grad()
    final_only = DepthLossSpec(exit_weighting="final_only", depth_loss_weight=0.0)
    torch.manual_seed(5)
    model(input_ids=ids, labels=ids, depth_loss_spec=final_only, exit_gradient="detach").loss.backward()
    for name, p in model.named_parameters():
        if name in layers:
            torch.testing.assert_close(backbone[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    # exit_losses[0]: the mean CE over the restricted vocabulary, on tokens whose target is in it
    model.eval()
    with torch.no_grad():
        hidden = model._ds_backbone()(ids, output_hidden_states=True).hidden_states[1 + model.config.exit_layers[0]]
        logp = model._exit_logits(hidden[:, :-1], 0).log_softmax(-1)
        targets = ids[:, 1:]
        column = {t: j for j, t in enumerate(EXIT_VOCAB)}
        ces = [-logp[b, i, column[int(t)]] for b in range(2) for i, t in enumerate(targets[b]) if int(t) in column]
        expected = torch.stack(ces).mean()
        # the training path in eval mode (no dropout): output_exit_logits=True with labels gives the loss outputs
        got = model(input_ids=ids, labels=ids, depth_loss_spec=spec, output_exit_logits=True)
    torch.testing.assert_close(got.exit_losses[0], expected, atol=1e-5, rtol=1e-5)
    assert got.logits.shape == (2, 10, VOCAB)


@pytest.mark.parametrize("arch", ARCHS)
def test_peft_trains_and_saves_the_adapters(arch, tmp_path):
    model = make_model(arch)
    targets = ["q_proj", "v_proj"] if arch == "llama" else ["c_attn"]
    peft_model = get_peft_model(model, lora_config(model, r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("exit_adapters.0" in n for n in trainable) and any("exit_adapters.2" in n for n in trainable)
    assert not any("lm_head" in n or "embed" in n or "wte" in n for n in trainable)
    with torch.no_grad():  # as if trained: move the adapter copies
        for n, p in peft_model.named_parameters():
            if "exit_adapters" in n and p.requires_grad:
                p.add_(0.1)
    ids, mask = left_padded()
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, output_exit_logits=True).exit_logits
    save_adapter(peft_model, str(tmp_path / "adapter"))
    base = make_model(arch)  # same seed: same base weights and untrained-adapter values
    base.save_pretrained(tmp_path / "base")
    loaded = load_adapter(str(tmp_path / "adapter"), str(tmp_path / "base")).eval()
    with torch.no_grad():
        got = loaded(input_ids=ids, attention_mask=mask, output_exit_logits=True).exit_logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_calibration_keep_the_heads(arch, tmp_path):
    model = make_model(arch, damp_last=0.2, adapter_scale=0.05)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(1, VOCAB, (4, 16), generator=g) for _ in range(4)]
    calibration = calibrate_lm(model, batches, target=0.2)
    rows = {row["rule"]: row for row in calibration["table"]}
    assert rows["asti"]["agreement"] >= 0.8 - 1e-9
    assert rows["none"]["compute_fraction"] == 1.0
    # agreement is measured in token ids: the restricted exits' column indices were mapped back
    static1 = calibration["settings"]["static"]["layer"]
    assert static1 in model.config.exit_layers
    model.save_pretrained(tmp_path)
    loaded = MODEL[arch].from_pretrained(tmp_path).eval()
    assert loaded.config.exit_vocab == EXIT_VOCAB and loaded.config.exit_adapter == "affine"
    for a, b in zip(model.exit_adapters, loaded.exit_adapters):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    ids, mask = left_padded()
    a = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    b = loaded.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.exit_layers, b.exit_layers)


# ----------------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_bad_exit_head_fields_raise_clear_errors(arch):
    with pytest.raises(ValueError, match="exit_adapter must be one of .* got exit_adapter='mlp'"):
        tiny_config(arch, exit_adapter="mlp")
    with pytest.raises(ValueError, match=r"exit_vocab must hold token ids in \[0, vocab_size=97\), got \[97\]"):
        tiny_config(arch, exit_vocab=[1, 97])
    with pytest.raises(ValueError, match="exit_vocab must not be empty"):
        tiny_config(arch, exit_vocab=[])
    with pytest.raises(ValueError, match="must not repeat token ids: 1 duplicates"):
        tiny_config(arch, exit_vocab=[3, 3, 4])
    with pytest.raises(StrictDataclassFieldValidationError, match="exit_vocab.*'abc'"):  # the strict config's check
        tiny_config(arch, exit_vocab="abc")
    assert tiny_config(arch, exit_vocab=[9, 2, 5]).exit_vocab == [2, 5, 9]  # normalised: sorted


@pytest.mark.parametrize("arch", ARCHS)
def test_set_exit_vocab_validates_first_and_drops_a_stale_calibration(arch):
    model = make_model(arch, damp_last=0.2, adapter_scale=0.05)
    g = torch.Generator().manual_seed(1)
    calibrate_lm(model, [torch.randint(1, VOCAB, (4, 16), generator=g) for _ in range(2)], target=0.2)
    with pytest.raises(ValueError, match=r"got \[-1\]"):
        model.set_exit_vocab([-1, 4])
    assert model.config.exit_vocab == EXIT_VOCAB and model.config.calibration is not None  # untouched
    model.set_exit_vocab(range(10))
    assert model.config.exit_vocab == list(range(10))
    assert model.config.calibration is None and model.config.stopping_rule == "none"
    model.set_exit_vocab(None)
    with torch.no_grad():
        assert model(left_padded()[0], output_exit_logits=True).exit_logits.shape[-1] == VOCAB
