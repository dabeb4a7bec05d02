"""What the report knows about a run directory, and the numbers that sum a run up.

`read_metrics` parses metrics.jsonl in one pass and averages the per-step arrays (expert loads, MaxVio,
router entropy, bias ranges) into a bounded number of bins, so memory does not grow with the run's
length. `load_run` reads config.yaml, the latest checkpoint's tokenizer and the routing traces (given
with --trace, or found at RUN/trace and RUN/trace-contextual), analyses the traces and computes the
expert cards. A missing or unreadable input becomes a note (HTML) naming the command that produces it;
a trace that does not match the run becomes a warning. `headline` gives the comparison table's numbers.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moelab.errors import MoelabError
from moelab.interp.report.cards import MIN_COUNT, _domain_max, _expert_cards
from moelab.interp.report.fmt import _code, _esc, _mean

log = logging.getLogger(__name__)
REPORT_NULLS = 3  # permutation / label-shuffle nulls next to every headline number (nulls.py)

DATA_TRACE, CONTEXTUAL_TRACE = "trace", "trace-contextual"  # default trace directories inside a run
HEATMAP_BINS, LINE_BINS = 300, 1000  # step bins of the load heatmaps and of per-layer lines


# ----------------------------------------------------------------------------- metrics.jsonl


class _Binned:
    """Running means of a fixed-shape array over bins of consecutive log lines.

    When 2·max_bins bins exist, neighbours merge and the bin width doubles: memory stays bounded for
    runs of any length, and every line still counts."""

    def __init__(self, max_bins: int):
        self.max_bins, self.width, self.shape = max_bins, 1, None
        self.sums: list[np.ndarray] = []
        self.counts: list[int] = []
        self.steps: list[float] = []  # sum of the steps in each bin

    def add(self, step: float, value) -> None:
        try:
            value = np.asarray(value, dtype=np.float64)
        except (ValueError, TypeError):
            return  # ragged or not numbers
        self.shape = value.shape if self.shape is None else self.shape
        if value.shape != self.shape:
            return
        if self.sums and self.counts[-1] < self.width:
            self.sums[-1] = self.sums[-1] + value
            self.counts[-1] += 1
            self.steps[-1] += step
            return
        if len(self.sums) == 2 * self.max_bins:  # every bin is full: merge neighbours
            self.sums = [a + b for a, b in zip(self.sums[0::2], self.sums[1::2])]
            self.counts = [a + b for a, b in zip(self.counts[0::2], self.counts[1::2])]
            self.steps = [a + b for a, b in zip(self.steps[0::2], self.steps[1::2])]
            self.width *= 2
        self.sums.append(value)
        self.counts.append(1)
        self.steps.append(float(step))

    def result(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean step of each bin (n,), mean value of each bin (n, *shape)), or None when empty."""
        if not self.sums or not self.sums[0].size:
            return None
        n = np.asarray(self.counts, dtype=np.float64)
        return np.asarray(self.steps) / n, np.stack(self.sums) / n.reshape(-1, *([1] * len(self.shape)))


@dataclass
class Metrics:
    """What metrics.jsonl says: scalar train series, binned per-layer series, validation lines."""

    train: dict[str, tuple[np.ndarray, np.ndarray]]  # key -> (steps (n,), values (n,))
    layers: dict[str, tuple[np.ndarray, np.ndarray]]  # load (n, L, E), max_vio (n, L), bias_range (n, L, 2),
    # width_load (n, L, G) for mixed expert widths (the widths: last_train["width_groups"])
    # dead_experts (n, L), load_pct (n, L, P): over each line's window, when logged
    val: list[dict]
    last_train: dict | None
    nonfinite: int
    unreadable: int


def _shares(counts) -> np.ndarray | None:
    """(L, E) expert counts of one step -> each expert's share of its layer's assignments."""
    try:
        c = np.asarray(counts, dtype=np.float64)
    except (ValueError, TypeError):
        return None
    if c.ndim != 2:
        return None
    total = c.sum(axis=1, keepdims=True)
    return np.divide(c, total, out=np.zeros_like(c), where=total > 0)


