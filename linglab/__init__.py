"""linglab: the Ling 2.0 recipe (BailingMoeV2, FP8, scaling laws, LPO/IcePop/C3PO++) in readable PyTorch."""

from linglab.checkpoint import from_pretrained, save_pretrained
from linglab.config import Config, ModelConfig, load_config
from linglab.model import LingForCausalLM, build_model

__all__ = ["Config", "LingForCausalLM", "ModelConfig", "build_model", "from_pretrained", "load_config",
           "save_pretrained"]
