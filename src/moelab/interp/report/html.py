"""The page: one function per section, tables, expert cards, CSS, and their assembly (`render_html`).

Every section takes one loaded `runs.Run` (the comparison takes them all) and returns HTML; a section
whose input is missing shows the run's note saying how to produce it. Text from a run goes through
`fmt._esc`, figures come from `plots`, and the page has no script and no external reference.
"""

from __future__ import annotations

import time

import numpy as np

from moelab.interp.nulls import html_table as null_table
from moelab.interp.report.cards import CONTEXT_LEFT, CONTEXT_RIGHT, _domain_max
from moelab.interp.report.compare import comparison
from moelab.interp.report.fmt import _esc, _mean, _num
from moelab.interp.report.plots import (
    _draw_bias,
    _draw_coactivation,
    _draw_contextual,
    _draw_domain_heatmaps,
    _draw_domain_loss,
    _draw_layer_lines,
    _draw_layer_metrics,
    _draw_load_heatmaps,
    _draw_training,
    _img,
)
from moelab.interp.report.runs import Run, _final
from moelab.interp.report.structure import CSS as _STRUCTURE_CSS
from moelab.interp.report.structure import tree_section, width_balance, width_table
from moelab.interp.report.transitions import transitions_section

SECTIONS = (
    ("overview", "1. Overview"),
    ("training", "2. Training curves"),
    ("balance", "3. Balance over time"),
    ("specialization", "4. Specialization"),
    ("experts", "5. Expert cards"),
    ("contextual", "6. Contextual tokens"),
    ("comparison", "7. Comparison"),
)


# ----------------------------------------------------------------------------- HTML helpers


