"""Where and in which precision a model runs: the same rule for training, evaluation and analysis."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from moelab.errors import MoelabError


def resolve_device(tc) -> torch.device:
    if tc.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tc.device == "cuda" and not torch.cuda.is_available():
        raise MoelabError("train.device=cuda but no CUDA device is available; use train.device=cpu")
    return torch.device(tc.device)


# The measurement (one training step of configs/tiny-cpu.yaml, 2-core AVX2 CPU); the same step
# restricted to AVX2 kernels on a 2-core AVX512-BF16 EPYC: 4.7× (benchmarks/bf16_cpu.py, docs/BENCHMARKS.md).
SLOW_BF16_WARNING = (
    "train.dtype=bf16 on a CPU without bf16 matrix instructions (AVX512-BF16 or AMX): autocast emulates "
    "bf16, and on a 2-core AVX2 CPU a bf16 autocast training step of the demo model ran about {slowdown} "
    "slower than fp32 (4.7× with AVX2-only kernels on a 2-core EPYC; docs/BENCHMARKS.md); "
    "train.dtype=fp32 is faster here"
)
SLOW_BF16_FACTOR = "12×"
_warned_slow_bf16 = False


def _cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read: not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """Whether torch's CPU kernels can use bf16 matrix instructions here. torch's dispatch level says
    whether AVX512 kernels run at all (AVX2 or below: no); AVX512 does not imply bf16 (Skylake has none),
    so the flags avx512_bf16 / amx_bf16 decide, or `bf16` on ARM; without /proc/cpuinfo, assume yes."""
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", "SVE256", ...
    if capability in ("DEFAULT", "AVX2", "VSX", "ZVECTOR"):
        return False
    flags = _cpu_flags()
    return not flags or bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def autocast_for(tc, device: torch.device):
    """bf16 autocast on GPU (auto or bf16); fp32 otherwise. bf16 on a CPU without bf16 instructions
    warns once: it runs, but many times slower than fp32."""
    global _warned_slow_bf16
    use_bf16 = tc.dtype == "bf16" or (tc.dtype == "auto" and device.type == "cuda")
    if use_bf16:
        if device.type == "cpu" and not _warned_slow_bf16 and not cpu_has_bf16():
            _warned_slow_bf16 = True
            warnings.warn(SLOW_BF16_WARNING.format(slowdown=SLOW_BF16_FACTOR), stacklevel=2)
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
