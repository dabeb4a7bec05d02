"""The report's figures: matplotlib drawings embedded in the page as base64 PNG.

Each `_draw_*` function builds one Figure from data already read (a `runs.Metrics`, an `analyze`
result, loaded runs); `_img` draws it under the report's style and returns the <figure> element.
Figures are private Figure objects on the Agg canvas, never pyplot's, so a notebook's backend and state
are left alone, and matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np

from moelab.interp.report.fmt import _esc, _num
from moelab.interp.report.runs import Metrics, Run

DPI = 100
_STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 8.5,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.interpolation": "nearest",
}


def _label(text) -> str:
    """A name from a run as matplotlib text: a "$" is a dollar sign, not the start of TeX."""
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _img(alt: str, draw, *args) -> str:
    """draw(*args) -> Figure under the report's style, embedded as a PNG; the figure is closed after."""
    import matplotlib

    with matplotlib.rc_context(_STYLE):
        fig = draw(*args)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI)
        fig.clear()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}"></figure>'


def _grid(n: int, ncols: int, panel: tuple[float, float], extra: float = 1.0):
    """A figure with n panels in rows of ncols (the unused ones hidden), and a margin for a colorbar."""
    cols = min(ncols, n)
    rows = math.ceil(n / cols)
    fig = _figure(panel[0] * cols + extra, panel[1] * rows + 0.6)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _colors(n: int) -> list:
    import matplotlib

    if n <= 10:
        return [matplotlib.colormaps["tab10"](i) for i in range(n)]
    return [matplotlib.colormaps["viridis"](i / (n - 1)) for i in range(n)]


def _empty(ax, text: str = "not logged") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_xticks([])
    ax.set_yticks([])


def _legend(ax, n: int, outside: bool = False) -> None:
    if outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), ncol=1 if n <= 16 else 2)
    else:
        ax.legend()


def _floats(values) -> np.ndarray:
    return np.array([math.nan if v is None else v for v in values], dtype=np.float64)


_TRAINING_PANELS = (  # (keys and labels, title, y label, log scale)
    ((("lr", "learning rate"),), "Learning rate", "lr", False),
    ((("tokens_per_s", "tokens/s"),), "Throughput", "tokens / s", False),
    ((("load_balance", "load-balance term"),), "Load-balancing loss (balanced = 1)", "loss term", False),
    ((("router_z", "router z term"),), "Router z-loss", "loss term", False),
    (
        (("grad_norm", "total"), ("grad_norm_experts", "routed experts"), ("grad_norm_rest", "rest")),
        "Gradient norm (before clipping)",
        "norm",
        True,
    ),
)


def _draw_training(m: Metrics):
    fig = _figure(13, 6.6)
    axes = fig.subplots(2, 3).ravel()
    ax = axes[0]
    for key, label, ls in (("loss", "train loss (total)", "-"), ("ce", "train cross-entropy", "--")):
        if key in m.train:
            ax.plot(*m.train[key], lw=1, ls=ls, label=label)  # dashed: ce lies just under the total
    if m.val:
        steps, losses = [v["step"] for v in m.val], [v.get("loss") for v in m.val]
        ax.plot(steps, _floats(losses), "o-", lw=1.5, ms=4, label="val loss")
    ax.set(title="Loss", xlabel="step", ylabel="loss (nats/token)")
    ax.legend() if ax.lines else _empty(ax)
    for ax, (keys, title, ylabel, logy) in zip(axes[1:], _TRAINING_PANELS):
        for key, label in keys:
            if key in m.train:
                ax.plot(*m.train[key], lw=1, label=label)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        if not ax.lines:
            _empty(ax)
            continue
        if logy and all(np.nanmin(line.get_ydata()) > 0 for line in ax.lines):
            ax.set_yscale("log")
        ax.legend()
    return fig


def _draw_domain_loss(val: list[dict]):
    lines = [v for v in val if isinstance(v.get("domain_loss"), dict)]
    names = sorted({name for v in lines for name in v["domain_loss"]})
    fig = _figure(8, 3.6)
    ax = fig.subplots()
    for name, color in zip(names, _colors(len(names))):
        points = [(v["step"], v["domain_loss"][name]) for v in lines if name in v["domain_loss"]]
        ax.plot(*zip(*points), "o-", ms=3, lw=1.2, color=color, label=_label(name))
    ax.set(title="Validation loss by domain", xlabel="step", ylabel="loss (nats/token)")
    _legend(ax, len(names), outside=True)
    return fig


def _draw_layer_lines(series, title: str, ylabel: str):
    steps, values = series  # (n,), (n, L)
    L = values.shape[1]
    fig = _figure(11, 3.8)
    ax = fig.subplots()
    for layer, color in enumerate(_colors(L)):
        ax.plot(steps, values[:, layer], lw=1, color=color, label=f"layer {layer}")
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    _legend(ax, L, outside=True)
    return fig


