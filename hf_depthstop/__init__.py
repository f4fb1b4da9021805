# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""hf_depthstop: principled early exit for Hugging Face Transformers.

L_depth (a depth regularizer applied by `DepthStopTrainer`) and ASTI (a per-example stopping-time rule run inside
`forward()`), after "Optimal Depth of Neural Networks" (arXiv 2506.16862). The paper's full text was not available to
us: the formulas are this project's own derivation from its stated theorem.
"""

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
)

from .calibration import CalibrationReport, calibrate
from .evaluation import compare_rules
from .generation import calibrate_lm, exit_vocab_from_corpus
from .hub import DepthStopHubMixin, HubPushError
from .losses import DepthLossSpec, depth_stop_loss
from .modelcard import write_model_card
from .modeling_outputs import (
    DepthStopCausalLMOutputWithPast,
    DepthStopGenerateOutput,
    DepthStopSequenceClassifierOutput,
)
from .models.bert import DepthStopBertConfig, DepthStopBertForSequenceClassification
from .models.gpt2 import DepthStopGPT2Config, DepthStopGPT2LMHeadModel
from .models.llama import DepthStopLlamaConfig, DepthStopLlamaForCausalLM
from .models.resnet import DepthStopResNetConfig, DepthStopResNetForImageClassification
from .models.vit import DepthStopViTConfig, DepthStopViTForImageClassification
from .stopping import STOPPING_RULES
from .trainer import DepthStopTrainer
from .training_args import DepthStopTrainingArguments


__version__ = "0.1.0"

# Auto-class registration: the one place it happens.
AutoConfig.register(DepthStopBertConfig.model_type, DepthStopBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    DepthStopBertConfig, DepthStopBertForSequenceClassification, exist_ok=True
)
AutoConfig.register(DepthStopLlamaConfig.model_type, DepthStopLlamaConfig, exist_ok=True)
AutoModelForCausalLM.register(DepthStopLlamaConfig, DepthStopLlamaForCausalLM, exist_ok=True)
AutoConfig.register(DepthStopGPT2Config.model_type, DepthStopGPT2Config, exist_ok=True)
AutoModelForCausalLM.register(DepthStopGPT2Config, DepthStopGPT2LMHeadModel, exist_ok=True)
AutoConfig.register(DepthStopViTConfig.model_type, DepthStopViTConfig, exist_ok=True)
AutoModelForImageClassification.register(DepthStopViTConfig, DepthStopViTForImageClassification, exist_ok=True)
AutoConfig.register(DepthStopResNetConfig.model_type, DepthStopResNetConfig, exist_ok=True)
AutoModelForImageClassification.register(DepthStopResNetConfig, DepthStopResNetForImageClassification, exist_ok=True)

__all__ = [
    "STOPPING_RULES",
    "CalibrationReport",
    "DepthLossSpec",
    "DepthStopBertConfig",
    "DepthStopBertForSequenceClassification",
    "DepthStopCausalLMOutputWithPast",
    "DepthStopGPT2Config",
    "DepthStopGPT2LMHeadModel",
    "DepthStopGenerateOutput",
    "DepthStopHubMixin",
    "DepthStopLlamaConfig",
    "DepthStopLlamaForCausalLM",
    "DepthStopResNetConfig",
    "DepthStopResNetForImageClassification",
    "DepthStopSequenceClassifierOutput",
    "DepthStopTrainer",
    "DepthStopTrainingArguments",
    "DepthStopViTConfig",
    "DepthStopViTForImageClassification",
    "HubPushError",
    "__version__",
    "calibrate",
    "calibrate_lm",
    "exit_vocab_from_corpus",
    "compare_rules",
    "depth_stop_loss",
    "write_model_card",
]
