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
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moelab.errors import MoelabError
from moelab.io import atomic_file

log = logging.getLogger(__name__)

DATA_TRACE, CONTEXTUAL_TRACE = "trace", "trace-contextual"  # default trace directories inside a run
SECTIONS = (
    ("overview", "1. Overview"),
    ("training", "2. Training curves"),
    ("balance", "3. Balance over time"),
    ("specialization", "4. Specialization"),
    ("experts", "5. Expert cards"),
    ("contextual", "6. Contextual tokens"),
    ("comparison", "7. Comparison"),
)
MIN_COUNT = 10  # occurrences a token id needs for vocab specialization and expert cards
MAX_CARDS = 256  # above L·E = 256, cards only for the most specialised layers (all their experts)
TOP_TOKENS = 8  # tokens listed per expert card
N_EXAMPLES = 3  # example contexts per expert card
CONTEXT_LEFT, CONTEXT_RIGHT = 8, 4  # tokens shown around an example occurrence
HEATMAP_BINS, LINE_BINS = 300, 1000  # step bins of the load heatmaps and of per-layer lines
DPI = 100


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
    layers: dict[str, tuple[np.ndarray, np.ndarray]]  # load (n, L, E), max_vio (n, L), bias_range (n, L, 2)
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
    bins.update({key: _Binned(LINE_BINS) for key in ("max_vio", "router_entropy", "bias_range")})
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
                for key in ("max_vio", "router_entropy", "bias_range"):
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
    cards: dict | None = None  # see _expert_cards
    notes: dict[str, str] = field(default_factory=dict)  # input -> HTML note saying how to produce it
    warnings: list[str] = field(default_factory=list)  # HTML

    def cfg(self, dotted: str, default="–"):
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node


def _code(text) -> str:
    return f"<code>{_esc(str(text))}</code>"


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
    from moelab.data.tokenizer import load_tokenizer

    pointer = run.path / "checkpoints" / "latest"
    if not pointer.is_file():
        run.notes["tokenizer"] = (
            f"no checkpoint in {_code(run.path)} (checkpoints/latest is missing), so tokens are shown as "
            f"ids; {_code('moelab train')} saves the tokenizer with every checkpoint"
        )
        return
    run.checkpoint = run.path / "checkpoints" / pointer.read_text(encoding="utf-8").strip()
    try:
        run.checkpoint_step = int(run.checkpoint.name.rsplit("-", 1)[-1])
    except ValueError:
        run.checkpoint_step = None
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