def _draw_load_heatmaps(series):
    steps, shares = series  # (n,), (n, L, E)
    n, L, E = shares.shape
    fig, axes = _grid(L, 4, (3.3, 2.5))
    vmax = float(np.quantile(shares, 0.99)) or 1.0  # a few early spikes do not wash out the rest
    x0, x1 = (steps[0], steps[-1]) if n > 1 else (steps[0] - 0.5, steps[0] + 0.5)
    for layer, ax in enumerate(axes):
        image = ax.imshow(
            shares[:, layer, :].T,
            aspect="auto",
            origin="lower",
            cmap="viridis",
            vmin=0,
            vmax=vmax,
            extent=(x0, x1, -0.5, E - 0.5),
        )  # x: step, y: expert
        ax.set(title=f"layer {layer}", xlabel="step", ylabel="expert")
        ax.grid(False)
    fig.colorbar(image, ax=list(axes), label=f"share (balanced: {1 / E:.3f})", shrink=0.9, extend="max")
    fig.suptitle("Expert load over training: each expert's share of the layer's top-k assignments per step")
    return fig


def _draw_bias(series):
    steps, ranges = series  # (n,), (n, L, 2)
    L = ranges.shape[1]
    fig = _figure(11, 3.8)
    ax = fig.subplots()
    for layer, color in enumerate(_colors(L)):
        ax.fill_between(steps, ranges[:, layer, 0], ranges[:, layer, 1], color=color, alpha=0.15, lw=0)
        ax.plot(steps, ranges[:, layer, 1], color=color, lw=1, label=f"layer {layer}")
        ax.plot(steps, ranges[:, layer, 0], color=color, lw=1, ls="--")
    ax.set(
        title="Loss-free balancing bias per layer: max (solid) and min (dashed)", xlabel="step", ylabel="bias"
    )
    _legend(ax, L, outside=True)
    return fig


