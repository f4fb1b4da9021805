# Copyright 2026 The hf_depthstop authors. Licensed under the Apache License, Version 2.0.
"""hf_depthstop: principled early exit for Hugging Face Transformers.

L_depth (a depth regularizer applied by `DepthStopTrainer`) and ASTI (a per-example stopping-time rule run inside
`forward()`), after "Optimal Depth of Neural Networks" (arXiv 2506.16862). The paper's full text was not available to
us: the formulas are this project's own derivation from its stated theorem.
"""

from transformers import AutoConfig, AutoModelForSequenceClassification

from .calibration import CalibrationReport, calibrate
from .evaluation import compare_rules
from .losses import DepthLossSpec, depth_stop_loss
from .modeling_outputs import DepthStopSequenceClassifierOutput
from .models.bert import DepthStopBertConfig, DepthStopBertForSequenceClassification
from .stopping import STOPPING_RULES
from .trainer import DepthStopTrainer
from .training_args import DepthStopTrainingArguments


__version__ = "0.1.0"

# Auto-class registration: the one place it happens.
AutoConfig.register(DepthStopBertConfig.model_type, DepthStopBertConfig, exist_ok=True)
AutoModelForSequenceClassification.register(
    DepthStopBertConfig, DepthStopBertForSequenceClassification, exist_ok=True
)

__all__ = [
    "STOPPING_RULES",
    "CalibrationReport",
    "DepthLossSpec",
    "DepthStopBertConfig",
    "DepthStopBertForSequenceClassification",
    "DepthStopSequenceClassifierOutput",
    "DepthStopTrainer",
    "DepthStopTrainingArguments",
    "__version__",
    "calibrate",
    "compare_rules",
    "depth_stop_loss",
]