def _run_names(paths: list[Path]) -> list[str]:
    """Directory names, with the parent's name where two runs share one."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def load_run(path: str | Path, name: str, traces: list[Path] = (), min_count: int = MIN_COUNT) -> Run:
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
    _open_traces(run, list(traces))
    if run.trace is not None:
        _check_trace(run, run.trace, "data")
        t0 = time.perf_counter()
        run.analysis = analyze(run.trace, min_count=min_count, progress=sys.stderr.isatty())
        run.cards = _expert_cards(run, min_count)
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


# ----------------------------------------------------------------------------- expert cards


def expert_top_tokens(
    trace, layer: int, min_count: int = MIN_COUNT, n: int = TOP_TOKENS, expert_counts=None
) -> list[list[tuple[int, int, int, float]]]:
    """For each expert at `layer`, up to `n` token ids most over-represented among the tokens it receives.

    Among ids seen >= min_count times: c = occurrences routed to expert e (e in the token's top-k set),
    N = all occurrences, p = P(e) = share of all tokens whose top-k set includes e. An id is kept when
    c / N > p, and ranked by the smoothed share (c + min_count·p) / (N + min_count), so an id routed to
    e every time in 500 occurrences outranks one seen 10 times; ties go to the smaller id. Returns per
    expert a list of (token id, c, N, lift = (c / N) / p), best first. `expert_counts`: this layer's
    row of metrics.expert_token_counts(trace), when already computed.
    """
    from moelab.interp.metrics import expert_token_counts, vocab_shares

    if trace.token_ids is None:
        return [[] for _ in range(trace.n_experts)]
    ids, shares = vocab_shares(trace, layer, min_count)  # (V',), (V', E)
    totals = np.bincount(np.asarray(trace.token_ids, dtype=np.int64))[ids]  # (V',)
    if expert_counts is None:
        expert_counts = expert_token_counts(trace)[layer]
    p = np.asarray(expert_counts, dtype=np.float64) / max(trace.n_tokens, 1)  # (E,)
    routed = np.rint(shares * totals[:, None]).astype(np.int64)  # (V', E)
    keep = (shares > p) & (routed > 0)
    score = np.where(keep, (routed + min_count * p) / (totals[:, None] + min_count), -1.0)
    order = np.argsort(-score, axis=0, kind="stable")[:n]  # (n', E); ids ascend, so ties keep the smaller
    out = []
    for e in range(trace.n_experts):  # E small lists, no per-token work
        rows = order[:, e][keep[order[:, e], e]]
        lift = shares[rows, e] / p[e] if p[e] > 0 else np.full(rows.shape, np.nan)
        out.append(
            list(zip(ids[rows].tolist(), routed[rows, e].tolist(), totals[rows].tolist(), lift.tolist()))
        )
    return out


def _first_occurrences(trace, layer: int, keys: np.ndarray) -> dict[int, int]:
    """{token * E + expert: the first position where that token id is routed to that expert at `layer`}.

    Chunks of the layer are matched with np.isin on combined keys; stops once every key is found."""
    from moelab.interp.metrics import CHUNK_TOKENS

    E, wanted, found = trace.n_experts, np.unique(keys), {}
    for start in range(0, trace.n_tokens, CHUNK_TOKENS):
        tokens = np.asarray(trace.token_ids[start : start + CHUNK_TOKENS], dtype=np.int64)  # (t,)
        ids = np.asarray(trace.topk_ids[layer, start : start + CHUNK_TOKENS], dtype=np.int64)  # (t, k)
        combined = np.where(ids >= 0, tokens[:, None] * E + ids, -1)
        hit = np.isin(combined, wanted)
        rows = np.nonzero(hit)[0]  # row-major order: earliest tokens first
        uniq, first = np.unique(combined[hit], return_index=True)
        for key, row in zip(uniq.tolist(), rows[first].tolist()):
            found.setdefault(key, start + row)
        if len(found) == wanted.size:
            break
    return found


def _domain_max(result: dict, layer: int) -> float:
    """Mean over domains of the largest share of a domain's tokens that one expert receives (NaN
    without domains). Random routing: k/E."""
    shares = result["layers"][layer]["domain_specialization"].values()
    return _mean([max((x for x in s if x is not None), default=math.nan) for s in shares])


def _card_layers(result: dict) -> list[int]:
    """All layers when L·E <= MAX_CARDS, else the most specialised ones (domain max share, else vocab)."""
    L, E = result["n_layers"], result["n_experts"]
    if L * E <= MAX_CARDS:
        return list(range(L))
    score = np.array([_domain_max(result, layer) for layer in range(L)])
    if np.isnan(score).all():
        score = np.array([row["vocab_specialization"]["raw"] or math.nan for row in result["layers"]])
    order = np.argsort(-np.nan_to_num(score, nan=-np.inf), kind="stable")[: max(1, MAX_CARDS // E)]
    return sorted(order.tolist())


def _expert_cards(run: Run, min_count: int) -> dict:
    """Top tokens of every expert; example positions of the experts that get a card."""
    from moelab.interp.metrics import expert_token_counts

    trace, E = run.trace, run.trace.n_experts
    layers = _card_layers(run.analysis)
    counts = expert_token_counts(trace)  # (L, E)
    top = [
        expert_top_tokens(trace, layer, min_count, expert_counts=counts[layer])
        for layer in range(trace.n_layers)
    ]
    examples = {}
    for layer in layers if trace.token_ids is not None else []:
        wanted = [[t * E + e for t, *_ in top[layer][e][:N_EXAMPLES]] for e in range(E)]
        keys = np.array([key for keys in wanted for key in keys], dtype=np.int64)
        found = _first_occurrences(trace, layer, keys) if keys.size else {}
        examples[layer] = [[found[key] for key in keys if key in found] for keys in wanted]
    return {"layers": layers, "top": top, "examples": examples, "min_count": min_count}


# ----------------------------------------------------------------------------- HTML helpers


# control characters are not allowed in HTML text: C0 ones become their Unicode pictures (␀ ␁ ...)
_CONTROLS = str.maketrans(
    {c: 0x2400 + c for c in range(32) if chr(c) not in "\t\n\r"}
    | {0x7F: 0x2421}
    | dict.fromkeys(range(0x80, 0xA0), 0xFFFD)
)


def _esc(text) -> str:
    """HTML-escaped text (quotes included) with control characters made visible."""
    return html.escape(str(text), quote=True).translate(_CONTROLS)


def _table(headers, rows, cls: str = "") -> str:
    """A table of plain-text cells (each escaped)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    table = f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _note(text_html: str) -> str:
    return f'<p class="note">{text_html}</p>'


