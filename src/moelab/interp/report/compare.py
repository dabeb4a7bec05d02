"""The comparison section: several runs side by side, one row per metric, each with its random baseline.

Rows come from each run's metrics.jsonl (losses, per-domain validation loss, MaxVio_global) and its
traces' analysis (balance, specialization, continuity, routes, TIS/ICS, and the structure metrics of
tree or mixed-width runs); a row appears when at least one run has the value, and a run without it
shows "–". The last column is the metric's value under random routing, computed from each run's
shape (E, k, tree); where runs differ it lists them in run order.
"""

from __future__ import annotations

import math

from moelab.interp.report.fmt import _code, _esc, _mean, _num
from moelab.interp.report.plots import _draw_comparison, _img
from moelab.interp.report.runs import Run, headline
from moelab.interp.structure import TOP_PATHS


def _metrics(run: Run) -> dict[str, tuple]:
    """label -> (value, random baseline or None, format) for one run; absent values are left out."""
    h, r, m = headline(run), run.analysis, run.metrics
    out: dict[str, tuple] = {
        "steps": (h["steps"], None, ","),
        "tokens": (h["tokens"], None, ","),
        "final train loss": (h["train_loss"], None, ".4f"),
        "final val loss": (h["val_loss"], None, ".4f"),
    }
    val = [v for v in (m.val if m else []) if isinstance(v.get("domain_loss"), dict)]
    for name, loss in sorted(val[-1]["domain_loss"].items()) if val else ():
        out[f"val loss · {name}"] = (loss, None, ".4f")
    out["MaxVio_global (val, mean over layers)"] = (h["max_vio_global"], 0.0, ".3f")
    if r is None:
        return out
    E, k = r["n_experts"], r["top_k"]
    rows = r["layers"]
    out["MaxVio (trace)"] = (h["trace_max_vio"], 0.0, ".3f")
    out["domain max share"] = (h["domain_max"], k / E, ".3f")
    out["vocab spec. (raw)"] = (_mean([row["vocab_specialization"]["raw"] for row in rows]), k / E, ".3f")
    out["vocab spec. (normalized)"] = (h["vocab_normalized"], 0.0, ".3f")
    out["continuity → next"] = (h["continuity"], 1 - math.comb(E - k, k) / math.comb(E, k), ".3f")
    out["route entropy (normalized)"] = (h["path_entropy"], None, ".3f")
    for row in rows[:1]:
        if "width_load" in row:
            for g, width in enumerate(row["width_load"]["widths"]):
                load = _mean([x["width_load"]["load"][g] for x in rows])
                base = _mean([x["width_load"]["expert_share"][g] for x in rows])
                out[f"load share · width {width}"] = (load, base, ".3f")
    tree = r.get("tree")
    if tree:
        b, D = tree["branches"], tree["depth"]
        paths = tree["paths"]
        out[f"path top-{TOP_PATHS} share"] = (
            _mean([p["top_share"] for p in paths]),
            min(1.0, TOP_PATHS / b**D),
            ".3f",
        )
        out["path entropy / log2 b^D"] = (_mean([p["norm_entropy"] for p in paths]), 1.0, ".3f")
        spec = tree["depth_specialization"]
        for d in range(D if spec is not None else 0):
            share = _mean([layer[d] for layer in spec["max_share"]])
            out[f"domain max share · depth {d + 1}"] = (share, _mean([x[d] for x in spec["baseline"]]), ".3f")
    return out


def _contextual(run: Run) -> dict[str, tuple]:
    if run.ctx is None:
        return {}
    return {
        f"{key.upper()} (mean)": (_mean([_mean(v) for v in run.ctx[key].values()]), None, ".3f")
        for key in ("tis", "ics")
    }


def comparison_rows(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    """(headers, rows): metric, one column per run, random routing."""
    per_run = [{**_metrics(run), **_contextual(run)} for run in runs]
    labels = list(dict.fromkeys(label for metrics in per_run for label in metrics))
    rows = []
    for label in labels:
        cells, bases = [], []
        for metrics in per_run:
            value, base, spec = metrics.get(label, (None, None, ".3f"))
            cells.append(_num(value, spec))
            if base is not None and not (isinstance(base, float) and math.isnan(base)):
                bases.append(_num(base, spec))
        rows.append([label, *cells, " / ".join(dict.fromkeys(bases)) or "–"])
    return ["metric", *(run.name for run in runs), "random routing"], rows


def comparison(runs: list[Run]) -> str:
    if len(runs) < 2:
        example = _code("moelab report RUN_A RUN_B --out FILE.html")
        text = f"one run: give several run directories ({example}) to compare them side by side"
        return f'<p class="note">{text}</p>'
    headers, rows = comparison_rows(runs)
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    table = f'<div class="scroll"><table class="compare"><thead><tr>{head}</tr></thead>'
    table += f"<tbody>{body}</tbody></table></div>"
    return (
        _img("training and validation loss of every run", _draw_comparison, runs)
        + table
        + '<p class="note">Trace rows are means over layers and need each run\'s data trace (TIS/ICS: its '
        "contextual trace, mean over words). Domain max share: for each layer and domain, the share of the "
        "domain's tokens that its most used expert receives. Random routing: the value when every token "
        "draws its experts uniformly (for tree runs: descends uniformly); TIS/ICS have no closed-form "
        "baseline (sampling noise keeps them above 0).</p>"
    )