def _table(headers, rows, cls: str = "") -> str:
    """A table of plain-text cells (each escaped)."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    table = f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _note(text_html: str) -> str:
    return f'<p class="note">{text_html}</p>'


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


# ----------------------------------------------------------------------------- sections


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
    return out + _saturation(run)


def _saturation(run: Run) -> str:
    """RUN/saturation.png and a mean-per-step table from RUN/saturation.json, when
    `moelab analyze RUN --saturation` wrote them; nothing otherwise."""
    import base64
    import json

    png, js = run.path / "saturation.png", run.path / "saturation.json"
    if not png.is_file() and not js.is_file():
        return ""
    out = "<h3>Router saturation over checkpoints</h3>"
    if png.is_file():
        data = base64.b64encode(png.read_bytes()).decode("ascii")
        alt = _esc(f"router saturation of {run.name}")
        out += f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"></figure>'
    try:
        r = json.loads(js.read_text(encoding="utf-8"))
        rows = [[str(s), _num(_mean(a)), _num(_mean(b))] for s, a, b in zip(r["steps"], r["top1"], r["topk"])]
        out += _table(["step", f"top-1 vs step {r['reference_step']}", "top-k"], rows)
    except (OSError, ValueError, KeyError, TypeError):
        out += _note(
            f"{_esc(js)} is missing or unreadable; rerun <code>moelab analyze RUN --saturation</code>"
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
    out.append(width_balance(run))
    out.append(_window_load(m))
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
        out.append(f"<h4>Final MaxVio_global (validation at step {val[-1]['step']})</h4>")
        out.append(_note(_validation_scope(run, val[-1])))
        out.append(_table(headers, [row], cls="compact"))
    else:
        out.append(_note("no validation line with <code>max_vio_global</code> yet"))
    return "".join(out)


def _validation_scope(run: Run, record: dict) -> str:
    """What a validation line's counts cover: the trainer evaluates `train.eval_batches` batches, which
    is usually a sample of the split, so its MaxVio_global differs from `moelab eval` on the whole split."""
    tokens = record.get("tokens")
    over = f"the {_num(tokens, ',')} tokens" if isinstance(tokens, int) else "the tokens"
    batches = run.cfg("train.eval_batches", None)
    if batches == 0:
        return f"Counts over {over} of the whole validation split (<code>train.eval_batches: 0</code>)."
    what = "the batches" if batches is None else f"<code>train.eval_batches: {_esc(batches)}</code> batches"
    return (
        f"Counts over {over} of {what} of the validation split, not the whole split; "
        "<code>moelab eval RUN --data DIR</code> counts the whole split."
    )


_PCT_NAMES = {0: "min", 50: "median", 100: "max"}


def _window_load(m) -> str:
    """Dead experts per layer over training and the last logged window's load-share percentiles, for runs
    whose metrics.jsonl has `layers.dead_experts` / `layers.load_pct`; "" for others."""
    out = []
    if "dead_experts" in m.layers:
        title = "Dead experts per layer: experts with no tokens since the previous logged line"
        out.append(
            _img("dead experts per layer", _draw_layer_lines, m.layers["dead_experts"], title, "experts")
        )
    layers = (m.last_train or {}).get("layers") or {}
    try:
        dead = np.asarray(layers["dead_experts"], dtype=np.float64)  # (L,)
        pct = np.asarray(layers["load_pct"], dtype=np.float64)  # (L, P)
        E = np.asarray(layers["counts"]).shape[1]
    except (KeyError, TypeError, ValueError, IndexError):
        return "".join(out)
    if dead.ndim != 1 or pct.ndim != 2 or len(dead) != len(pct) or pct.shape[1] < 2 or E < 1:
        return "".join(out)
    qs = np.linspace(0, 100, pct.shape[1])  # the trainer's percentiles are evenly spaced
    headers = ["layer", "dead experts", *(_PCT_NAMES.get(q, f"p{q:g}") for q in qs)]
    rows = [
        [str(i), f"{d:.0f}", *(f"{100 * v:.2f}%" for v in row)] for i, (d, row) in enumerate(zip(dead, pct))
    ]
    out.append(
        f"<h4>Load share per expert, percentiles over the last logged window (step {m.last_train['step']};"
        f" balanced: {100 / E:.2f}% each)</h4>"
    )
    out.append(_table(headers, rows, cls="compact"))
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
    out.append(null_table(r))  # "" unless the analysis has nulls (analyze(..., nulls=R))
    out.append(transitions_section(run))
    out.append(width_table(run) + tree_section(run))
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
        f"{tokens}{_lens_line(run, layer, expert)}{domains}{examples}</div>"
    )


def _lens_line(run: Run, layer: int, expert: int, n: int = 5) -> str:
    """The tokens the expert's mean output promotes and suppresses (`moelab lens`), when the run has
    RUN/lens.json; "" otherwise."""
    layers = (run.lens or {}).get("layers", [])
    entry = layers[layer]["experts"][expert] if layer < len(layers) else None
    if not entry:
        return ""

    def words(items) -> str:
        return " ".join(f"<code>{_esc(str(i.get('token') or i['id']))}</code>" for i in items[:n])

    return (
        f'<p class="lens"><span class="muted">lens: promotes</span> {words(entry["promoted"])}<br>'
        f'<span class="muted">suppresses</span> {words(entry["suppressed"])}</p>'
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


# ----------------------------------------------------------------------------- the page


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


REPORT_SIGNATURE = "moelab report"  # in every report's head: `moelab report` replaces only its own files


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
        "comparison": comparison(runs),
    }
    title = _esc("moelab report: " + ", ".join(run.name for run in runs))
    nav = "".join(f'<a href="#{key}">{_esc(label)}</a>' for key, label in SECTIONS)
    body = "".join(f'<section id="{key}"><h2>{label}</h2>{bodies[key]}</section>' for key, label in SECTIONS)
    footer = f"Written by moelab {_esc(moelab.__version__)} on {time.strftime('%Y-%m-%d %H:%M')}."
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="{REPORT_SIGNATURE}">'
        f'<title>{title}</title><link rel="icon" href="data:,"><style>{_CSS}{_STRUCTURE_CSS}</style></head>'
        f"<body><main><h1>{title}</h1><nav>{nav}</nav>{body}<footer>{footer}</footer></main></body></html>\n"
    )