def read_metrics(path: str | Path) -> Metrics:
    """Parse a run's metrics.jsonl; lines that are not JSON objects with a step are counted and skipped."""
    scalars: dict[str, tuple[list, list]] = {}
    bins = {"load": _Binned(HEATMAP_BINS)}
    per_layer = ("max_vio", "router_entropy", "bias_range", "width_load", "dead_experts", "load_pct")
    bins.update({key: _Binned(LINE_BINS) for key in per_layer})
    val, last_train, nonfinite, unreadable = [], None, 0, 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int | float):
                unreadable += 1
                continue
            kind, step = rec.get("type"), rec["step"]
            if kind == "val":
                val.append(rec)
            elif kind == "nonfinite":
                nonfinite += 1
            elif kind == "train":
                last_train = rec
                for key, value in rec.items():
                    if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                        steps, values = scalars.setdefault(key, ([], []))
                        steps.append(step)
                        values.append(value)
                layers = rec.get("layers") if isinstance(rec.get("layers"), dict) else {}
                if (shares := _shares(layers.get("counts"))) is not None:
                    bins["load"].add(step, shares)
                for key in per_layer:
                    if layers.get(key) is not None:
                        bins[key].add(step, layers[key])
    train = {key: (np.asarray(s, float), np.asarray(v, float)) for key, (s, v) in scalars.items()}
    binned = {key: result for key, b in bins.items() if (result := b.result()) is not None}
    val.sort(key=lambda r: r["step"])
    return Metrics(train, binned, val, last_train, nonfinite, unreadable)


# ----------------------------------------------------------------------------- a run


@dataclass
class Run:
    """Everything the report knows about one run directory."""

    path: Path
    name: str
    config: dict = field(default_factory=dict)  # config.yaml: {"model": {...}, "moe": {...}, ...}
    metrics: Metrics | None = None
    checkpoint: Path | None = None
    checkpoint_step: int | None = None
    tokenizer: object | None = None  # moelab.data.tokenizer.MoeTokenizer
    trace: object | None = None  # moelab.interp.metrics.Trace of tokenized data
    ctx_trace: object | None = None  # a trace of the contextual-token set
    analysis: dict | None = None  # metrics.analyze(trace)
    ctx: dict | None = None  # {"tis": {word: [L]}, "ics": {word: [L]}}
    cards: dict | None = None  # see cards._expert_cards
    lens: dict | None = None  # RUN/lens.json of `moelab lens`, shown in the expert cards
    notes: dict[str, str] = field(default_factory=dict)  # input -> HTML note saying how to produce it
    warnings: list[str] = field(default_factory=list)  # HTML

    def cfg(self, dotted: str, default="–"):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _read_config(run: Run) -> None:
    import yaml

    path = run.path / "config.yaml"
    if not path.is_file():
        run.notes["config"] = f"no config.yaml in {_code(run.path)}; {_code('moelab train')} writes it"
        return
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = _esc(str(e).splitlines()[0])
        run.notes["config"] = f"{_code(path)} is not readable YAML ({first})"
        return
    run.config = data if isinstance(data, dict) else {}


def _read_tokenizer(run: Run) -> None:
    """The tokenizer of the run's newest complete checkpoint (the one every command uses)."""
    from moelab.checkpoint import checkpoint_step, run_checkpoints
    from moelab.data.tokenizer import load_tokenizer

    found = run_checkpoints(run.path)
    if not found:
        run.notes["tokenizer"] = (
            f"no complete checkpoint in {_code(run.path / 'checkpoints')}, so tokens are shown as "
            f"ids; {_code('moelab train')} saves the tokenizer with every checkpoint"
        )
        return
    run.checkpoint = found[-1]
    run.checkpoint_step = checkpoint_step(run.checkpoint)
    if not (run.checkpoint / "tokenizer.json").is_file():
        run.notes["tokenizer"] = f"{_code(run.checkpoint)} has no tokenizer.json, so tokens are shown as ids"
        return
    try:
        run.tokenizer = load_tokenizer(run.checkpoint)
    except MoelabError as e:
        run.notes["tokenizer"] = f"{_esc(str(e))}; tokens are shown as ids"


