# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""PEFT on early-exit models: exit heads train and save with the adapter under plain `peft.get_peft_model`, and
adapter save/load and `merge_and_unload` keep the class, the stopping rule, the calibration and the outputs."""

import copy
import json
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, PromptTuningConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from hf_depthstop import DepthStopBertForSequenceClassification, DepthStopTrainer, DepthStopTrainingArguments
from hf_depthstop.calibration import calibrate
from hf_depthstop.data import minilm_checkpoint_path
from hf_depthstop.peft_utils import (
    DEPTHSTOP_CONFIG_NAME,
    DepthStopPeftMixin,
    add_exit_modules_to_save,
    exit_modules_to_save,
    load_adapter,
    lora_config,
    save_adapter,
)

from .testing_utils import pad_collator, tiny_bert_config, tiny_task


EXIT_NAMES = [f"exit_heads.{k}.{layer}" for k in range(3) for layer in ("dense", "classifier")] + ["classifier"]


def fresh_model(seed: int = 0, **kwargs) -> DepthStopBertForSequenceClassification:
    torch.manual_seed(seed)
    return DepthStopBertForSequenceClassification(tiny_bert_config(**kwargs))


def batch(n: int = 8, seed: int = 3) -> dict:
    data = tiny_task(n, seed=seed)
    out = pad_collator([data[i] for i in range(n)])
    out.pop("labels")
    return out


def head_param_names(model) -> set[str]:
    """Names of every exit-head parameter of a plain (unwrapped) model, final head included."""
    return {n for n, _ in model.named_parameters() if n.startswith(("exit_heads.", "classifier."))}


def trainable_head_params(peft_model) -> set[str]:
    """Exit-head parameters that train under `peft_model`, named as in the plain model."""
    names = set()
    for name, p in peft_model.named_parameters():
        if p.requires_grad and ".modules_to_save.default." in name:
            names.add(name.removeprefix("base_model.model.").replace(".modules_to_save.default", ""))
    return names


def short_peft_training(peft_model, tmp_path, steps: int = 8, seed: int = 0):
    args = DepthStopTrainingArguments(
        str(tmp_path / "trainer"),
        per_device_train_batch_size=32,
        max_steps=steps,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
        exit_weighting="uniform",
    )
    trainer = DepthStopTrainer(
        model=peft_model, args=args, train_dataset=tiny_task(256, seed=seed), data_collator=pad_collator
    )
    trainer.train()
    return peft_model.eval()


def assert_same_outputs(a, b, inputs, atol=1e-6):
    with torch.no_grad():
        out_a, out_b = a(**inputs), b(**inputs)
    torch.testing.assert_close(out_a.logits, out_b.logits, atol=atol, rtol=0)
    assert out_a.exit_layer.tolist() == out_b.exit_layer.tolist()
    torch.testing.assert_close(out_a.compute_fraction, out_b.compute_fraction)
    return out_a


# ---------------------------------------------------------------------------------------------------------------------
# The mechanism
# ---------------------------------------------------------------------------------------------------------------------
def test_exit_modules_to_save_lists_every_head_layer_with_parameters():
    model = fresh_model()
    assert exit_modules_to_save(model) == EXIT_NAMES
    linear_heads = fresh_model(exit_head_hidden_size=0)  # heads without the dense layer
    assert exit_modules_to_save(linear_heads) == [f"exit_heads.{k}.classifier" for k in range(3)] + ["classifier"]
    assert issubclass(DepthStopBertForSequenceClassification, DepthStopPeftMixin)


@pytest.mark.parametrize("task_type", ["SEQ_CLS", None, "FEATURE_EXTRACTION"])
def test_plain_get_peft_model_trains_and_saves_every_exit_head(task_type, tmp_path):
    """The user lists no exit head: PEFT alone would train `exit_heads.k.classifier` (SEQ_CLS) or nothing at all."""
    model = fresh_model()
    expected = head_param_names(model)
    peft_model = get_peft_model(model, LoraConfig(task_type=task_type, target_modules=["query", "value"], r=4))
    assert trainable_head_params(peft_model) == expected
    lora = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n]
    assert len(lora) == 4 * 2 * 2  # 4 layers x (query, value) x (A, B)
    frozen = [
        n
        for n, p in peft_model.named_parameters()
        if p.requires_grad and "lora_" not in n and ".modules_to_save." not in n
    ]
    assert frozen == []  # nothing else trains: the backbone stays frozen
    config = peft_model.peft_config["default"]
    assert set(EXIT_NAMES) <= set(config.modules_to_save)

    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model.") for k in saved if "lora_" not in k} == expected
    assert set(EXIT_NAMES) <= set(json.loads((tmp_path / "adapter_config.json").read_text())["modules_to_save"])
    # forward works through the task wrapper (SEQ_CLS passes output_attentions / output_hidden_states)
    peft_model.eval()
    out = peft_model(**batch())
    assert out.logits.shape == (8, 3) and out.exit_layer.shape == (8,)


def test_user_listed_heads_and_lora_on_head_layers_are_not_wrapped_twice():
    model = fresh_model()
    config = LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], modules_to_save=["exit_heads.1.dense"])
    peft_model = get_peft_model(model, config)
    assert trainable_head_params(peft_model) == head_param_names(fresh_model())
    assert len(peft_model.peft_config["default"].modules_to_save) == len(set(peft_model.modules_to_save))
    # an exit head layer adapted by LoRA itself stays a LoRA layer (PEFT cannot save a tuner layer in full)
    model = fresh_model()
    peft_model = get_peft_model(model, LoraConfig(target_modules=["query", "value", "dense"], r=2))
    assert type(peft_model.base_model.model.exit_heads[0].dense).__name__ == "Linear"  # peft.tuners.lora.Linear
    assert "lora_A" in dict(peft_model.base_model.model.exit_heads[0].dense.named_children())
    assert {n for n in trainable_head_params(peft_model)} == {
        n for n in head_param_names(fresh_model()) if ".dense." not in n
    }


def test_modulelist_error_of_peft_does_not_arise():
    """Listing `exit_heads` (a ModuleList) is what PEFT refuses; the mixin never needs it."""
    with pytest.raises(TypeError, match="ModuleList"):
        get_peft_model(fresh_model(), LoraConfig(target_modules=["query"], modules_to_save=["exit_heads"]))


def test_training_updates_the_heads_and_the_adapter_and_leaves_the_backbone(tmp_path):
    model = fresh_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4))
    short_peft_training(peft_model, tmp_path)
    base = peft_model.base_model.model
    for k in range(3):  # every layer of every exit head moved (its trained copy)
        for layer in ("dense", "classifier"):
            trained = getattr(base.exit_heads[k], layer).modules_to_save["default"].weight
            assert not torch.equal(trained, before[f"exit_heads.{k}.{layer}.weight"])
    b = base.bert.encoder.layer[0].attention.self.query
    assert torch.equal(b.base_layer.weight, before["bert.encoder.layer.0.attention.self.query.weight"])
    assert b.lora_B["default"].weight.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------------
# Save / load / merge keep class, rule, calibration, outputs
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def calibrated_peft(tmp_path_factory):
    """A tiny base saved to disk, LoRA-tuned (adapter + exit heads), then calibrated (ASTI) through the PeftModel."""
    root = tmp_path_factory.mktemp("peft")
    fresh_model().save_pretrained(root / "base")
    model = DepthStopBertForSequenceClassification.from_pretrained(root / "base")
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["query", "value"], r=4))
    short_peft_training(peft_model, root, steps=30)
    calibrate(peft_model, tiny_task(200, seed=1), target=0.02, rule="asti")
    return peft_model, root


def test_adapter_save_load_keeps_class_rule_calibration_and_outputs(calibrated_peft, tmp_path):
    peft_model, root = calibrated_peft
    config = peft_model.base_model.model.config
    assert config.stopping_rule == "asti" and config.calibration is not None
    save_adapter(peft_model, tmp_path)
    assert (tmp_path / DEPTHSTOP_CONFIG_NAME).exists() and not (tmp_path / "config.json").exists()
    reloaded = load_adapter(str(tmp_path))  # base path recorded in the adapter config
    assert isinstance(reloaded, PeftModel)
    inner = reloaded.base_model.model
    assert type(inner) is DepthStopBertForSequenceClassification
    assert inner.config.stopping_rule == "asti" and inner.config.stopping_params == config.stopping_params
    assert inner.config.calibration == json.loads(json.dumps(config.calibration))
    assert_same_outputs(peft_model, reloaded, batch(16))
    # plain PEFT works the same when the caller brings the calibrated base config
    base = DepthStopBertForSequenceClassification.from_pretrained(root / "base", config=inner.config)
    assert_same_outputs(peft_model, PeftModel.from_pretrained(base, tmp_path).eval(), batch(16))


def test_merge_and_unload_keeps_class_rule_calibration_and_outputs(calibrated_peft, tmp_path):
    peft_model, root = calibrated_peft
    save_adapter(peft_model, tmp_path / "adapter")
    merged = load_adapter(str(tmp_path / "adapter")).merge_and_unload().eval()
    assert type(merged) is DepthStopBertForSequenceClassification
    assert not hasattr(merged, "peft_config")
    assert merged.config.stopping_rule == "asti" and merged.config.calibration is not None
    assert_same_outputs(peft_model, merged, batch(16), atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert type(again) is DepthStopBertForSequenceClassification
    assert_same_outputs(merged, again, batch(16))
    assert again.config.calibration == merged.config.calibration


def test_real_minilm_lora_round_trip(tmp_path):
    path = minilm_checkpoint_path()
    model = DepthStopBertForSequenceClassification.from_pretrained(path, num_labels=3)
    peft_model = get_peft_model(model, lora_config(model, r=4))  # recipe path: heads listed explicitly
    assert trainable_head_params(peft_model) == head_param_names(
        DepthStopBertForSequenceClassification.from_pretrained(path, num_labels=3)
    )
    peft_model.set_stopping_rule("confidence", threshold=0.34)  # reaches the model through PeftModel
    with torch.no_grad():  # non-trivial adapter and heads
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.02)
    peft_model.eval()
    ids = torch.randint(1000, 20000, (4, 10))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    save_adapter(peft_model, tmp_path)
    reloaded = load_adapter(str(tmp_path))
    assert reloaded.base_model.model.config.stopping_rule == "confidence"
    assert_same_outputs(peft_model, reloaded, inputs)
    merged = reloaded.merge_and_unload().eval()
    assert type(merged) is DepthStopBertForSequenceClassification
    assert_same_outputs(peft_model, merged, inputs, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"r": 0}, "lora_r"),
        ({"r": 2.5}, "lora_r"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"target_modules": []}, "lora_target_modules"),
        ({"target_modules": "query,nonexistent"}, "nonexistent"),
    ],
)
def test_lora_config_rejects_bad_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lora_config(fresh_model(), **kwargs)


def test_lora_config_defaults_and_prompt_learning_refusal():
    config = lora_config(fresh_model(), target_modules="query, value")
    assert config.target_modules == {"query", "value"} and config.modules_to_save == EXIT_NAMES
    assert lora_config(fresh_model()).target_modules == {"query", "value"}  # BERT default
    with pytest.raises(TypeError, match="PromptTuningConfig"):
        add_exit_modules_to_save(PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2), fresh_model())


def test_load_adapter_and_forward_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(str(tmp_path))
    with pytest.raises(ValueError, match="output_attentions=True"):
        fresh_model()(**batch(), output_attentions=True)
    with pytest.raises(TypeError, match="PeftModel"):
        save_adapter(fresh_model(), str(tmp_path))
    peft_model = get_peft_model(fresh_model(), LoraConfig(task_type="SEQ_CLS", target_modules=["query"]))
    save_adapter(peft_model, str(tmp_path / "a"))
    with pytest.raises(ValueError, match="base_model_name_or_path"):  # a model built from a config has no path
        load_adapter(str(tmp_path / "a"))
    assert os.path.exists(tmp_path / "a" / "adapter_config.json")


# ---------------------------------------------------------------------------------------------------------------------
# The other model classes (vision): the explicit path works for any class; the plain path needs the mixin
# ---------------------------------------------------------------------------------------------------------------------
def _vision_models():
    import hf_depthstop

    out = []
    if hasattr(hf_depthstop, "DepthStopViTForImageClassification"):
        from .testing_utils import tiny_vit_config

        out.append(
            (
                "vit",
                lambda: hf_depthstop.DepthStopViTForImageClassification(tiny_vit_config()),
                (1, 16),
                ["q_proj", "v_proj"],
            )
        )
    if hasattr(hf_depthstop, "DepthStopResNetForImageClassification"):
        cfg = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [2, 2], "layer_type": "basic", "num_labels": 3}
        out.append(
            (
                "resnet",
                lambda cfg=cfg: hf_depthstop.DepthStopResNetForImageClassification(
                    hf_depthstop.DepthStopResNetConfig(**cfg)
                ),
                (3, 32),
                ["convolution"],
            )
        )
    return out


VISION = _vision_models()


def _vision_round_trip(make, image_shape, peft_model, tmp_path):
    channels, size = image_shape
    pixels = torch.randn(4, channels, size, size, generator=torch.Generator().manual_seed(0))
    base_names = {n for n, _ in make().named_parameters() if n.startswith(("exit_heads.", "classifier."))}
    assert (
        base_names
        and {
            n.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            for n, p in peft_model.named_parameters()
            if p.requires_grad and ".modules_to_save." in n
        }
        == base_names
    )
    # a training step on a copy: in train mode BatchNorm (ResNet) updates running statistics of the frozen backbone,
    # which no adapter saves (README: add the norm layers to modules_to_save, or train with BatchNorm in eval mode)
    trained = copy.deepcopy(peft_model).train()
    out = trained(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 0]))
    out.loss.backward()  # every exit head's trained copy gets a gradient
    assert all(
        p.grad is not None for n, p in trained.named_parameters() if p.requires_grad and ".modules_to_save." in n
    )
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.eval().set_stopping_rule("confidence", threshold=0.34)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {k.removeprefix("base_model.model.") for k in saved if "lora_" not in k} == base_names
    torch.manual_seed(0)
    fresh = make()
    fresh.config = peft_model.base_model.model.config
    reloaded = PeftModel.from_pretrained(fresh, tmp_path).eval()
    with torch.no_grad():
        a, b = peft_model(pixel_values=pixels), reloaded(pixel_values=pixels)
        merged = reloaded.merge_and_unload().eval()
        c = merged(pixel_values=pixels)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.logits, c.logits, atol=1e-5, rtol=0)
    assert a.exit_layer.tolist() == b.exit_layer.tolist() == c.exit_layer.tolist()
    assert type(merged) is type(fresh) and merged.config.stopping_rule == "confidence"


@pytest.mark.parametrize(("arch", "make", "image_shape", "targets"), VISION, ids=[v[0] for v in VISION])
def test_vision_explicit_lora_config_trains_and_saves_every_exit_head(arch, make, image_shape, targets, tmp_path):
    torch.manual_seed(0)
    model = make()
    peft_model = get_peft_model(model, lora_config(model, r=2, target_modules=targets))
    _vision_round_trip(make, image_shape, peft_model, tmp_path)


@pytest.mark.parametrize(("arch", "make", "image_shape", "targets"), VISION, ids=[v[0] for v in VISION])
def test_vision_plain_get_peft_model_task_type_none(arch, make, image_shape, targets, tmp_path):
    torch.manual_seed(0)
    model = make()
    if not isinstance(model, DepthStopPeftMixin):  # the one-line adoption, done here until the class does it
        model.__class__ = type(type(model).__name__, (DepthStopPeftMixin, type(model)), {})
    peft_model = get_peft_model(model, LoraConfig(target_modules=targets, r=2))  # image classification: no task type
    _vision_round_trip(make, image_shape, peft_model, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Decoder LMs: exits share the model's own norm + LM head, so there is nothing extra to save
# ---------------------------------------------------------------------------------------------------------------------
def _lms():
    import hf_depthstop

    out = []
    if hasattr(hf_depthstop, "DepthStopLlamaForCausalLM"):
        cfg = dict(
            vocab_size=97,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        out.append(
            (
                "llama",
                lambda cfg=cfg: hf_depthstop.DepthStopLlamaForCausalLM(hf_depthstop.DepthStopLlamaConfig(**cfg)),
                ["q_proj", "v_proj"],
            )
        )
    if hasattr(hf_depthstop, "DepthStopGPT2LMHeadModel"):
        cfg = dict(
            n_embd=32,
            n_layer=4,
            n_head=4,
            n_positions=64,
            vocab_size=97,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
        out.append(
            (
                "gpt2",
                lambda cfg=cfg: hf_depthstop.DepthStopGPT2LMHeadModel(hf_depthstop.DepthStopGPT2Config(**cfg)),
                ["c_attn"],
            )
        )
    return out


LMS = _lms()


@pytest.mark.parametrize(("arch", "make", "targets"), LMS, ids=[v[0] for v in LMS])
def test_causal_lm_lora_round_trip(arch, make, targets, tmp_path):
    torch.manual_seed(0)
    model = make()
    assert exit_modules_to_save(model) == []  # exits share the LM head: nothing of their own to save
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", target_modules=targets, r=2))
    assert all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.eval()
    ids = torch.randint(3, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    reloaded = PeftModel.from_pretrained(make(), tmp_path).eval()
    with torch.no_grad():
        a = peft_model(input_ids=ids).logits
        b = reloaded(input_ids=ids).logits
        merged = reloaded.merge_and_unload().eval()
        c = merged(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    assert type(merged) is type(make())