def _draw_domain_heatmaps(result: dict):
    from matplotlib.colors import TwoSlopeNorm

    L, E, k = result["n_layers"], result["n_experts"], result["top_k"]
    base = k / E
    names = list(result["layers"][0]["domain_specialization"])
    ncols = 4 if E <= 12 else 2 if E <= 64 else 1  # the figure stays ~13 in wide: readable text
    fig, axes = _grid(L, ncols, (12.0 / ncols, 0.42 * len(names) + 1.3), extra=1.5)
    norm = TwoSlopeNorm(vmin=0.0, vcenter=min(max(base, 1e-6), 1 - 1e-6), vmax=1.0)
    for layer, ax in enumerate(axes):
        spec = result["layers"][layer]["domain_specialization"]
        m = np.stack([_floats(spec[name]) for name in names])  # (D, E)
        image = ax.imshow(m, aspect="auto", cmap="RdBu_r", norm=norm)
        ax.set_yticks(range(len(names)), [_label(name) for name in names])
        ax.set_xticks(range(0, E, 1 if E <= 16 else max(1, E // 8)))
        ax.set(title=f"layer {layer}", xlabel="expert")
        ax.grid(False)
        if E <= 16 and len(names) <= 12:
            for (d, e), v in np.ndenumerate(m):
                color = "white" if abs(v - base) > 0.4 else "black"
                ax.text(e, d, _num(v, ".2f"), ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=list(axes), label="share of tokens", shrink=0.9)
    fig.suptitle(
        f"Share of each domain's tokens routed to each expert (white = random routing, k/E = {base:.3f})"
    )
    return fig


def _draw_layer_metrics(result: dict):
    L, E, k = result["n_layers"], result["n_experts"], result["top_k"]
    base, layers, rows = k / E, np.arange(L), result["layers"]
    fig = _figure(13, 3.8)
    ax1, ax2, ax3 = fig.subplots(1, 3)
    ax1.plot(layers, _floats([r["vocab_specialization"]["raw"] for r in rows]), "o-", label="raw")
    ax1.plot(
        layers, _floats([r["vocab_specialization"]["normalized"] for r in rows]), "s-", label="normalized"
    )
    ax1.axhline(base, color="0.4", ls="--", lw=1, label=f"random raw = k/E = {base:.3f}")
    ax1.axhline(0, color="0.6", ls=":", lw=1, label="random normalized = 0")
    min_count = rows[0]["vocab_specialization"]["min_count"]
    ax1.set(title=f"Vocabulary specialization (ids seen ≥ {min_count}×)", xlabel="layer", ylabel="share")
    ax1.set(xticks=layers, ylim=(-0.05, 1.05))
    ax1.legend()
    random_next = 1 - math.comb(E - k, k) / math.comb(E, k)  # comb is 0 when 2k > E
    ax2.set(title="Expert continuity to the next layer", xlabel="layer l (→ l+1)", ylabel="share of tokens")
    if L > 1:
        ax2.plot(layers[:-1], _floats([r["expert_continuity_next"] for r in rows[:-1]]), "o-", color="C2")
        ax2.lines[-1].set_label("measured")
        ax2.axhline(random_next, color="0.4", ls="--", lw=1, label=f"random = {random_next:.3f}")
        ax2.set(xticks=layers[:-1], ylim=(-0.05, 1.05))
        ax2.legend()
    else:
        _empty(ax2, "one layer only")
    multi = result["expert_continuity_multi"]
    ax3.set(
        title="Expert kept for s more layers", xlabel="s (layers)", ylabel="share of (token, expert) pairs"
    )
    if multi:
        s = np.array([int(x) for x in multi])
        measured = _floats(list(multi.values()))
        ax3.plot(s, np.where(measured > 0, measured, np.nan), "o-", color="C3", label="measured")
        ax3.plot(s, base**s, "--", color="0.4", lw=1, label="random (k/E)^s")
        ax3.set(xticks=s, yscale="log")
        ax3.legend()
    else:
        _empty(ax3, "one layer only")
    return fig


def _draw_coactivation(result: dict):
    L, E, k = result["n_layers"], result["n_experts"], result["top_k"]
    fig, axes = _grid(L, 4, (3.0, 2.8))
    mats = [np.array(row["coactivation"], dtype=np.float64) for row in result["layers"]]  # L × (E, E)
    vmax = max(float(m.max()) for m in mats) or 1.0
    for layer, ax in enumerate(axes):
        image = ax.imshow(mats[layer], cmap="magma", vmin=0, vmax=vmax)
        ax.set(title=f"layer {layer}", xlabel="expert j", ylabel="expert i")
        ax.grid(False)
    fig.colorbar(image, ax=list(axes), label="P(j chosen | i chosen)", shrink=0.8)
    baseline = (k - 1) / (E - 1) if E > 1 else 0.0
    fig.suptitle(f"Co-activation: tokens with i and j / tokens with i (random routing: {baseline:.3f})")
    return fig


def _draw_contextual(ctx: dict, L: int):
    fig = _figure(13, 4.2)
    axes = fig.subplots(1, 2)
    titles = {"tis": "TIS: word vs its samples' tokens", "ics": "ICS: each sense vs the word overall"}
    for ax, key in zip(axes, ("tis", "ics")):
        for i, (word, values) in enumerate(ctx[key].items()):
            ls = "-" if i < 10 else "--"
            ax.plot(
                range(L),
                _floats(values),
                marker="o",
                ms=3,
                lw=1.2,
                ls=ls,
                color=f"C{i % 10}",
                label=_label(word),
            )
        ax.set(title=titles[key], xlabel="layer", ylabel="JS distance (base 2)", xticks=range(L))
        top = np.nanmax(_floats([v for values in ctx[key].values() for v in values]), initial=0.0)
        ax.set_ylim(0, min(1.0, max(0.5, 1.15 * top)))  # distances lie in [0, 1]
    _legend(axes[1], len(ctx["tis"]), outside=True)
    return fig


def _draw_comparison(runs: list[Run]):
    fig = _figure(13, 4.2)
    ax1, ax2 = fig.subplots(1, 2)
    for i, run in enumerate(runs):
        m, color = run.metrics, f"C{i % 10}"
        if m is not None and "loss" in m.train:
            ax1.plot(*m.train["loss"], lw=1, color=color, label=_label(run.name))
        if m is not None and m.val:
            steps, losses = [v["step"] for v in m.val], _floats([v.get("loss") for v in m.val])
            ax2.plot(steps, losses, "o-", ms=4, color=color, label=_label(run.name))
    for ax, title in ((ax1, "Training loss"), (ax2, "Validation loss")):
        ax.set(title=title, xlabel="step", ylabel="loss (nats/token)")
        ax.legend() if ax.lines else _empty(ax, "no data")
    return fig


def _draw_width_load(series, groups: dict):
    steps, shares = series  # (n,), (n, L, G)
    widths = groups["widths"]
    balanced = np.asarray(groups["experts"], dtype=np.float64)  # (L, G) experts per width
    balanced = (balanced / balanced.sum(axis=1, keepdims=True)).mean(axis=0)  # (G,) share of experts
    fig = _figure(11, 3.6)
    ax = fig.subplots()
    for g, (width, color) in enumerate(zip(widths, _colors(len(widths)))):
        ax.plot(steps, shares[:, :, g].mean(axis=1), lw=1.2, color=color, label=f"width {width}")
        ax.axhline(balanced[g], color=color, ls="--", lw=1)
    ax.set(
        title="Load per expert width, mean over layers (dashed: share of experts = perfect balance)",
        xlabel="step",
        ylabel="share of assignments",
    )
    _legend(ax, len(widths), outside=True)
    return fig
