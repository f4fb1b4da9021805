from .configuration_depthstop_bert import DepthStopBertConfig
from .modeling_depthstop_bert import DepthStopBertForSequenceClassification


__all__ = ["DepthStopBertConfig", "DepthStopBertForSequenceClassification"]