def _num(value, spec: str = ".3f") -> str:
    if value is None or isinstance(value, str) or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, spec)


def _mean(values) -> float:
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else math.nan


def _token_label(run: Run, token_id: int) -> str:
    """A token as a reader sees it (plain text, escaped by the caller): spaces as ␣, newlines as ↵."""
    text = run.tokenizer.decode([token_id]) if run.tokenizer is not None else ""
    if not text:
        return f"#{token_id}"
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥").replace("\r", "␍")


def _decode(run: Run, ids: list[int]) -> str:
    if run.tokenizer is None:
        return "".join(f" #{i}" for i in ids)
    return run.tokenizer.decode(ids).replace("\n", "↵").replace("\r", "␍")


# ----------------------------------------------------------------------------- plots


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


# ----------------------------------------------------------------------------- sections


def _final(m: Metrics | None, key: str, kind: str = "train"):
    record = (m.val[-1] if m.val else None) if kind == "val" and m else (m.last_train if m else None)
    return record.get(key) if record else None


def _config_rows(run: Run) -> list[list[str]]:
    c = run.cfg
    dense = c("model.n_dense_layers", 0) or 0
    layers = f"{c('model.n_layers')} MoE" + (
        f" + {dense} dense (width {c('model.d_dense')})" if dense else ""
    )
    shared = c("model.n_shared_experts", 0) or 0
    experts = f"{c('model.n_experts')}" + (f" + {shared} shared" if shared else "")
    norm = ", normalised top-k weights" if c("model.norm_topk_prob", False) else ""
    lb = c("moe.load_balance", None)
    balance = [
        f"load balance {lb} × {c('moe.load_balance_coef')}"
        if lb not in (None, "none")
        else "no load-balancing loss",
        f"router z-loss × {c('moe.z_loss_coef')}",
        f"loss-free balancing, rate {c('moe.lflb_rate')} on {c('moe.lflb_bias_on')}"
        if c("moe.lflb", False)
        else "no loss-free balancing",
    ]
    if c("train.load_balance_decay_steps", 0):
        balance.append(
            f"load-balance coefficient decays to 0 over {c('train.load_balance_decay_steps')} steps"
        )
    batch = f"batch {c('train.batch_size')} × {c('train.grad_accum')} × {c('data.seq_len')} tokens"
    schedule = f"warmup {c('train.warmup_steps')}, min {c('train.min_lr')}"
    return [
        [
            "model",
            f"{c('model.arch')}: d_model {c('model.d_model')}, {layers} layers, {c('model.n_heads')} heads",
        ],
        ["experts", f"{experts} routed experts of width {c('model.d_expert')}, top-{c('model.top_k')}{norm}"],
        ["vocabulary", f"{c('model.vocab_size')}"],
        ["balancing", "; ".join(balance)],
        ["optimisation", f"lr {c('train.lr')} ({schedule}), {batch}"],
    ]


