# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""Tiny configs and a tiny learnable task shared by the tests."""

import datasets
import torch

from hf_depthstop import (
    DepthStopBertConfig,
    DepthStopBertForSequenceClassification,
    DepthStopGPT2Config,
    DepthStopLlamaConfig,
    DepthStopTrainer,
    DepthStopTrainingArguments,
)


def tiny_bert_config(**kwargs) -> DepthStopBertConfig:
    values = dict(
        vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64, num_labels=3,
    )
    values.update(kwargs)
    return DepthStopBertConfig(**values)


def tiny_task(n: int, seed: int = 0, min_len: int = 4, max_len: int = 12) -> datasets.Dataset:
    """Sequences of random tokens; the label is the count of 'marker' tokens (< 10) among the first 3, mod 3,
    so some examples are easy (decided early) and the padding lengths differ."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    ids, labels = [], []
    for length in lengths.tolist():
        x = torch.randint(1, 99, (length,), generator=g)
        ids.append(x.tolist())
        labels.append(int((x[:3] < 34).sum()) % 3)
    return datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "label": labels})


def train_tiny_model(tmp_dir: str, steps: int = 60, seed: int = 0, **config_kwargs):
    """A tiny early-exit BERT trained for a few dozen steps on `tiny_task` (seconds on CPU)."""
    torch.manual_seed(seed)
    model = DepthStopBertForSequenceClassification(tiny_bert_config(**config_kwargs))
    train = tiny_task(512, seed=seed)
    args = DepthStopTrainingArguments(
        tmp_dir, per_device_train_batch_size=32, max_steps=steps, learning_rate=3e-3, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed, exit_weighting="uniform", logging_steps=10,
    )
    trainer = DepthStopTrainer(model=model, args=args, train_dataset=train, data_collator=pad_collator)
    trainer.train()
    return trainer.model.eval(), trainer


def pad_collator(features):
    """Right-pads `input_ids` / `attention_mask` and stacks `label` into `labels`."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), width, dtype=torch.long)
    mask = torch.zeros(len(features), width, dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([f["label"] for f in features])}



def tiny_vit_config(**kwargs):
    """A tiny early-exit ViT config: 16x16 single-channel images, 4x4 patches (17 tokens), 4 layers, 3 labels."""
    from hf_depthstop import DepthStopViTConfig

    values = dict(
        image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=37, num_labels=3,
    )
    values.update(kwargs)
    return DepthStopViTConfig(**values)


def tiny_image_task(n: int, seed: int = 0, image_size: int = 16, num_channels: int = 1) -> datasets.Dataset:
    """Noisy images whose label (0-2) is the horizontal band (top, middle, bottom) holding a bright bar; the bar's
    contrast varies per image, so some images are easy (decided early) and some hard. Columns `pixel_values`
    (num_channels, image_size, image_size) floats and `label`."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    contrast = torch.rand(n, generator=g) * 1.5 + 0.2
    images = torch.randn(n, num_channels, image_size, image_size, generator=g) * 0.5
    band = image_size // 3
    for i, (y, c) in enumerate(zip(labels.tolist(), contrast.tolist())):
        images[i, :, y * band : (y + 1) * band] += c
    return datasets.Dataset.from_dict({"pixel_values": images.numpy(), "label": labels.tolist()})


# ----------------------------------------------------------------------------------------------------------------
# Tiny decoder LMs (generation tests)
# ----------------------------------------------------------------------------------------------------------------
TINY_LM_VOCAB = 97
TINY_LM_PROMPT = 7


def tiny_lm_config(arch: str, init: float = 0.3, **overrides):
    """A 4-layer, width-32 `DepthStopLlamaConfig` (`arch="llama"`) or `DepthStopGPT2Config` (`"gpt2"`) over
    `TINY_LM_VOCAB` tokens, pad 0, no BOS / EOS. `init` > the usual 0.02 gives peaked next-token distributions, so
    confidence rules fire."""
    common = {"vocab_size": TINY_LM_VOCAB, "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}
    if arch == "llama":
        return DepthStopLlamaConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            initializer_range=init, **common, **overrides,
        )
    return DepthStopGPT2Config(
        n_embd=32, n_layer=4, n_head=4, n_positions=64, initializer_range=init, **common, **overrides
    )


@torch.no_grad()
def damp_last_layers(model, factor: float) -> None:
    """Scale the output projections of layers 2 and 3 of a tiny LM by `factor`: late layers then change the prediction
    little, so early exits agree with the final one often."""
    for name, p in model.named_parameters():
        if any(f".{i}." in name for i in (2, 3)) and any(s in name for s in ("o_proj", "down_proj", "c_proj")):
            p.mul_(factor)


def left_padded(batch: int = 3, seed: int = 0):
    """`(input_ids, attention_mask)`, both `(batch, TINY_LM_PROMPT)`: random prompts, row i left-padded by 2i - 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY_LM_VOCAB, (batch, TINY_LM_PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch):
        mask[i, : 2 * i - 1] = 0
    return ids * mask, mask


def median_threshold(model, ids, mask) -> float:
    """A confidence threshold at the median max prob of the first exit: some tokens exit there, some go on."""
    with torch.no_grad():
        out = model(ids, attention_mask=mask, output_exit_logits=True)
    return float(out.exit_logits[:, :, 0].softmax(-1).amax(-1)[mask.bool()].median())
