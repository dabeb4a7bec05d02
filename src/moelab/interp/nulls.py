"""Null baselines of the headline metrics: what a metric reads on the same trace with the link it
measures broken, as mean ± std over R seeded shuffles (`moelab analyze --nulls R`; docs/METRICS.md,
"Null baselines").

* permutation null (`permuted`): each layer's top-k sets dealt to the tokens at random, an independent
  permutation per layer. Every layer keeps its multiset of expert sets, hence its loads exactly; any
  link between a token (identity, domain, sense, experts at other layers) and its experts is gone.
* label-shuffle null (`relabeled`, domain and vocabulary specialization only): the routing stays and
  the labels (domain ids / token ids) are shuffled across tokens, keeping each label's token count.

Co-activation has no entry: it counts pairs within each token's set at one layer, so the permutation
null equals the value exactly.
"""

from __future__ import annotations

import copy
import html

import numpy as np

from moelab.interp import metrics
from moelab.interp.trace_file import Trace


def permuted(trace: Trace, seed: int | np.random.Generator = 0) -> Trace:
    """The same trace with each layer's expert sets dealt to the tokens at random (an independent
    permutation per layer, `rng.permutation(T)` for layers 0, 1, ... in turn, rng =
    np.random.default_rng(seed); a Generator is used as it is). Loads, set sizes and tree paths stay as
    the model made them; token ids, domains, positions and contextual labels stay with their tokens.
    topk_weights and router_probs are dropped."""
    rng = np.random.default_rng(seed)
    ids = np.asarray(trace.topk_ids)  # (L, T, k)
    shuffled = np.stack([layer[rng.permutation(trace.n_tokens)] for layer in ids])
    ctx = trace.meta.get("contextual")
    extra = {key: trace.meta[key] for key in ("tree", "expert_widths") if key in trace.meta}
    return Trace.from_arrays(
        shuffled,
        token_ids=trace.token_ids,
        doc_ids=trace.doc_ids,
        positions=trace.positions,
        domains=trace.domains,
        domain_names=trace.domain_names,
        n_experts=trace.n_experts,
        contextual=None if ctx is None else {key: ctx[key] for key in ("words", "token_ids", "senses")},
        context_word=trace.context_word,
        context_sense=trace.context_sense,
        context_target=trace.context_target,
        name=f"{trace.name} (permuted)",
        meta=extra,
    )


def relabeled(trace: Trace, key: str, rng: np.random.Generator) -> Trace:
    """`trace` with its (T,) array `key` ("domains" or "token_ids") shuffled across tokens by
    `rng.permutation(T)`; the routing and everything else are shared with `trace`."""
    out = copy.copy(trace)
    out._repeats = dict(trace._repeats)
    setattr(out, key, np.asarray(getattr(trace, key))[rng.permutation(trace.n_tokens)])
    out.name = f"{trace.name} ({key} shuffled)"
    return out


# ----------------------------------------------------------------------------- headline numbers


def domain_max_share(trace: Trace) -> np.ndarray | None:
    """(L,): the largest share, over domains and experts, of a domain's tokens routed to the expert
    (the "share" column of `moelab analyze`); None without domains."""
    shares = metrics.domain_specialization(trace)
    if not shares:
        return None
    stacked = np.stack(list(shares.values()))  # (D, L, E)
    return np.where(np.isnan(stacked), -np.inf, stacked).max(axis=(0, 2))


def _word_mean(per_word: dict) -> np.ndarray:
    """{word: (L,)} -> (L,) mean over the words defined at each layer, NaN where none is."""
    rows = np.stack(list(per_word.values()))  # (W, L)
    ok = ~np.isnan(rows)
    return metrics._shares(np.where(ok, rows, 0.0).sum(axis=0), ok.sum(axis=0))


def headline(
    trace: Trace, min_count: int = 10, path_layers: tuple[int, int] | None = None, k: int | None = None
) -> dict:
    """{name: (L,) array or float} of the numbers that get null baselines (names absent where the
    trace lacks what they need: domains, token_ids, a contextual word set). `k=1`: domain and
    vocabulary specialization on each token's first expert, as in `analyze`."""
    out = {}
    specialized = metrics.top1_view(trace) if k == 1 else trace
    share = domain_max_share(specialized)
    if share is not None:
        out["domain_max_share"] = share
    if trace.token_ids is not None:
        vocab = metrics.vocab_specialization(specialized, min_count)
        out["vocab_raw"], out["vocab_normalized"] = vocab["raw"], vocab["normalized"]
    out["continuity_next"] = metrics.expert_continuity_next(trace)
    p = metrics.paths(trace, path_layers)
    out["path_norm_entropy"], out["path_cover_80"] = p["norm_entropy"], float(p["cover_80"])
    ctx = metrics.contextual(trace)
    if ctx is not None and ctx["tis"]:
        out["tis_mean"], out["ics_mean"] = _word_mean(ctx["tis"]), _word_mean(ctx["ics"])
    return out


def _mean_std(samples: list) -> dict:
    stacked = np.asarray(samples, dtype=np.float64)  # (R, ...) ; NaN stays NaN
    return {"mean": stacked.mean(axis=0), "std": stacked.std(axis=0)}