def _trace_kind(path: Path) -> str:
    """'contextual' or 'data', from meta.json (unreadable metadata counts as data: Trace.open explains)."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return "data"
    return "contextual" if isinstance(meta, dict) and meta.get("contextual") else "data"


def _open_traces(run: Run, explicit: list[Path]) -> None:
    """Traces given with --trace must open; the defaults RUN/trace and RUN/trace-contextual are optional."""
    from moelab.interp.metrics import Trace

    given: dict[str, Path] = {}
    for path in explicit:
        kind = _trace_kind(path)
        if kind in given:
            raise MoelabError(
                f"--trace gives two {kind} traces for {run.path} ({given[kind]} and {path}); give one of each"
            )
        given[kind] = path
    for kind, default, attr in (("data", DATA_TRACE, "trace"), ("contextual", CONTEXTUAL_TRACE, "ctx_trace")):
        if kind in given:
            setattr(run, attr, Trace.open(given[kind]))  # a path the user typed must work
            continue
        path = run.path / default
        if not path.exists():
            continue
        if _trace_kind(path) != kind:
            run.warnings.append(f"{_code(path)} is not a {kind} trace; it is left out")
            continue
        try:
            setattr(run, attr, Trace.open(path))
        except MoelabError as e:
            run.warnings.append(_esc(str(e)))


def _check_trace(run: Run, trace, what: str) -> None:
    """Warn when a trace does not describe this run's model, tokenizer or latest checkpoint."""
    shape = tuple(run.cfg(f"model.{key}", None) for key in ("n_layers", "n_experts", "top_k"))
    if shape[0] is not None and (trace.n_layers, trace.n_experts, trace.top_k) != shape:
        run.warnings.append(
            f"the {what} trace {_code(trace.name)} has {trace.n_layers} layers × {trace.n_experts} experts, "
            f"top-{trace.top_k}, but the run's config has {shape[0]} × {shape[1]}, top-{shape[2]}"
        )
    step = trace.meta.get("checkpoint_step")
    if step is not None and run.checkpoint_step is not None and step != run.checkpoint_step:
        run.warnings.append(
            f"the {what} trace was made at step {step} but the latest checkpoint is step "
            f"{run.checkpoint_step}: re-run {_code('moelab trace')} to describe the current model"
        )
    made_with = trace.meta.get("tokenizer_hash")
    if made_with and run.tokenizer is not None and made_with != run.tokenizer.hash:
        run.warnings.append(
            f"the {what} trace was made with another tokenizer than the checkpoint's: "
            "decoded tokens may be wrong"
        )


def refuse_non_run(path: Path) -> None:
    """Refuse a directory that another moelab command wrote (a report of it would be all dashes and its
    notes would suggest writing a run into it)."""
    if (path / "metrics.jsonl").is_file() or (path / "checkpoints").is_dir():
        return
    if (path / "model.safetensors").is_file():
        run = path.parent.parent if path.parent.name == "checkpoints" else "RUN_DIR"
        raise MoelabError(f"{path} is a checkpoint, not a run directory; pass its run: moelab report {run}")
    if (path / "meta.json").is_file():
        raise MoelabError(
            f"{path} is a routing trace, not a run directory; pass the run it was traced from: "
            f"moelab report RUN_DIR --trace {path}"
        )
    if (path / "metadata.json").is_file():
        raise MoelabError(
            f"{path} is a data directory (metadata.json), not a run directory; train on it with "
            f"`moelab train CONFIG --set data.path={path} --out runs/NAME`, then `moelab report runs/NAME`"
        )
    if (path / "tokenizer.json").is_file():
        raise MoelabError(f"{path} is a tokenizer directory, not a run directory; pass a run's directory")


