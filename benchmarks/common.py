"""Helpers shared by the benchmark scripts: device sync, machine description, a grouped_mm call
counter, and rewriting one results block of docs/BENCHMARKS.md.

The scripts run as `python benchmarks/NAME.py`, so this folder is on sys.path: `from common import ...`.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from moelab.io import atomic_file


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so a timer measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    """The GPU name, or the CPU model with its cores and torch's thread count."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


class GroupedMMCounter:
    """Counts calls of torch._grouped_mm, which torch.nn.functional.grouped_mm calls (moelab and
    transformers both look it up at call time), so a silent fallback cannot be timed under its name."""

    def __enter__(self):
        self.calls = 0
        self._orig = getattr(torch, "_grouped_mm", None)
        if self._orig is None:  # an older torch: nothing can call it, the count stays 0
            return self

        def counted(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        torch._grouped_mm = counted
        return self

    def __exit__(self, *exc):
        if self._orig is not None:
            torch._grouped_mm = self._orig


def update_doc(
    path: Path,
    block: str,
    marker: str,
    heading: str,
    intro: str,
    after: str | None = None,
    new_doc: str = "# Benchmarks\n",
) -> None:
    """Replace the block between `<!-- {marker} start/end -->` in `path`, or add it at the end of the
    section `heading` (made with `intro` where absent: after the section `after` when present, else at
    the end of the file; a missing file starts as `new_doc`)."""
    start, end = f"<!-- {marker} start -->", f"<!-- {marker} end -->"
    wrapped = f"{start}\n{block}\n{end}"
    text = path.read_text() if path.exists() else new_doc
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + wrapped + rest.split(end, 1)[1]
    elif heading in text:
        head, rest = text.split(heading, 1)
        nxt = rest.find("\n## ")
        body, tail = (rest, "") if nxt < 0 else (rest[:nxt], rest[nxt:])
        text = head + heading + body.rstrip("\n") + "\n\n" + wrapped + "\n" + tail
    else:
        section = f"{heading}\n\n{intro}\n{wrapped}\n"
        at = text.find(after) if after else -1
        nxt = text.find("\n## ", at + len(after)) if at >= 0 else -1
        if nxt >= 0:
            text = text[: nxt + 1] + section + "\n" + text[nxt + 1 :]
        else:
            text = text.rstrip("\n") + "\n\n" + section
    with atomic_file(path) as fh:
        fh.write(text)
