"""`moelab report`: one self-contained HTML file about one or several runs, readable offline.

Reads only what a run leaves behind (metrics.jsonl, config.yaml, the latest checkpoint's tokenizer)
and the routing traces written by `moelab trace` (RUN_DIR/trace and RUN_DIR/trace-contextual by
default). Plots are drawn on private matplotlib Figures with the Agg canvas (no pyplot state, so a
notebook's backend is left alone) and embedded as base64 PNG; the page has no script and no external
reference. All text that comes from a run (names, tokens, domains, words) is HTML-escaped. A missing
input turns its section into a note that names the command producing it.

Long runs stay cheap: per-step arrays (expert loads, MaxVio, biases) are averaged into a bounded
number of bins while metrics.jsonl is read, and traces are analysed by the vectorised functions of
`moelab.interp.metrics`.

This module holds the entry points (`build_report`, `cmd_report`) and re-exports the public names.
The work is split by job, each module importing only the ones listed after it:

- `html`: the page: one function per section, tables, expert cards, CSS, assembly (`render_html`);
- `compare`: the comparison section, one row per metric with its random-routing value;
- `structure`: load per expert width and tree routing (per-depth specialization, the path tree);
- `plots`: the matplotlib figures, embedded as PNG;
- `runs`: reading a run directory (config, binned metrics.jsonl, tokenizer, traces), headline numbers;
- `cards`: the tokens each expert over-receives and where they occur;
- `fmt`: HTML escaping and number formatting.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from moelab.errors import MoelabError
from moelab.interp.report.cards import (
    CONTEXT_LEFT,
    CONTEXT_RIGHT,
    MAX_CARDS,
    MIN_COUNT,
    N_EXAMPLES,
    TOP_TOKENS,
    expert_top_tokens,
)
from moelab.interp.report.html import REPORT_SIGNATURE, SECTIONS, render_html
from moelab.interp.report.plots import DPI
from moelab.interp.report.runs import (
    CONTEXTUAL_TRACE,
    DATA_TRACE,
    HEATMAP_BINS,
    LINE_BINS,
    Metrics,
    Run,
    _run_names,
    headline,
    load_run,
    read_metrics,
    refuse_non_run,
)
from moelab.io import atomic_file, refuse_foreign_file

log = logging.getLogger(__name__)

# The settings re-exported here (MIN_COUNT, HEATMAP_BINS, ...) are read in the module that defines them:
# to change one at run time, set it there (e.g. `moelab.interp.report.runs.LINE_BINS`).
__all__ = [
    "CONTEXTUAL_TRACE",
    "CONTEXT_LEFT",
    "CONTEXT_RIGHT",
    "DATA_TRACE",
    "DPI",
    "HEATMAP_BINS",
    "LINE_BINS",
    "MAX_CARDS",
    "MIN_COUNT",
    "N_EXAMPLES",
    "SECTIONS",
    "TOP_TOKENS",
    "Metrics",
    "Run",
    "build_report",
    "cmd_report",
    "expert_top_tokens",
    "headline",
    "load_run",
    "read_metrics",
    "render_html",
]


def build_report(
    run_dirs, out: str | Path | None = None, traces=None, min_count: int = MIN_COUNT, progress: bool = True
) -> Path:
    """Write the HTML report of one or several runs and return its path.

    run_dirs: one run directory or a list (several get a side-by-side comparison). out: the HTML file
    (default FIRST_RUN/report.html). traces: none, or one entry per run: a trace directory or a
    comma-separated "DATA_TRACE,CONTEXTUAL_TRACE" pair (the kind is read from meta.json); a kind not
    given falls back to RUN/trace or RUN/trace-contextual when they exist.
    """
    paths = [Path(p) for p in ([run_dirs] if isinstance(run_dirs, str | Path) else run_dirs)]
    if not paths:
        raise MoelabError("no run directory given; pass at least one, e.g. moelab report runs/demo")
    for path in paths:
        if not path.is_dir():
            raise MoelabError(
                f"run directory {path} does not exist; pass a directory written by moelab train"
            )
        refuse_non_run(path)
    traces = [] if traces is None else [traces] if isinstance(traces, str | Path) else list(traces)
    if traces and len(traces) != len(paths):
        raise MoelabError(
            f"{len(traces)} --trace for {len(paths)} run(s): give one --trace per run, in the runs' order, "
            "or none"
        )
    if min_count < 1:
        raise MoelabError(f"min_count must be >= 1, got {min_count}")
    per_run = [[Path(p) for p in str(t).split(",") if p] for t in traces] or [[] for _ in paths]
    out = Path(out) if out is not None else paths[0] / "report.html"
    if out.is_dir():
        raise MoelabError(f"--out {out} is a directory; give a file such as {out / 'report.html'}")
    refuse_foreign_file(out, REPORT_SIGNATURE, "moelab report")
    t0 = time.perf_counter()
    names = _run_names(paths)
    runs = [load_run(p, name, t, min_count, progress) for p, name, t in zip(paths, names, per_run)]
    page = render_html(runs)
    with atomic_file(out, encoding="utf-8") as fh:
        fh.write(page)
    log.info("report of %d run(s) in %.1f s: %s", len(runs), time.perf_counter() - t0, out)
    return out


def cmd_report(args) -> None:
    """`moelab report RUN_DIR [RUN_DIR ...] [--out FILE.html] [--trace DIR ...]`."""
    from moelab.cli import show_progress

    out = build_report(args.runs, out=args.out, traces=args.trace or None, progress=show_progress(args))
    print(f"wrote {out}")
