"""benchmarks/distributed.py: its throughput arithmetic on metrics.jsonl records (the runs themselves
are the 2-process tests of tests/test_distributed.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distributed  # noqa: E402


def test_throughput_median_after_warmup():
    # 1,000 tokens a step; step times 9 s (warm-up, left out), then 0.5, 0.25, 1.0 s
    records = [
        {"step": s, "tokens": 1000 * s, "step_time_s": t}
        for s, t in [(1, 9.0), (2, 0.5), (3, 0.25), (4, 1.0)]
    ]
    assert distributed.throughput(records, skip=1) == 2000.0  # median of 2000, 4000, 1000
    with pytest.raises(RuntimeError, match="too few"):
        distributed.throughput(records, skip=4)


def test_variants_are_named_for_the_command_line():
    assert all("," not in name for name in distributed.VARIANTS)  # --variants splits on commas
    assert next(iter(distributed.VARIANTS)) == "1 process (2 threads)"  # the reference of the ratios
