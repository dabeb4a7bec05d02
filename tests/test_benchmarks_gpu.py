"""benchmarks/gpu.py runs end to end on CPU in its tiny mode, and says so in one line without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu  # noqa: E402


def test_tiny_cpu_run(capsys):
    assert gpu.main(["--tiny", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert set(gpu.IMPLS) <= set(rows)
    for name in gpu.IMPLS:
        cells = [c.strip() for c in rows[name].strip("|").split("|")]
        assert "skipped" not in cells[1]
        assert float(cells[3].replace(",", "")) > 0  # tokens/s
        assert cells[4] == "n/a"  # no peak rate known for a CPU: no MFU
    # the bf16 rows start from the same weights and batch: their first losses agree
    loss = {n: float(rows[n].strip("|").split("|")[1]) for n in gpu.IMPLS}
    assert loss["moelab bf16"] == pytest.approx(loss["transformers bf16"], rel=gpu.BF16_LOSS_RTOL)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_no_gpu_message(capsys):
    assert gpu.main([]) == 1
    out = capsys.readouterr().out.strip()
    assert out == gpu.NO_GPU and "\n" not in out
