"""moelab: build, train and analyse interpretable Mixture-of-Experts language models.

    import moelab
    model = moelab.build(moelab.load_config("configs/tiny-cpu.yaml"))
    model = moelab.load("runs/demo")          # a checkpoint dir or a run dir
    out = model(input_ids, labels=targets)    # out.logits, out.loss, out.losses, out.routing

Names are imported lazily, so `import moelab` (and the CLI's start) does not pay for torch.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "moelab.config",
    "ModelConfig": "moelab.config",
    "MoEConfig": "moelab.config",
    "load_config": "moelab.config",
    "build": "moelab.models",
    "load": "moelab.checkpoint",
    "save_checkpoint": "moelab.checkpoint",
    "RoutingInfo": "moelab.moe.routing",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'moelab' has no attribute {name!r}")