def _overview(run: Run) -> str:
    m = run.metrics
    parts = [f'<p class="path">{_esc(str(run.path))}</p>']
    parts += [_note(note) for key, note in run.notes.items() if key in ("config", "metrics")]
    parts += [f'<p class="warn">{w}</p>' for w in run.warnings]
    step = _final(m, "step")
    steps = "–" if step is None else f"{_num(step, ',')} of {_num(run.cfg('train.steps'), ',')}"
    if m is not None and m.nonfinite:
        steps += f" ({m.nonfinite} non-finite step(s) skipped)"
    val = m.val[-1] if m is not None and m.val else None
    val_text = "– (no validation yet)"
    if val:
        val_text = f"{_num(val.get('loss'), '.4f')} (perplexity {_num(val.get('perplexity'), ',.1f')}, "
        val_text += f"step {val['step']})"
    rows = _config_rows(run) + [
        ["steps", steps],
        ["tokens seen", _num(_final(m, "tokens"), ",")],
        ["final train loss", _num(_final(m, "loss"), ".4f")],
        ["final val loss", val_text],
        ["checkpoint", str(run.checkpoint) if run.checkpoint else "–"],
    ]
    for trace, what in ((run.trace, "data trace"), (run.ctx_trace, "contextual trace")):
        text = "–"
        if trace is not None:
            at = trace.meta.get("checkpoint_step")
            text = f"{trace.n_tokens:,} tokens, {trace.n_layers} layers × {trace.n_experts} experts, "
            text += f"top-{trace.top_k}" + (f", step {at}" if at is not None else "") + f" ({trace.name})"
        rows.append([what, text])
    return "".join(parts) + _table(["", ""], rows, cls="kv")


def _training(run: Run) -> str:
    m = run.metrics
    if m is None or not m.train:
        return _note(run.notes.get("metrics", "metrics.jsonl has no training lines yet"))
    out = _img(f"training curves of {run.name}", _draw_training, m)
    if any(isinstance(v.get("domain_loss"), dict) and v["domain_loss"] for v in m.val):
        out += _img(f"validation loss by domain of {run.name}", _draw_domain_loss, m.val)
    if not m.val:
        out += _note(
            "no validation line yet (written every <code>train.eval_every</code> steps and at the end)"
        )
    return out


def _balance(run: Run) -> str:
    m = run.metrics
    if m is None or not m.layers:
        return _note(
            run.notes.get("metrics", "metrics.jsonl has no per-layer statistics (<code>layers</code>)")
        )
    out = []
    if "max_vio" in m.layers:
        title = "MaxVio_batch per layer: max(load)/mean(load) − 1 of each step (0 = balanced)"
        out.append(_img("MaxVio per layer", _draw_layer_lines, m.layers["max_vio"], title, "MaxVio_batch"))
    if "load" in m.layers:
        out.append(_img("expert load heatmaps", _draw_load_heatmaps, m.layers["load"]))
    bias = m.layers.get("bias_range")
    if bias is not None and bias[1].ndim == 3 and (run.cfg("moe.lflb", False) or np.any(bias[1] != 0)):
        out.append(_img("balancing bias range", _draw_bias, bias))
    elif not run.cfg("moe.lflb", False):
        out.append(_note("loss-free balancing is off (<code>moe.lflb: false</code>): no balancing biases"))
    if "router_entropy" in m.layers:
        title = "Router entropy per layer (uniform router = ln E)"
        out.append(
            _img("router entropy per layer", _draw_layer_lines, m.layers["router_entropy"], title, "nats")
        )
    val = [v for v in m.val if isinstance(v.get("max_vio_global"), list)]
    if val:
        last = val[-1]["max_vio_global"]
        headers = ["", *(f"layer {i}" for i in range(len(last))), "mean"]
        row = ["MaxVio_global", *(_num(v) for v in last), _num(_mean(last))]
        out.append(
            f"<h4>Final MaxVio_global (validation at step {val[-1]['step']}, counts over the whole set)</h4>"
        )
        out.append(_table(headers, [row], cls="compact"))
    else:
        out.append(_note("no validation line with <code>max_vio_global</code> yet"))
    return "".join(out)


_LAYER_HEADERS = (
    "layer",
    "MaxVio",
    "router entropy",
    "vocab raw",
    "vocab normalized",
    "continuity → next",
    "domain max share (mean)",
)
_PATH_HEADERS = ("distinct routes", "routes covering 80%", "routes covering 95%", "normalized entropy")


