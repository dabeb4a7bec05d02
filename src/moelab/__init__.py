"""moelab: build, train and analyse interpretable Mixture-of-Experts language models.

import moelab
model = moelab.build(moelab.load_config("configs/tiny-cpu.yaml"))
model = moelab.load("runs/demo")          # a checkpoint dir or a run dir
out = model(input_ids, labels=targets)    # out.logits, out.loss, out.losses, out.routing
"""

from moelab.checkpoint import load, save_checkpoint
from moelab.config import Config, ModelConfig, MoEConfig, load_config
from moelab.models import build
from moelab.moe.routing import RoutingInfo

__version__ = "0.1.0"
__all__ = [
    "Config",
    "ModelConfig",
    "MoEConfig",
    "RoutingInfo",
    "build",
    "load",
    "load_config",
    "save_checkpoint",
]
