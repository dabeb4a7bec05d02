"""The report's parts about expert structure: load per width group (mixed expert widths) and tree routing.

They read the `width_load` rows and the `tree` entry of a run's `metrics.analyze` result (see
moelab.interp.structure) and the `width_load` telemetry binned from metrics.jsonl, and return HTML to
append to the balance and specialization sections; a run without that structure gets nothing.
The path tree is a nested HTML list (no script), each node with the share of tokens reaching it.
"""

from __future__ import annotations

import numpy as np

from moelab.interp.report.fmt import _esc, _num
from moelab.interp.report.plots import _draw_width_load, _img
from moelab.interp.report.runs import Run
from moelab.interp.structure import TOP_PATHS


def _table(headers, rows) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    table = f'<table class="compact"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def width_balance(run: Run) -> str:
    """Balance section: load per width group over training, from the telemetry (mixed widths only)."""
    m = run.metrics
    series = None if m is None else m.layers.get("width_load")
    groups = (m.last_train or {}).get("width_groups") if m is not None else None
    if series is None or not isinstance(groups, dict):
        return ""
    return _img("load per expert width over training", _draw_width_load, series, groups)


def width_table(run: Run) -> str:
    """Specialization section: per layer, each width's share of assignments vs its share of experts."""
    r = run.analysis
    if r is None or "width_load" not in r["layers"][0]:
        return ""
    widths = sorted({w for row in r["layers"] for w in row["width_load"]["widths"]})
    rows = []
    for row in r["layers"]:
        w = row["width_load"]
        cells = {width: f"{_num(load)} ({_num(base)})" for width, load, base in
                 zip(w["widths"], w["load"], w["expert_share"])}  # fmt: skip
        rows.append([row["layer"], *(cells.get(width, "–") for width in widths)])
    return (
        "<h4>Load per expert width (from the data trace)</h4>"
        + _table(["layer", *(f"width {w}" for w in widths)], rows)
        + '<p class="note">Share of the layer\'s top-k assignments going to experts of each hidden width; '
        "in brackets the width's share of experts, what perfectly balanced routing gives.</p>"
    )


def _tree_html(node: dict, b: int) -> str:
    """A nested list of the reached nodes: label, share of tokens reaching it, a bar."""
    share = node["share"]
    width = 0.0 if share is None else max(0.0, min(1.0, share)) * 100
    bar = f'<span class="bar"><span class="fill" style="width:{width:.1f}%"></span></span>'
    label = _esc(node["label"])
    item = f'<span class="node">{label}</span> {bar} <span class="muted">{_num(share, ".1%")}</span>'
    kids = "".join(_tree_html(child, b) for child in node["children"])
    return f'<li data-node="{node["node"]}">{item}' + (f"<ul>{kids}</ul>" if kids else "") + "</li>"


def tree_section(run: Run) -> str:
    """Specialization section of a tree run: per-depth domain specialization and the path tree."""
    r = run.analysis
    tree = None if r is None else r.get("tree")
    if not tree:
        return ""
    b, D = tree["branches"], tree["depth"]
    out = [f"<h4>Tree routing: {b} branches, depth {D}</h4>"]
    spec = tree["depth_specialization"]
    if spec is not None:
        rows = [
            [layer, *(f"{_num(s)} ({_num(base)})" for s, base in zip(shares, bases))]
            for layer, (shares, bases) in enumerate(zip(spec["max_share"], spec["baseline"]))
        ]
        out.append(_table(["layer", *(f"depth {d}" for d in range(1, D + 1))], rows))
        out.append(
            '<p class="note">Domain max share per depth: for each domain, the largest share of its tokens '
            "that one expert of that depth receives, averaged over domains; in brackets the random-routing "
            "share (the depth's assignments spread evenly over its experts).</p>"
        )
    rows = []
    for layer, p in enumerate(tree["paths"]):
        rows.append([layer, f"{p['routed']:,}", f"{p['distinct']:,}", _num(p["top_share"]),
                     f"{p['cover_80']:,}", _num(p["norm_entropy"])])  # fmt: skip
    headers = ["layer", "routed tokens", "distinct paths", f"top-{TOP_PATHS} share", "paths covering 80%"]
    out.append(_table([*headers, "entropy / log2 b^D"], rows))
    random_top = min(1.0, TOP_PATHS / b**D)
    out.append(
        f'<p class="note">A token\'s path is the set of tree edges (experts) it used, named by its end '
        f"nodes (branch choices from the root). Uniform random descent: top-{TOP_PATHS} share "
        f"{random_top:.3f}, normalised entropy 1.</p>"
    )
    for layer, p in enumerate(tree["paths"]):
        top = [[i + 1, " + ".join(t["labels"]), _num(t["share"], ".1%")] for i, t in enumerate(p["top"])]
        listed = _table(["#", "path", "tokens"], top)
        nested = f'<ul class="tree">{_tree_html(p["tree"], b)}</ul>'
        opened = " open" if layer == 0 else ""
        out.append(
            f"<details{opened}><summary>Layer {layer}: most used paths and the share of tokens reaching each "
            f'node</summary><div class="paths" data-layer="{layer}">{listed}{nested}</div></details>'
        )
    return "".join(out)


CSS = """
ul.tree, ul.tree ul { list-style: none; margin: 0; padding-left: 18px; border-left: 1px solid var(--line); }
ul.tree { padding-left: 4px; border: 0; }
ul.tree li { margin: 1px 0; font-size: 13px; white-space: nowrap; }
ul.tree .node { font-family: ui-monospace, "DejaVu Sans Mono", monospace; display: inline-block;
                min-width: 70px; }
div.paths { display: flex; gap: 28px; align-items: flex-start; flex-wrap: wrap; }
"""


def mean_top_share(result: dict) -> float | None:
    """Mean over layers of the top-paths share of a tree result (None without tree)."""
    tree = result.get("tree") if result else None
    if not tree:
        return None
    values = [p["top_share"] for p in tree["paths"] if p["top_share"] is not None]
    return float(np.mean(values)) if values else None
