from .configuration_depthstop_resnet import DepthStopResNetConfig
from .modeling_depthstop_resnet import DepthStopResNetForImageClassification


__all__ = ["DepthStopResNetConfig", "DepthStopResNetForImageClassification"]
