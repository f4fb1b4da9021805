from .configuration_depthstop_llama import DepthStopLlamaConfig
from .modeling_depthstop_llama import DepthStopLlamaForCausalLM


__all__ = ["DepthStopLlamaConfig", "DepthStopLlamaForCausalLM"]