def _specialization(run: Run) -> str:
    r = run.analysis
    if r is None:
        return _note(run.notes["trace"])
    base = r["top_k"] / r["n_experts"]
    out = [f"<p>From the data trace ({r['n_tokens']:,} tokens). Random routing: share k/E = {base:.3f}.</p>"]
    if r["layers"][0]["domain_specialization"]:
        out.append(_img("domain by expert heatmaps", _draw_domain_heatmaps, r))
    else:
        out.append(
            _note("the trace has no domain labels: tokenize documents that have a <code>domain</code> field")
        )
    out.append(_img("vocabulary specialization and continuity by layer", _draw_layer_metrics, r))
    rows = []
    for row in r["layers"]:
        vocab = row["vocab_specialization"]
        numbers = (row["max_vio"], row["router_entropy"], vocab["raw"], vocab["normalized"])
        numbers += (row["expert_continuity_next"], _domain_max(r, row["layer"]))
        rows.append([row["layer"], *(_num(x) for x in numbers)])
    out.append(_table(_LAYER_HEADERS, rows, cls="compact"))
    out.append(_img("co-activation heatmaps", _draw_coactivation, r))
    p = r["paths"]
    out.append(f"<h4>Routes: the tuple of top-1 experts over layers {p['layers'][0]}–{p['layers'][1]}</h4>")
    row = [f"{p['distinct']:,}", f"{p['cover_80']:,}", f"{p['cover_95']:,}", _num(p["norm_entropy"])]
    out.append(_table(_PATH_HEADERS, [row], cls="compact"))
    out.append(
        _note("normalized entropy: route entropy / (layers · log2 E); 1 = uniform over all E^layers routes")
    )
    return "".join(out)


def _bar(value, base: float) -> str:
    width = 0.0 if value is None else max(0.0, min(1.0, value)) * 100
    return (
        f'<span class="bar"><span class="fill" style="width:{width:.1f}%"></span>'
        f'<span class="base" style="left:{base * 100:.1f}%"></span></span>'
    )


def _example(run: Run, pos: int) -> str:
    """Decoded tokens around position `pos` (its document; on the left, its forward window), marked."""
    trace = run.trace
    lo, hi = max(0, pos - CONTEXT_LEFT), min(trace.n_tokens, pos + CONTEXT_RIGHT + 1)
    if trace.positions is not None:
        lo = max(lo, pos - int(trace.positions[pos]))  # the window the model saw starts there
    ids, at = np.asarray(trace.token_ids[lo:hi], dtype=np.int64), pos - lo
    if trace.doc_ids is not None:  # documents are contiguous: keep the stretch of pos's document
        other = np.asarray(trace.doc_ids[lo:hi]) != trace.doc_ids[pos]
        before, after = np.flatnonzero(other[:at]), np.flatnonzero(other[at:])
        start = before[-1] + 1 if before.size else 0
        stop = at + after[0] if after.size else len(ids)
        ids, at = ids[start:stop], at - start
    left, token, right = (
        _esc(_decode(run, part.tolist())) for part in (ids[:at], ids[at : at + 1], ids[at + 1 :])
    )
    return f'<li class="ctx">…{left}<mark>{token}</mark>{right}…</li>'