def baselines(
    trace: Trace,
    n: int,
    seed: int = 0,
    min_count: int = 10,
    path_layers: tuple[int, int] | None = None,
    k: int | None = None,
) -> dict:
    """{"R", "seed", name: {"value", "permutation": {"mean", "std"}[, "label_shuffle": {"mean", "std"}]}}
    for every `headline` number: std is the population std over the n shuffles (ddof 0).

    Shuffle r of the permutation null is `permuted(trace, rng)` with one rng = default_rng(seed) drawn
    from in turn; the label shuffles draw from default_rng([seed, 1]) (domains) and default_rng([seed, 2])
    (token ids). `k=1` measures domain and vocabulary specialization on top-1 views, as `analyze` does."""
    if n < 1:
        raise ValueError(f"nulls needs n >= 1 shuffles, got {n}")

    value = headline(trace, min_count, path_layers, k)
    rng = np.random.default_rng(seed)
    perm = [headline(permuted(trace, rng), min_count, path_layers, k) for _ in range(n)]
    out = {"R": int(n), "seed": int(seed)}
    for name, v in value.items():
        out[name] = {"value": v, "permutation": _mean_std([sample[name] for sample in perm])}
    base = metrics.top1_view(trace) if k == 1 else trace
    if "domain_max_share" in value:
        rng_d = np.random.default_rng([seed, 1])
        draws = [domain_max_share(relabeled(base, "domains", rng_d)) for _ in range(n)]
        out["domain_max_share"]["label_shuffle"] = _mean_std(draws)
    if "vocab_raw" in value:
        rng_v = np.random.default_rng([seed, 2])
        draws = [
            metrics.vocab_specialization(relabeled(base, "token_ids", rng_v), min_count) for _ in range(n)
        ]
        out["vocab_raw"]["label_shuffle"] = _mean_std([d["raw"] for d in draws])
        out["vocab_normalized"]["label_shuffle"] = _mean_std([d["normalized"] for d in draws])
    return out


# ----------------------------------------------------------------------------- terminal summary


def _cell(entry: dict, at: int | None = None) -> str:
    def pick(x):
        return x if at is None else x[at]

    def f(x):
        return "-" if x is None else f"{x:.3f}"

    text = f(pick(entry["value"]))
    perm = entry["permutation"]
    text += f" [perm {f(pick(perm['mean']))}±{f(pick(perm['std']))}"
    if "label_shuffle" in entry:
        lab = entry["label_shuffle"]
        text += f"; labels {f(pick(lab['mean']))}±{f(pick(lab['std']))}"
    return text + "]"


PER_LAYER = (
    ("domain_max_share", "max domain share"),
    ("vocab_raw", "vocab raw"),
    ("vocab_normalized", "vocab norm"),
    ("continuity_next", "cont->next"),
    ("tis_mean", "TIS mean"),
    ("ics_mean", "ICS mean"),
)


def summary_lines(result: dict) -> list[str]:
    """Lines for `summary_table`: each headline number next to its nulls (JSON `result["nulls"]`)."""
    nulls = result.get("nulls")
    if not nulls:
        return []
    lines = [
        "",
        f"Null baselines (mean±std over {nulls['R']} shuffles, seed {nulls['seed']}): "
        "perm = each layer's routing dealt to tokens at random; labels = domains / token ids shuffled.",
    ]
    for layer in range(result["n_layers"]):
        cells = [f"{label} {_cell(nulls[key], layer)}" for key, label in PER_LAYER if key in nulls]
        lines.append(f"  layer {layer}: " + "  ".join(cells))
    for key, label in (("path_norm_entropy", "path entropy"), ("path_cover_80", "routes for 80%")):
        if key in nulls:
            lines.append(f"  {label}: {_cell(nulls[key])}")
    return lines


def html_table(result: dict) -> str:
    """The report's table of the nulls (HTML), "" when `result` has none (analyze without nulls)."""
    nulls = result.get("nulls")
    if not nulls:
        return ""
    keys = [(key, label) for key, label in PER_LAYER if key in nulls]
    head = "".join(f"<th>{html.escape(label)}</th>" for label in ["layer"] + [label for _, label in keys])
    rows = "".join(
        f"<tr><td>{layer}</td>"
        + "".join(f"<td>{html.escape(_cell(nulls[key], layer))}</td>" for key, _ in keys)
        + "</tr>"
        for layer in range(result["n_layers"])
    )
    paths = "; ".join(
        f"{label} {html.escape(_cell(nulls[key]))}"
        for key, label in (("path_norm_entropy", "path entropy"), ("path_cover_80", "routes for 80%"))
        if key in nulls
    )
    return (
        f"<h4>Null baselines (mean±std over {nulls['R']} shuffles)</h4>"
        f'<table class="compact"><tr>{head}</tr>{rows}</table>'
        f"<p>{paths}. perm = each layer's routing dealt to tokens at random (loads kept); "
        "labels = domains / token ids shuffled across tokens (routing kept).</p>"
    )
