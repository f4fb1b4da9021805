from .configuration_depthstop_gpt2 import DepthStopGPT2Config
from .modeling_depthstop_gpt2 import DepthStopGPT2LMHeadModel


__all__ = ["DepthStopGPT2Config", "DepthStopGPT2LMHeadModel"]