def _run_names(paths: list[Path]) -> list[str]:
    """Directory names, with the parent's name where two runs share one."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def load_run(
    path: str | Path, name: str, traces: list[Path] = (), min_count: int = MIN_COUNT, progress: bool = True
) -> Run:
    """Read a run directory and analyse its traces (the slow part: seconds per million tokens)."""
    from moelab.interp.metrics import analyze, contextual

    path = Path(path)
    run = Run(path=path, name=name)
    _read_config(run)
    if (path / "metrics.jsonl").is_file():
        run.metrics = read_metrics(path / "metrics.jsonl")
        if run.metrics.unreadable:
            run.warnings.append(f"{run.metrics.unreadable} unreadable line(s) of metrics.jsonl were skipped")
    else:
        run.notes["metrics"] = (
            f"no metrics.jsonl in {_code(path)}: train with {_code(f'moelab train CONFIG --out {path}')} "
            "to get training curves and balance over time"
        )
    _read_tokenizer(run)
    if (path / "lens.json").is_file():
        try:
            run.lens = json.loads((path / "lens.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            run.warnings.append(f"{_code(path / 'lens.json')} is damaged; re-run moelab lens")
    _open_traces(run, list(traces))
    if run.trace is not None:
        _check_trace(run, run.trace, "data")
        t0 = time.perf_counter()
        run.analysis = analyze(
            run.trace, min_count=min_count, nulls=REPORT_NULLS, progress=progress and sys.stderr.isatty()
        )
        run.cards = _expert_cards(run.trace, run.analysis, min_count)
        log.info(
            "%s: analysed %s tokens in %.1f s", name, f"{run.trace.n_tokens:,}", time.perf_counter() - t0
        )
    else:
        command = f"moelab trace {path} --data DIR --out {path / DATA_TRACE}"
        run.notes["trace"] = (
            f"no data trace: run {_code(command)} (DIR: a directory from {_code('moelab data tokenize')}) "
            "to get specialization and expert cards"
        )
    if run.ctx_trace is not None:
        _check_trace(run, run.ctx_trace, "contextual")
        result = contextual(run.ctx_trace)
        run.ctx = {key: {word: v.tolist() for word, v in result[key].items()} for key in ("tis", "ics")}
    else:
        command = f"moelab trace {path} --contextual --out {path / CONTEXTUAL_TRACE}"
        run.notes["contextual"] = f"no contextual-token trace: run {_code(command)}"
    return run


# ----------------------------------------------------------------------------- headline numbers


def _final(m: Metrics | None, key: str, kind: str = "train"):
    record = (m.val[-1] if m.val else None) if kind == "val" and m else (m.last_train if m else None)
    return record.get(key) if record else None


def headline(run: Run) -> dict:
    """The comparison table's numbers for one run (None where the input is missing).

    max_vio_global: mean over layers of the last validation line's MaxVio_global; the others come from
    the data trace: means over layers of MaxVio, domain max share (baseline k/E), continuity to the next
    layer and normalized vocab specialization, and the normalized route entropy."""
    m, r = run.metrics, run.analysis
    val = [v for v in (m.val if m else []) if isinstance(v.get("max_vio_global"), list)]
    out = {
        "steps": _final(m, "step"),
        "tokens": _final(m, "tokens"),
        "train_loss": _final(m, "loss"),
        "val_loss": _final(m, "loss", "val"),
        "max_vio_global": _mean(val[-1]["max_vio_global"]) if val else None,
    }
    keys = ("trace_max_vio", "domain_max", "baseline", "continuity", "vocab_normalized", "path_entropy")
    out.update(dict.fromkeys(keys))
    if r is not None:
        rows = r["layers"]
        out["trace_max_vio"] = _mean([row["max_vio"] for row in rows])
        out["domain_max"] = _mean([_domain_max(r, layer) for layer in range(len(rows))])
        out["baseline"] = r["top_k"] / r["n_experts"]
        out["continuity"] = _mean([row["expert_continuity_next"] for row in rows])
        out["vocab_normalized"] = _mean([row["vocab_specialization"]["normalized"] for row in rows])
        out["path_entropy"] = r["paths"]["norm_entropy"]
    return {key: None if isinstance(v, float) and math.isnan(v) else v for key, v in out.items()}
