"""The report's cross-layer transitions: P(expert j at l+1 | expert i at l) heatmaps, a table, and a
Sankey-style route diagram of the most common multi-layer top-1 routes.

They read the `transitions` and `routes` entries of a run's `metrics.analyze` result (see
moelab.interp.transitions) and return HTML for the specialization section; a trace with one MoE layer
gets nothing. The route diagram is a static image: one column per layer, a box per expert that some
drawn route uses, and one band per route whose width is its share of the drawn routes' tokens.
"""

from __future__ import annotations

import numpy as np

from moelab.interp.report.fmt import _esc, _num
from moelab.interp.report.plots import _grid, _img
from moelab.interp.report.runs import Run

_VARIANTS = {"top1": "top-1", "topk": "top-k"}


def _draw_transitions(result: dict, key: str):
    pairs = result["transitions"]["pairs"]
    fig, axes = _grid(len(pairs), 4, (3.0, 2.8))
    for pair, ax in zip(pairs, axes):
        image = ax.imshow(
            np.array(pair[key]["conditional"], dtype=np.float64), cmap="viridis", vmin=0, vmax=1
        )
        first, second = pair["layers"]
        ax.set(
            title=f"{first}→{second}: predictability {_num(pair[key]['predictability'])}",
            xlabel=f"expert j at layer {second}",
            ylabel=f"expert i at layer {first}",
        )
        ax.grid(False)
    fig.colorbar(image, ax=list(axes), label="P(j | i)", shrink=0.8)
    fig.suptitle(
        f"Cross-layer transitions ({_VARIANTS[key]}): P(expert j at l+1 | expert i at l); "
        f"independent layers: every row = the load of l+1 (blank rows: i never chosen)"
    )
    return fig


NODE_GAP = 0.04  # vertical space between two expert boxes of a column, in units of the drawn tokens
NODE_WIDTH = 0.14  # box width, in units of the distance between two layers


def route_layout(routes: list[dict], gap: float = NODE_GAP) -> tuple[list[dict], list[list[tuple]]]:
    """Where the route diagram puts things, in [0, 1 + gaps] vertical units.

    routes: [{"experts": [e_0, ..., e_{n-1}], "tokens"}] -> (nodes, bands): nodes = [{"column", "expert",
    "y0", "y1"}], boxes stacked in expert order with `gap` between them, each as tall as the share of
    the drawn tokens through it; bands[r][c] = (y0, y1) of route r at column c: inside its expert's box,
    routes stacked in the given order, so the bands of a box tile it exactly.
    """
    total = sum(r["tokens"] for r in routes)
    heights = [r["tokens"] / total for r in routes]
    n_columns = len(routes[0]["experts"])
    nodes, bands = [], [[None] * n_columns for _ in routes]
    for column in range(n_columns):
        y = 0.0
        for expert in sorted({r["experts"][column] for r in routes}):
            top = y
            for rank, route in enumerate(routes):
                if route["experts"][column] == expert:
                    bands[rank][column] = (y, y + heights[rank])
                    y += heights[rank]
            nodes.append({"column": column, "expert": expert, "y0": top, "y1": y})
            y += gap
    return nodes, bands