def _card(run: Run, layer: int, expert: int) -> str:
    r, cards = run.analysis, run.cards
    E, k = r["n_experts"], r["top_k"]
    row = r["layers"][layer]
    top = cards["top"][layer][expert]
    items = "".join(
        f'<li><code title="id {t}">{_esc(_token_label(run, t))}</code> '
        f'<span class="muted">{c:,}/{n:,} ×{_num(lift, ".1f")}</span></li>'
        for t, c, n, lift in top
    )
    tokens = f'<ol class="tokens">{items}</ol>' if top else '<p class="muted">no over-represented token</p>'
    domains = "".join(
        f"<tr><td>{_esc(name)}</td><td>{_bar(shares[expert], k / E)}</td>"
        f'<td class="num">{_num(shares[expert], ".2f")}</td></tr>'
        for name, shares in row["domain_specialization"].items()
    )
    domains = f'<table class="dom">{domains}</table>' if domains else ""
    examples = "".join(_example(run, pos) for pos in cards["examples"].get(layer, [[]] * E)[expert])
    examples = f'<ul class="examples">{examples}</ul>' if examples else ""
    load = f"load {_num(row['load'][expert] * 100, '.1f')}% (balanced {100 / E:.1f}%)"
    return (
        f'<div class="card" id="card-{layer}-{expert}" data-layer="{layer}" data-expert="{expert}">'
        f'<div class="card-head"><b>layer {layer} · expert {expert}</b> '
        f'<span class="muted">{load}</span></div>'
        f"{tokens}{domains}{examples}</div>"
    )


def _expert_grid(run: Run) -> str:
    """Layers × experts: each expert's most over-represented token, shaded by its load."""
    import matplotlib

    r, E = run.analysis, run.analysis["n_experts"]
    cmap = matplotlib.colormaps["Blues"]
    head = "<tr><th>layer</th>" + "".join(f"<th>E{e}</th>" for e in range(E)) + "</tr>"
    body = []
    for layer, row in enumerate(r["layers"]):
        cells = []
        for e, (load, top) in enumerate(zip(row["load"], run.cards["top"][layer])):
            label = _token_label(run, top[0][0]) if top else "·"
            shade = matplotlib.colors.to_hex(cmap(min(1.0, load * E / 2) * 0.6))  # 1/E: light, 2/E+: mid
            tip = _esc(f"layer {layer}, expert {e}: load {load * 100:.1f}%, top token {label}")
            cells.append(f'<td style="background:{shade}" title="{tip}">{_esc(label[:10])}</td>')
        body.append(f"<tr><th>{layer}</th>{''.join(cells)}</tr>")
    table = f'<table class="grid"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


_CARD_LEGEND = (
    "<p>Top tokens: ids seen ≥ {min_count}× that the expert receives more often than its overall share, "
    'best first, with <span class="muted">occurrences routed to the expert / all occurrences ×lift over '
    "the expert's overall share</span>. Bars: share of each domain's tokens sent to the expert (the tick "
    "is k/E). Examples: the first occurrence of a top token routed to the expert, in context.</p>"
)


def _experts(run: Run) -> str:
    r, cards = run.analysis, run.cards
    if r is None:
        return _note(run.notes["trace"])
    L, E = r["n_layers"], r["n_experts"]
    out = [_note(run.notes["tokenizer"])] if "tokenizer" in run.notes else []
    out.append(_CARD_LEGEND.format(min_count=cards["min_count"]))
    out.append("<h4>Every expert: its most over-represented token, shaded by load</h4>" + _expert_grid(run))
    shown = cards["layers"]
    if len(shown) < L:
        which = ", ".join(map(str, shown))
        out.append(_note(f"{L} layers × {E} experts: cards for the most specialised layer(s) {which} only"))
    for layer in shown:
        grid = "".join(_card(run, layer, e) for e in range(E))
        out.append(f'<details open><summary>Layer {layer}</summary><div class="cards">{grid}</div></details>')
    return "".join(out)


