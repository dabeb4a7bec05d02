"""Expert cards' data: the tokens each expert receives more often than its overall share, and where
they occur.

Works on a trace and its `metrics.analyze` result only (no run directory, no HTML), so `runs.load_run`
computes the cards while it analyses the traces and `html` draws them. Nothing loops over tokens: top
tokens come from `metrics.vocab_shares`, example positions from np.isin over chunks of the trace, and
above MAX_CARDS experts in all only the most specialised layers get cards.
"""

from __future__ import annotations

import math

import numpy as np

from moelab.interp.report.fmt import _mean

MIN_COUNT = 10  # occurrences a token id needs for vocab specialization and expert cards
MAX_CARDS = 256  # above L·E = 256, cards only for the most specialised layers (all their experts)
TOP_TOKENS = 8  # tokens listed per expert card
N_EXAMPLES = 3  # example contexts per expert card
CONTEXT_LEFT, CONTEXT_RIGHT = 8, 4  # tokens shown around an example occurrence


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


def _expert_cards(trace, result: dict, min_count: int) -> dict:
    """Top tokens of every expert; example positions of the experts that get a card.

    trace: the run's data trace; result: its `metrics.analyze` result, which ranks the layers."""
    from moelab.interp.metrics import expert_token_counts

    E = trace.n_experts
    layers = _card_layers(result)
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
