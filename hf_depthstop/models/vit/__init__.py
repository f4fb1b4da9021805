from .configuration_depthstop_vit import DepthStopViTConfig
from .modeling_depthstop_vit import DepthStopViTExitHead, DepthStopViTForImageClassification


__all__ = ["DepthStopViTConfig", "DepthStopViTExitHead", "DepthStopViTForImageClassification"]