def _contextual(run: Run) -> str:
    trace = run.ctx_trace
    if run.ctx is None:
        return _note(run.notes.get("contextual", "the contextual trace has no contextual words"))
    info = trace.contextual
    words, senses = info["words"], info["senses"]
    S = max([len(s) for s in senses] + [1])
    word, sense = np.asarray(trace.context_word, np.int64), np.asarray(trace.context_sense, np.int64)
    target = np.asarray(trace.context_target, bool) & (word >= 0) & (sense >= 0)
    n_target = np.bincount(word[target] * S + sense[target], minlength=len(words) * S).reshape(len(words), S)
    out = [
        f"<p>{trace.n_tokens:,} tokens of the contextual-token set. TIS: how differently a word's "
        "occurrences "
        "are routed from the other tokens of its samples; ICS: how differently its senses are routed from "
        "the word overall (Jensen-Shannon distance of expert distributions: 0 = same, 1 = disjoint).</p>",
        _img("TIS and ICS by layer", _draw_contextual, run.ctx, trace.n_layers),
    ]
    token_ids = info.get("token_ids") if isinstance(info.get("token_ids"), list) else [None] * len(words)
    rows = []
    for i, (w, tid) in enumerate(zip(words, token_ids)):
        label = "–" if tid is None else f"{_token_label(run, tid)} (id {tid})"
        sense_text = ", ".join(f"{s} ({n_target[i, j]})" for j, s in enumerate(senses[i]))
        tis, ics = _mean(run.ctx["tis"].get(w, [])), _mean(run.ctx["ics"].get(w, []))
        rows.append([w, label, sense_text, int(n_target[i].sum()), _num(tis), _num(ics)])
    headers = ("word", "token", "senses (target occurrences)", "targets", "TIS (mean)", "ICS (mean)")
    out.append(_table(headers, rows))
    dropped = info.get("dropped")
    if isinstance(dropped, dict) and dropped:
        reasons = "; ".join(f"{_esc(str(w))}: {_esc(str(why))}" for w, why in dropped.items())
        out.append(_note(f"words left out of the set: {reasons}"))
    return "".join(out)


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


_COMPARISON_HEADERS = (
    "run",
    "steps",
    "tokens",
    "final train loss",
    "final val loss",
    "mean MaxVio_global (val)",
    "mean MaxVio (trace)",
    "domain max share (k/E)",
    "continuity → next",
    "vocab spec. (normalized)",
    "route entropy",
)


def _comparison(runs: list[Run]) -> str:
    if len(runs) < 2:
        example = _code("moelab report RUN_A RUN_B --out FILE.html")
        return _note(f"one run: give several run directories ({example}) to compare them side by side")
    rows = []
    for run in runs:
        h = headline(run)
        domain = f"{_num(h['domain_max'])} ({_num(h['baseline'])})"
        rows.append(
            [run.name, _num(h["steps"], ","), _num(h["tokens"], ","), _num(h["train_loss"], ".4f")]
            + [_num(h["val_loss"], ".4f"), _num(h["max_vio_global"]), _num(h["trace_max_vio"]), domain]
            + [_num(h["continuity"]), _num(h["vocab_normalized"]), _num(h["path_entropy"])]
        )
    return (
        _img("training and validation loss of every run", _draw_comparison, runs)
        + _table(_COMPARISON_HEADERS, rows)
        + _note(
            "Columns after the losses are means over layers; the trace columns need each run's data trace. "
            "Domain max share: for each layer and domain, the share of the domain's tokens that its most "
            "used "
            "expert receives; random routing gives k/E (in brackets)."
        )
    )


