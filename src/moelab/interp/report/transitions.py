"""The report's cross-layer transitions: P(expert j at l+1 | expert i at l) heatmaps and a table.

They read the `transitions` entry of a run's `metrics.analyze` result (see moelab.interp.transitions)
and return HTML for the specialization section; a trace with one MoE layer gets nothing.
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