def _draw_routes(routes: dict):
    from matplotlib.patches import Rectangle

    from moelab.interp.report.plots import _colors, _figure

    drawn = routes["routes"]
    first, last = routes["layers"]
    nodes, bands = route_layout(drawn)
    n_columns = last - first + 1
    fig = _figure(min(2.0 + 1.6 * n_columns, 16.0), 4.8)
    ax = fig.subplots()
    colors = _colors(len(drawn))
    half = NODE_WIDTH / 2
    t = np.linspace(0.0, 1.0, 40)
    ease = 3 * t**2 - 2 * t**3  # smooth S-curve between two columns
    for rank, route in enumerate(drawn):
        for c in range(n_columns - 1):
            (a0, a1), (b0, b1) = bands[rank][c], bands[rank][c + 1]
            x = c + half + t * (1 - NODE_WIDTH)
            ax.fill_between(
                x, a0 + (b0 - a0) * ease, a1 + (b1 - a1) * ease, color=colors[rank], alpha=0.55, lw=0
            )
        y0, y1 = bands[rank][-1]
        ax.text(n_columns - 1 + half + 0.04, (y0 + y1) / 2, f"#{rank + 1} {route['share']:.1%}",
                va="center", fontsize=7)  # fmt: skip
    for node in nodes:
        ax.add_patch(Rectangle((node["column"] - half, node["y0"]), NODE_WIDTH, node["y1"] - node["y0"],
                               facecolor="0.25", edgecolor="none"))  # fmt: skip
        if node["y1"] - node["y0"] > 0.025:
            ax.text(node["column"], (node["y0"] + node["y1"]) / 2, f"E{node['expert']}", color="white",
                    ha="center", va="center", fontsize=7)  # fmt: skip
    height = max(node["y1"] for node in nodes)
    ax.set(xlim=(-0.3, n_columns - 1 + 0.75), ylim=(height + 0.02, -0.02), yticks=[])
    ax.set_xticks(range(n_columns), [f"layer {first + c}" for c in range(n_columns)])
    ax.grid(False)
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    covered = sum(r["tokens"] for r in drawn) / routes["routed"]
    ax.set_title(
        f"The {len(drawn)} most common top-1 routes through layers {first}–{last}: {covered:.1%} of routed "
        "tokens\nband width ∝ tokens; labels: rank and share of all routed tokens"
    )
    return fig


def _routes_figure(run: Run) -> str:
    """The route diagram, when the analysis has multi-layer routes ("" otherwise)."""
    routes = (run.analysis or {}).get("routes")
    if not routes or not routes["routes"] or routes["layers"][1] <= routes["layers"][0]:
        return ""
    first, last = routes["layers"]
    return _img(f"most common routes through layers {first}-{last}", _draw_routes, routes) + (
        '<p class="note">Each band is one route: the sequence of a token\'s top-1 experts over the layers; '
        "boxes are experts, as tall as the drawn tokens through them. Under random routing every route "
        f"has probability 1/E^{last - first + 1}; <code>moelab analyze --path-layers FIRST:LAST</code> "
        "picks the span.</p>"
    )


def transitions_section(run: Run) -> str:
    """Specialization section: the transition heatmaps (top-1, top-k) and per-pair entropies and links."""
    r = run.analysis
    pairs = [] if r is None else r.get("transitions", {}).get("pairs", [])
    if not pairs:
        return ""
    out = ["<h4>Cross-layer transitions: the expert at layer l+1 given the expert at layer l</h4>"]
    out += [
        _img(f"cross-layer transition heatmaps ({label})", _draw_transitions, r, key)
        for key, label in _VARIANTS.items()
    ]
    out.append(_routes_figure(run))
    headers = (
        "layers",
        "top-1 H(J|I)",
        "top-1 H(J)",
        "top-1 predictability",
        "top-k predictability",
        "strongest top-1 links i→j (joint, P(j|i))",
    )
    rows = []
    for pair in pairs:
        one, many = pair["top1"], pair["topk"]
        links = ", ".join(
            f"{x['from']}→{x['to']} ({_num(x['joint'])}, {_num(x['conditional'])})"
            for x in one["top_links"][:3]
        )
        rows.append(
            [
                f"{pair['layers'][0]}→{pair['layers'][1]}",
                _num(one["conditional_entropy"]),
                _num(one["marginal_entropy"]),
                _num(one["predictability"]),
                _num(many["predictability"]),
                links or "–",
            ]
        )
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    out.append(
        f'<div class="scroll"><table class="compact"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
        "</table></div>"
    )
    out.append(
        '<p class="note">entropies in bits; predictability = 1 − H(J|I)/H(J): 0 for independent layers '
        "(random routing), 1 when the expert at l decides the one at l+1 (top-1)</p>"
    )
    return "".join(out)