_CSS = """
:root { --fg: #1d232b; --muted: #667085; --line: #d9dee5; --accent: #2f6fb3; --warn: #9a3b00; }
* { box-sizing: border-box; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
       color: var(--fg); margin: 0; background: #f6f7f9; }
main { max-width: 1340px; margin: 0 auto; padding: 24px 28px 60px; background: #fff; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 36px 0 10px; padding-top: 10px; border-top: 2px solid var(--line); }
h3.run { font-size: 17px; margin: 22px 0 8px; color: var(--accent); }
h4 { font-size: 15px; margin: 18px 0 6px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; font-size: 14px; }
figure { margin: 10px 0; }
figure img { max-width: 100%; height: auto; display: block; }
table { border-collapse: collapse; font-size: 13.5px; margin: 6px 0 10px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
table.kv thead { display: none; }
table.kv td:first-child { font-weight: 600; white-space: nowrap; }
table.compact td, table.compact th { padding: 2px 10px; }
table.grid { font-size: 11px; }
table.grid td, table.grid th { padding: 2px 4px; border: 1px solid #fff; white-space: nowrap;
                               font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
.scroll { overflow-x: auto; }
.note { background: #f1f4f8; border-left: 4px solid var(--accent); padding: 6px 12px; color: #374151; }
.warn { background: #fff4e5; border-left: 4px solid var(--warn); padding: 6px 12px; }
.muted { color: var(--muted); font-size: 12px; }
.path { color: var(--muted); font-family: ui-monospace, monospace; font-size: 13px; margin: 0 0 6px; }
code { font-family: ui-monospace, "DejaVu Sans Mono", monospace; background: #eef1f5; padding: 0 3px;
       border-radius: 3px; }
details { margin: 10px 0; }
summary { font-weight: 600; cursor: pointer; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 10px; }
.card { border: 1px solid var(--line); border-radius: 6px; padding: 8px 10px; font-size: 13px;
        background: #fcfcfd; }
.card-head { margin-bottom: 4px; }
ol.tokens { margin: 2px 0 6px; padding-left: 22px; columns: 2; column-gap: 12px; }
ol.tokens li { break-inside: avoid; }
table.dom { font-size: 12px; margin: 2px 0; }
table.dom td { border: 0; padding: 0 4px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display: inline-block; position: relative; width: 110px; height: 9px; background: #e7ebf0; }
.bar .fill { position: absolute; left: 0; top: 0; bottom: 0; background: var(--accent); }
.bar .base { position: absolute; top: -2px; bottom: -2px; width: 2px; background: #c2410c; }
ul.examples { margin: 4px 0 0; padding-left: 16px; }
li.ctx { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 12px; white-space: pre-wrap;
         word-break: break-word; color: #374151; }
mark { background: #ffe08a; padding: 0 1px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""


def render_html(runs: list[Run]) -> str:
    """The whole page for loaded runs: per-run subsections under each heading, then the comparison."""
    import moelab

    def per_run(section) -> str:
        if len(runs) == 1:
            return section(runs[0])
        return "".join(f'<h3 class="run">{_esc(run.name)}</h3>{section(run)}' for run in runs)

    bodies = {
        "overview": per_run(_overview),
        "training": per_run(_training),
        "balance": per_run(_balance),
        "specialization": per_run(_specialization),
        "experts": per_run(_experts),
        "contextual": per_run(_contextual),
        "comparison": _comparison(runs),
    }
    title = _esc("moelab report: " + ", ".join(run.name for run in runs))
    nav = "".join(f'<a href="#{key}">{_esc(label)}</a>' for key, label in SECTIONS)
    body = "".join(f'<section id="{key}"><h2>{label}</h2>{bodies[key]}</section>' for key, label in SECTIONS)
    footer = f"Written by moelab {_esc(moelab.__version__)} on {time.strftime('%Y-%m-%d %H:%M')}."
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{title}</title><link rel="icon" href="data:,"><style>{_CSS}</style></head>'
        f"<body><main><h1>{title}</h1><nav>{nav}</nav>{body}<footer>{footer}</footer></main></body></html>\n"
    )


# ----------------------------------------------------------------------------- entry points


def build_report(run_dirs, out: str | Path | None = None, traces=None, min_count: int = MIN_COUNT) -> Path:
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
    traces = [] if traces is None else [traces] if isinstance(traces, str | Path) else list(traces)
    if traces and len(traces) != len(paths):
        raise MoelabError(
            f"{len(traces)} --trace for {len(paths)} run(s): give one --trace per run, in the runs' order, "
            "or none"
        )
    if min_count < 1:
        raise MoelabError(f"min_count must be >= 1, got {min_count}")
    per_run = [[Path(p) for p in str(t).split(",") if p] for t in traces] or [[] for _ in paths]
    t0 = time.perf_counter()
    runs = [load_run(p, name, t, min_count) for p, name, t in zip(paths, _run_names(paths), per_run)]
    page = render_html(runs)
    out = Path(out) if out is not None else paths[0] / "report.html"
    with atomic_file(out, encoding="utf-8") as fh:
        fh.write(page)
    log.info("report of %d run(s) in %.1f s: %s", len(runs), time.perf_counter() - t0, out)
    return out


def cmd_report(args) -> None:
    """`moelab report RUN_DIR [RUN_DIR ...] [--out FILE.html] [--trace DIR ...]`."""
    out = build_report(args.runs, out=args.out, traces=args.trace or None)
    print(f"wrote {out}")
