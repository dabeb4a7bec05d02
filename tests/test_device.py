"""train.dtype=bf16 on a CPU without bf16 matrix instructions warns once (moelab.train.device)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from moelab.train import device as device_mod
from moelab.train.device import autocast_for


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with torch capability `cap` and /proc/cpuinfo flags `flags`; returns a setter."""
    monkeypatch.setattr(device_mod, "_warned_slow_bf16", False)

    def set_cpu(cap: str, flags: set[str]):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
        monkeypatch.setattr(device_mod, "_cpu_flags", lambda: flags)

    return set_cpu


def warnings_of(dtype: str, calls: int = 3) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            with autocast_for(SimpleNamespace(dtype=dtype), torch.device("cpu")):
                pass
    return [str(w.message) for w in caught]


@pytest.mark.parametrize(
    "cap, flags",
    [("AVX2", {"avx2", "fma"}), ("AVX2", {"avx2", "avx512_bf16"}), ("AVX512", {"avx512f", "avx512bw"})],
    ids=["avx2", "avx2-kernels-forced", "avx512-without-bf16"],
)
def test_bf16_on_a_cpu_without_bf16_instructions_warns_once_with_the_slowdown(cpu, cap, flags):
    cpu(cap, flags)
    caught = warnings_of("bf16")
    assert len(caught) == 1
    assert device_mod.SLOW_BF16_FACTOR in caught[0] and "fp32" in caught[0]


@pytest.mark.parametrize(
    "cap, flags", [("AVX512", {"avx512f", "avx512_bf16"}), ("AVX512", {"amx_bf16"}), ("AVX512", set())]
)
def test_no_warning_with_bf16_instructions_or_in_fp32(cpu, cap, flags):
    cpu(cap, flags)
    assert warnings_of("bf16") == []
    cpu("AVX2", {"avx2"})
    assert warnings_of("fp32") == [] and warnings_of("auto") == []  # auto is fp32 on CPU
