"""`moelab analyze RUN --saturation`: router saturation over a run's kept checkpoints (the OLMoE curve).

The same tokens are traced through every kept checkpoint (RUN/checkpoints/step-NNNNNNN, see
`train.keep_last`) and each trace is compared with the final checkpoint's by `metrics.saturation`:
per layer, the share of tokens whose top-1 expert already matches the final one, and the mean top-k
overlap. The final checkpoint against itself scores exactly 1.

RUN/saturation.json ("moelab-saturation/1"):
    {"format", "run", "data", "split", "n_tokens", "reference_step",
     "steps": [s_0, ..., s_final],                 # kept checkpoints, oldest first
     "top1": [[L floats] per step], "topk": [[L floats] per step]}
RUN/saturation.png plots the per-layer curves (thin) and their mean (thick) against the step.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from moelab.errors import MoelabError
from moelab.io import atomic_file

FORMAT = "moelab-saturation/1"
JSON_NAME, PNG_NAME = "saturation.json", "saturation.png"
DEFAULT_MAX_TOKENS = 20_000


def _step(ckpt: Path) -> int:
    return int(ckpt.name.split("-", 1)[1])


def run_data_path(run_dir: Path) -> tuple[str, str]:
    """The tokenized data directory and validation split named in RUN/config.yaml."""
    from moelab.config import read_yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise MoelabError(f"no config.yaml in {run_dir}; pass --data DIR (a tokenized split)")
    try:
        data = read_yaml(path).get("data") or {}
    except MoelabError as e:
        raise MoelabError(f"{e}; or pass --data DIR") from None
    if not isinstance(data, dict):
        raise MoelabError(f"{path}: `data` is not a mapping; pass --data DIR")
    return str(data.get("path", "data/tokens")), str(data.get("val_split", "val"))


def saturation_series(
    run_dir: str | Path,
    data: str | Path | None = None,
    split: str | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 8,
    progress: bool = True,
) -> dict:
    """Trace the same tokens through every kept checkpoint of `run_dir`; saturation vs the final one."""
    from tqdm.auto import tqdm

    from moelab.interp.metrics import Trace, saturation
    from moelab.interp.trace import trace
    from moelab.train.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MoelabError(f"{run_dir} is not a run directory")
    ckpts = list_checkpoints(run_dir)
    if len(ckpts) < 2:
        raise MoelabError(
            f"{run_dir} has {len(ckpts)} kept checkpoint(s); saturation needs at least 2: "
            "train with a larger train.keep_last (and train.save_every > 0)"
        )
    if data is None:
        data, config_split = run_data_path(run_dir)
        split = split or config_split
    split = split or "val"
    with tempfile.TemporaryDirectory(prefix=".saturation-", dir=run_dir) as tmp:

        def traced(ckpt: Path) -> Trace:
            out = trace(
                ckpt, Path(tmp) / ckpt.name, data=data, split=split, max_tokens=max_tokens,
                batch_size=batch_size, progress=False,
            )  # fmt: skip
            return Trace.open(out)

        bar = tqdm(total=len(ckpts), desc="checkpoints", unit="ckpt", disable=not progress)
        with bar:
            ref = traced(ckpts[-1])  # the reference first: every other trace is compared with it
            bar.update(1)
            rows = {}
            for ckpt in ckpts[:-1]:
                rows[ckpt] = saturation(traced(ckpt), ref)
                bar.update(1)
            rows[ckpts[-1]] = saturation(ref, ref)
        n_tokens = ref.n_tokens
        del ref
    return {
        "format": FORMAT,
        "run": str(run_dir),
        "data": str(data),
        "split": split,
        "n_tokens": int(n_tokens),
        "reference_step": _step(ckpts[-1]),
        "steps": [_step(c) for c in ckpts],
        "top1": [[float(x) for x in rows[c]["top1"]] for c in ckpts],
        "topk": [[float(x) for x in rows[c]["topk"]] for c in ckpts],
    }


def write_json(result: dict, out: str | Path) -> Path:
    out = Path(out)
    with atomic_file(out) as fh:
        json.dump(result, fh, indent=2)
    return out


def plot(result: dict, out: str | Path) -> Path:
    """The saturation curves (top-1 and top-k panels): one thin line per layer, the mean thick."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = np.asarray(result["steps"])
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key, title in zip(fig.subplots(1, 2), ("top1", "topk"), ("top-1 saturation", "top-k saturation")):
        values = np.asarray(result[key], dtype=float)  # (steps, L)
        for layer in range(values.shape[1]):
            ax.plot(steps, values[:, layer], lw=0.8, alpha=0.5, label=f"layer {layer}")
        ax.plot(steps, np.nanmean(values, axis=1), lw=2.2, color="black", marker="o", label="mean")
        ax.set(title=title, xlabel="step", ylabel=f"agreement with step {result['reference_step']}")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    if values.shape[1] <= 12:
        ax.legend(fontsize=7, loc="lower right")
    out = Path(out)
    with atomic_file(out, "wb") as fh:
        fig.savefig(fh, format="png", dpi=110)
    fig.clear()
    return out


def table(result: dict) -> str:
    """One row per checkpoint: mean top-1 and top-k saturation, then top-1 per layer."""
    L = len(result["top1"][0]) if result["top1"] else 0
    head = f"{'step':>9}  {'top1':>6}  {'topk':>6}  " + "  ".join(f"{'L' + str(i):>5}" for i in range(L))
    lines = [f"saturation vs step {result['reference_step']} ({result['n_tokens']:,} tokens)", head]
    for step, top1, topk in zip(result["steps"], result["top1"], result["topk"]):
        per_layer = "  ".join(f"{x:5.3f}" for x in top1)
        lines.append(f"{step:>9}  {np.nanmean(top1):6.3f}  {np.nanmean(topk):6.3f}  {per_layer}")
    lines.append("(L<i>: top-1 saturation of layer i)")
    return "\n".join(lines)


def cmd_saturation(args) -> None:
    """`moelab analyze RUN --saturation [--data DIR] [--split S] [--max-tokens N] [--json]`."""
    from moelab.cli import show_progress

    run_dir = Path(args.trace)
    max_tokens = args.max_tokens if args.max_tokens is not None else DEFAULT_MAX_TOKENS
    result = saturation_series(
        run_dir,
        data=args.data,
        split=args.split,
        max_tokens=max_tokens,
        batch_size=args.batch_size,
        progress=show_progress(args),
    )
    write_json(result, run_dir / JSON_NAME)
    plot(result, run_dir / PNG_NAME)
    if args.json:
        print(json.dumps(result))
    else:
        print(table(result))
        print(f"wrote {run_dir / JSON_NAME} and {run_dir / PNG_NAME}")
