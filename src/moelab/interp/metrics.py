"""Specialization metrics of a routing trace: vectorised, memory-bounded, and each with a slow reference.

A trace (written by `moelab trace`, opened and validated by `moelab.interp.trace_file.Trace`, which
this module re-exports; format in docs/METRICS.md) records which experts every token was sent to at
every MoE layer. Every metric here is defined on a token's *top-k set* at a layer: its
non-negative expert ids (-1 means "no expert", as hierarchical models pad), counted once each.

Traces can hold millions of tokens, so nothing materialises a dense (T, E) array for a whole layer:
tokens are processed in chunks of `CHUNK_TOKENS` rows and counted with bincount on combined keys
(group * E + expert), a (t, E) boolean membership matrix product (co-activation), or top-k sets held
as 64-bit masks whose intersections are bitwise ANDs (continuity, saturation). Loops run over
layers, chunks or groupings, never over tokens. tests/test_metrics.py checks every
function against a plain per-token loop; docs/METRICS.md gives the formulas and random baselines.

This module holds the metric functions, `analyze` (all of them, as the JSON of `moelab analyze --json`)
and the `moelab analyze` command with its terminal summary.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from moelab.errors import MoelabError
from moelab.interp import structure, transitions
from moelab.interp.trace_file import FORMAT as FORMAT  # re-exported: the format's name
from moelab.interp.trace_file import Trace  # also re-exported: `from moelab.interp.metrics import Trace`

CHUNK_TOKENS = 1 << 16  # tokens per chunk: a (t, E) bool membership array is 4 MiB at E = 64


# ----------------------------------------------------------------------------- shared counting


def _chunks(n: int) -> Iterator[slice]:
    step = max(1, int(CHUNK_TOKENS))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _check_layer(trace: Trace, layer: int) -> bool:
    """Refuse ids >= E at `layer` and say whether some token lists an expert twice. One pass per layer,
    cached: a router never repeats an id, so the dedup in `_ids` is normally skipped."""
    if layer not in trace._repeats:
        E, repeats = trace.n_experts, False
        for sl in _chunks(trace.n_tokens):
            ids = np.asarray(trace.topk_ids[layer, sl])  # (t, k)
            if ids.size and ids.max() >= E:
                raise MoelabError(f"{trace.name}: topk_ids holds expert id {ids.max()} but n_experts is {E}")
            if ids.shape[1] > 1 and not repeats:
                ordered = np.sort(ids, axis=1)
                repeats = bool(np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)))
        trace._repeats[layer] = repeats
    return trace._repeats[layer]


def _ids(trace: Trace, layer: int, tokens: slice) -> np.ndarray:
    """(t, k) int64: each token's top-k set at `layer` as ids, -1 for "no expert" and for any repeat."""
    ids = np.asarray(trace.topk_ids[layer, tokens], dtype=np.int64)
    if _check_layer(trace, layer):
        ordered = np.sort(ids, axis=1)
        ordered[:, 1:][ordered[:, 1:] == ordered[:, :-1]] = -1  # a repeated id counts once
        return ordered
    return ids


def _members(trace: Trace, layer: int, tokens: slice) -> np.ndarray:
    """(t, E) bool: True where expert e is in the token's top-k set at `layer` (ids of -1 ignored)."""
    _check_layer(trace, layer)
    ids = np.asarray(trace.topk_ids[layer, tokens], dtype=np.int64)  # a repeat sets the same cell twice
    E = trace.n_experts
    out = np.zeros((ids.shape[0], E + 1), dtype=bool)  # column E collects the -1 ids
    out[np.arange(ids.shape[0])[:, None], np.where(ids >= 0, ids, E)] = True
    return out[:, :E]


def _bits(trace: Trace, layer: int, tokens: slice) -> np.ndarray:
    """(t, W) uint64, W = ceil(E / 64): each token's top-k set as a bit mask (bit e of word e // 64).

    Set intersections become bitwise ANDs and their sizes popcounts, 8 bytes per token at E <= 64."""
    _check_layer(trace, layer)
    ids = np.asarray(trace.topk_ids[layer, tokens], dtype=np.int64)  # (t, k)
    valid = ids >= 0
    bit = np.where(valid, np.left_shift(np.uint64(1), (ids & 63).astype(np.uint64)), np.uint64(0))
    word = np.where(valid, ids >> 6, -1)
    n_words = (trace.n_experts + 63) // 64
    out = np.empty((ids.shape[0], n_words), dtype=np.uint64)
    for w in range(n_words):  # one word for E <= 64
        out[:, w] = np.bitwise_or.reduce(np.where(word == w, bit, np.uint64(0)), axis=1)
    return out


def _popcount(bits: np.ndarray) -> np.ndarray:
    """(t, W) uint64 masks -> (t,) set sizes."""
    return np.bitwise_count(bits).sum(axis=1, dtype=np.int64)


def _top1(ids: np.ndarray) -> np.ndarray:
    """(t, k) ids in the model's order -> (t,) the first non-negative id (slot 0 normally), -1 if none."""
    ids = np.asarray(ids, dtype=np.int64)
    valid = ids >= 0
    first = ids[np.arange(ids.shape[0]), valid.argmax(axis=1)]
    return np.where(valid.any(axis=1), first, -1)


def _group_expert_counts(
    trace: Trace, layer: int, groupings: Sequence[tuple[np.ndarray, int]]
) -> list[np.ndarray]:
    """For each (groups (T,) int with -1 = no group, n_groups): (G, E) int64, the number of tokens of
    each group whose top-k set at `layer` includes each expert, by bincount on group * E + expert."""
    E = trace.n_experts
    flat = [np.zeros(n * E, dtype=np.int64) for _, n in groupings]
    for sl in _chunks(trace.n_tokens):
        ids = _ids(trace, layer, sl)  # (t, k)
        for (groups, n), acc in zip(groupings, flat):
            g = np.asarray(groups[sl], dtype=np.int64)
            keep = (ids >= 0) & (g >= 0)[:, None]
            acc += np.bincount((g[:, None] * E + ids)[keep], minlength=n * E)
    return [acc.reshape(n, E) for acc, (_, n) in zip(flat, groupings)]


def _shares(counts: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """counts / totals (broadcast), NaN where the total is 0."""
    totals = np.broadcast_to(np.asarray(totals, dtype=np.float64), counts.shape)
    out = np.full(counts.shape, np.nan)
    np.divide(counts, totals, out=out, where=totals > 0)
    return out


# ----------------------------------------------------------------------------- metrics


def expert_token_counts(trace: Trace) -> np.ndarray:
    """(L, E) int64: tokens whose top-k set includes each expert, per layer."""
    counts = np.zeros((trace.n_layers, trace.n_experts), dtype=np.int64)
    for layer in range(trace.n_layers):
        for sl in _chunks(trace.n_tokens):
            ids = _ids(trace, layer, sl)
            counts[layer] += np.bincount(ids[ids >= 0], minlength=trace.n_experts)
    return counts


def load(trace: Trace) -> np.ndarray:
    """(L, E): each expert's share of all top-k assignments at each layer (balanced = 1/E)."""
    counts = expert_token_counts(trace)
    return np.nan_to_num(_shares(counts, counts.sum(axis=1, keepdims=True)), nan=0.0)


def max_vio(trace: Trace, loads: np.ndarray | None = None) -> np.ndarray:
    """(L,): max(load) / mean(load) - 1, the worst overload (balanced = 0); NaN for a layer without
    assignments. `loads` reuses an already computed `load(trace)`."""
    loads = load(trace) if loads is None else np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=1)
    return _shares(loads.max(axis=1), mean) - 1.0


def router_entropy(trace: Trace) -> np.ndarray | None:
    """(L,): mean over tokens of the entropy (nats) of the router's distribution, or None without
    router_probs. Each stored float16 row is renormalised to sum 1 first (uniform routing = ln E)."""
    if trace.router_probs is None:
        return None
    total = np.zeros(trace.n_layers)
    for layer in range(trace.n_layers):
        for sl in _chunks(trace.n_tokens):
            p = np.asarray(trace.router_probs[layer, sl], dtype=np.float64)  # (t, E)
            p = np.nan_to_num(_shares(p, p.sum(axis=1, keepdims=True)), nan=0.0)
            safe = np.where(p > 0, p, 1.0)
            total[layer] -= (p * np.log(safe)).sum()
    return total / trace.n_tokens


def _adjacent_pairs(trace: Trace, layer: int, tokens: slice) -> np.ndarray:
    """(E, E) int64: [i, j] = tokens with i and j (i != j) in adjacent slots r, r+1 of their ordered
    top-k list at `layer` (either way round, counted once per token; pairs with a -1 slot skipped)."""
    _check_layer(trace, layer)
    E = trace.n_experts
    ids = np.asarray(trace.topk_ids[layer, tokens], dtype=np.int64)  # (t, k), the model's order
    a, b = ids[:, :-1], ids[:, 1:]
    valid = (a >= 0) & (b >= 0) & (a != b)
    keys = np.sort(
        np.where(np.concatenate([valid, valid], axis=1), np.concatenate([a * E + b, b * E + a], 1), -1)
    )
    keys[:, 1:][keys[:, 1:] == keys[:, :-1]] = -1  # a pair met twice by one token counts once
    return np.bincount(keys[keys >= 0], minlength=E * E).reshape(E, E)


def coactivation(trace: Trace, pairs: str = "all") -> np.ndarray:
    """(L, E, E): [l, i, j] = tokens with both i and j in their top-k set / tokens with i; diagonal 0,
    and 0 in row i where expert i is never chosen (random routing: (k-1)/(E-1) off the diagonal).

    pairs="adjacent" counts in the numerator only tokens with i and j in rank-adjacent slots of their
    ordered top-k list (what the OLMoE code computes; the same as "all" for k <= 2)."""
    if pairs not in COACTIVATION_MODES:
        raise MoelabError(f"co-activation pairs must be one of {COACTIVATION_MODES}, got {pairs!r}")
    L, E = trace.n_layers, trace.n_experts
    out = np.zeros((L, E, E))
    for layer in range(L):
        both = np.zeros((E, E), dtype=np.int64)
        adjacent = np.zeros((E, E), dtype=np.int64)
        for sl in _chunks(trace.n_tokens):
            m = _members(trace, layer, sl).astype(np.float32)  # (t, E); sums < 2^24 are exact
            both += np.rint(m.T @ m).astype(np.int64)
            if pairs == "adjacent":
                adjacent += _adjacent_pairs(trace, layer, sl)
        with_i = np.diag(both).copy()
        if pairs == "adjacent":
            both = adjacent
        np.fill_diagonal(both, 0)
        out[layer] = np.nan_to_num(_shares(both, with_i[:, None]), nan=0.0)
    return out


def domain_specialization(trace: Trace) -> dict[str, np.ndarray]:
    """{domain: (L, E)}: share of the domain's tokens whose top-k set includes each expert (random
    routing: k/E). Tokens of unknown domain (-1) are left out, and so are domains without tokens."""
    if trace.domains is None or not trace.domain_names:
        return {}
    names = trace.domain_names
    domains = np.asarray(trace.domains, dtype=np.int64)
    if domains.min() < -1 or domains.max() >= len(names):
        raise MoelabError(
            f"{trace.name}: domains.npy holds ids outside [-1, {len(names)}), but meta.json names "
            f"{len(names)} domains; re-run `moelab trace`"
        )
    sizes = np.bincount(domains[domains >= 0], minlength=len(names))  # (D,)
    per_layer = np.stack(
        [_group_expert_counts(trace, layer, [(domains, len(names))])[0] for layer in range(trace.n_layers)]
    )  # (L, D, E)
    shares = _shares(per_layer, sizes[None, :, None])
    return {name: shares[:, d] for d, name in enumerate(names) if sizes[d] > 0}


VOCAB_KEYS = {"input": "token_ids", "next": "next_ids", "predicted": "predicted_ids"}


def _vocab_groups(
    trace: Trace, min_count: int, key: str = "input"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids seen >= min_count times, their counts, (T,) group of each token: its id's rank or -1).
    key: which id labels a token: "input" (token_ids), "next" (next_ids; -1 = none, left out) or
    "predicted" (predicted_ids)."""
    if min_count < 1:
        raise MoelabError(f"min_count must be >= 1, got {min_count}")
    if key not in VOCAB_KEYS:
        raise MoelabError(f"key must be one of {tuple(VOCAB_KEYS)}, got {key!r}")
    array = VOCAB_KEYS[key]
    if getattr(trace, array) is None:
        hint = "" if key == "input" else "; record it with `moelab trace --predictions`"
        raise MoelabError(f"{trace.name} has no {array}{hint}")
    tokens = np.asarray(getattr(trace, array), dtype=np.int64)
    if tokens.min() < (0 if key == "input" else -1):
        raise MoelabError(f"{trace.name}: {array}.npy holds negative ids; re-run `moelab trace`")
    counts = np.bincount(tokens[tokens >= 0], minlength=1)
    ids = np.flatnonzero(counts >= min_count)
    rank = np.full(counts.shape[0], -1, dtype=np.int64)
    rank[ids] = np.arange(ids.shape[0])
    return ids, counts[ids], np.where(tokens >= 0, rank[np.maximum(tokens, 0)], -1)


def vocab_shares(
    trace: Trace, layer: int, min_count: int = 10, key: str = "input"
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids seen >= min_count times (V',) and (V', E): the share of each id's occurrences whose
    top-k set at `layer` includes each expert (key: as in vocab_specialization). The rows behind
    vocab_specialization and expert cards."""
    ids, counts, groups = _vocab_groups(trace, min_count, key)
    (per_id,) = _group_expert_counts(trace, layer, [(groups, ids.shape[0])])
    return ids, per_id / counts[:, None]


def vocab_specialization(trace: Trace, min_count: int = 10, key: str = "input") -> dict:
    """{"raw": (L,), "normalized": (L,), "min_count"}: raw = mean over ids seen >= min_count times of
    max_e (share of the id's occurrences routed to e); normalized = (raw - k/E) / (1 - k/E).
    key: the id a token is grouped by: "input" (its own id), "next" (the true next token; tokens with
    none are left out) or "predicted" (the model's argmax); the last two need a trace recorded with
    `moelab trace --predictions`. NaN where no id qualifies (or without the key's array)."""
    L, E, k = trace.n_layers, trace.n_experts, trace.top_k
    raw = np.full(L, np.nan)
    if key not in VOCAB_KEYS:
        raise MoelabError(f"key must be one of {tuple(VOCAB_KEYS)}, got {key!r}")
    if getattr(trace, VOCAB_KEYS[key]) is not None:
        ids, counts, groups = _vocab_groups(trace, min_count, key)
        if ids.shape[0]:
            for layer in range(L):
                (per_id,) = _group_expert_counts(trace, layer, [(groups, ids.shape[0])])
                raw[layer] = (per_id.max(axis=1) / counts).mean()
    base = k / E
    normalized = (raw - base) / (1 - base) if base < 1 else np.full(L, np.nan)
    return {"raw": raw, "normalized": normalized, "min_count": int(min_count)}


def expert_continuity_next(trace: Trace) -> np.ndarray:
    """(L,): share of tokens whose top-k set at layer l shares at least one expert id with layer l+1;
    NaN for the last layer. Random routing: 1 - C(E-k, k) / C(E, k)."""
    out = np.full(trace.n_layers, np.nan)
    for layer in range(trace.n_layers - 1):
        shared = 0
        for sl in _chunks(trace.n_tokens):
            shared += int((_bits(trace, layer, sl) & _bits(trace, layer + 1, sl)).any(axis=1).sum())
        out[layer] = shared / trace.n_tokens
    return out


def expert_continuity_multi(trace: Trace) -> dict[int, float]:
    """{s: share} for s = 1..L-1: over every (token, layer l, expert e in its top-k set at l) with
    l + s < L, the share whose e stays in the token's top-k set at every layer l+1..l+s.

    Per chunk of tokens, the top-k sets of all layers as bit masks; for each start layer l a running
    AND over l+1, l+2, ... counts the pairs still present. Random routing: (k/E)^s."""
    L = trace.n_layers
    kept = np.zeros((L, L), dtype=np.int64)  # [l, s]: (token, e) in the set at l and at l+1..l+s
    for sl in _chunks(trace.n_tokens):
        bits = [_bits(trace, layer, sl) for layer in range(L)]  # L x (t, W)
        for start in range(L - 1):
            running = bits[start]
            kept[start, 0] += _popcount(running).sum()
            for s in range(1, L - start):
                running = running & bits[start + s]
                kept[start, s] += _popcount(running).sum()
    out = {}
    for s in range(1, L):
        pairs = kept[: L - s, 0].sum()  # start layers 0 .. L-1-s
        out[s] = float(kept[: L - s, s].sum() / pairs) if pairs else math.nan
    return out


def expert_continuity_all(trace: Trace) -> dict:
    """Continuity between every pair of layers, not only neighbours (cross-layer routing ties them all).

    "matrix": (L, L) share of tokens whose top-k sets at layers l and m share at least one expert id
    (symmetric; 1 on the diagonal); "by_distance": {s: mean over l of matrix[l, l+s]} for s = 1..L-1.
    Random routing: 1 - C(E-k, k) / C(E, k) off the diagonal, as continuity_next."""
    L = trace.n_layers
    meets = np.zeros((L, L), dtype=np.int64)
    for sl in _chunks(trace.n_tokens):
        bits = [_bits(trace, layer, sl) for layer in range(L)]  # L x (t, W)
        for first in range(L):
            for second in range(first + 1, L):
                meets[first, second] += int((bits[first] & bits[second]).any(axis=1).sum())
    matrix = (meets + meets.T) / max(trace.n_tokens, 1)
    np.fill_diagonal(matrix, 1.0)
    by_distance = {s: float(np.diagonal(matrix, offset=s).mean()) for s in range(1, L)}
    return {"matrix": matrix, "by_distance": by_distance}


def router_similarity(router_weights: list[np.ndarray]) -> np.ndarray:
    """(L, L): for layers l and m, the mean over experts e of cos(W_l[e], W_m[e]), the rows of each
    layer's effective router (E, D_in). Meaningful where expert e reads the same input at every layer
    (cross-layer routing: shared gate + offset); 1 means every layer routes alike."""
    unit = [w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12) for w in router_weights]
    L = len(unit)
    out = np.ones((L, L))
    for first in range(L):
        for second in range(first + 1, L):
            out[first, second] = out[second, first] = float((unit[first] * unit[second]).sum(axis=1).mean())
    return out


def _layer_span(trace: Trace, layers: tuple[int, int] | None) -> tuple[int, int]:
    first, last = (0, trace.n_layers - 1) if layers is None else (int(layers[0]), int(layers[1]))
    if not 0 <= first <= last < trace.n_layers:
        raise MoelabError(
            f"path layers {first}:{last} are outside the trace's {trace.n_layers} MoE layers; "
            f"use FIRST:LAST with 0 <= FIRST <= LAST <= {trace.n_layers - 1}"
        )
    return first, last


def route_codes(trace: Trace, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """(code (T,), routed (T,) bool): equal codes = equal top-1 routes over layers first..last; routed is
    False for a token without an expert at some layer of the span (its code is then meaningless)."""
    T, E = trace.n_tokens, trace.n_experts
    code = np.zeros(T, dtype=np.int64)  # route so far, renumbered densely (< T) after every layer
    routed = np.ones(T, dtype=bool)
    for layer in range(first, last + 1):
        _check_layer(trace, layer)
        top = np.empty(T, dtype=np.int64)
        for sl in _chunks(T):
            top[sl] = _top1(trace.topk_ids[layer, sl])
        routed &= top >= 0
        code = np.unique(code * E + np.maximum(top, 0), return_inverse=True)[1].reshape(-1)
    return code, routed


def paths(trace: Trace, layers: tuple[int, int] | None = None) -> dict:
    """Routes = tuples of top-1 experts over layers first..last (inclusive; default all).

    Returns {"layers": [first, last], "distinct", "cover_80", "cover_95", "norm_entropy"}: the number
    of distinct routes, the fewest routes that cover >= 80% / 95% of tokens, and the route entropy in
    bits / ((last - first + 1) log2 E) (1 = uniform over all E^n routes). A token without any expert
    at some layer of the span has no route and is left out.
    """
    first, last = _layer_span(trace, layers)
    E = trace.n_experts
    code, routed = route_codes(trace, first, last)
    counts = np.sort(np.unique(code[routed], return_counts=True)[1])[::-1]
    n = int(counts.sum())
    if n == 0:
        return {
            "layers": [first, last],
            "distinct": 0,
            "cover_80": 0,
            "cover_95": 0,
            "norm_entropy": math.nan,
        }
    covered = np.cumsum(counts) * 100  # integer comparison: no rounding at the thresholds
    p = counts / n
    entropy = float(-(p * np.log2(p)).sum())
    return {
        "layers": [first, last],
        "distinct": int(counts.shape[0]),
        "cover_80": int(np.argmax(covered >= 80 * n)) + 1,
        "cover_95": int(np.argmax(covered >= 95 * n)) + 1,
        "norm_entropy": entropy / ((last - first + 1) * math.log2(E)) if E > 1 else math.nan,
    }


def js_distance(p, q) -> np.ndarray:
    """Jensen-Shannon distance (base 2, the square root of the divergence; in [0, 1]) between
    distributions along the last axis. NaN where either input row has NaN."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    m = (p + q) / 2

    def kl_to_m(a: np.ndarray) -> np.ndarray:
        ratio = np.where(a > 0, a, 1.0) / np.where(m > 0, m, 1.0)
        return np.where(a > 0, a * np.log2(ratio), 0.0).sum(axis=-1)

    divergence = (kl_to_m(p) + kl_to_m(q)) / 2
    out = np.sqrt(np.clip(divergence, 0.0, 1.0))
    return np.where(np.isnan(p).any(axis=-1) | np.isnan(q).any(axis=-1), np.nan, out)


def contextual(trace: Trace) -> dict | None:
    """TIS and ICS of every contextual word per layer, or None for an ordinary trace.

    The expert distribution of a set of tokens at a layer is the normalised histogram over E of their
    top-k sets. TIS(word, l) = JS distance between the distribution of the word's target occurrences
    and that of all tokens of the word's samples; ICS(word, l) = mean over senses (with at least one
    target occurrence) of the JS distance between the sense's target occurrences and all the word's
    target occurrences. Returns {"tis": {word: (L,)}, "ics": {word: (L,)}}, NaN where undefined.
    """
    ctx = trace.contextual
    if ctx is None:
        return None
    words, senses = ctx["words"], ctx["senses"]
    W, S = len(words), max([len(s) for s in senses] + [1])
    word = np.asarray(trace.context_word, dtype=np.int64)
    sense = np.asarray(trace.context_sense, dtype=np.int64)
    target = np.asarray(trace.context_target, dtype=bool)
    n_senses = np.array([len(s) for s in senses] + [0], dtype=np.int64)  # [-1] -> 0 senses
    if word.min(initial=0) < -1 or word.max(initial=-1) >= W:
        raise MoelabError(
            f"{trace.name}: context_word.npy holds ids outside [-1, {W}); re-run `moelab trace`"
        )
    if np.any((word >= 0) & (sense >= n_senses[word])) or sense.min(initial=0) < -1:
        raise MoelabError(
            f"{trace.name}: context_sense.npy holds senses its word lacks; re-run `moelab trace`"
        )
    targets = np.where(target & (word >= 0), word, -1)
    sense_targets = np.where((targets >= 0) & (sense >= 0), word * S + sense, -1)
    tis = np.full((W, trace.n_layers), np.nan)
    ics = np.full((W, trace.n_layers), np.nan)
    for layer in range(trace.n_layers):
        by_target, by_sample, by_sense = _group_expert_counts(
            trace, layer, [(targets, W), (word, W), (sense_targets, W * S)]
        )
        target_dist = _shares(by_target, by_target.sum(axis=1, keepdims=True))  # (W, E)
        sample_dist = _shares(by_sample, by_sample.sum(axis=1, keepdims=True))
        sense_dist = _shares(by_sense, by_sense.sum(axis=1, keepdims=True)).reshape(W, S, -1)
        tis[:, layer] = js_distance(target_dist, sample_dist)
        per_sense = js_distance(sense_dist, target_dist[:, None, :])  # (W, S), NaN for absent senses
        present = ~np.isnan(per_sense)
        ics[:, layer] = _shares(np.where(present, per_sense, 0.0).sum(axis=1), present.sum(axis=1))
    return {"tis": dict(zip(words, tis)), "ics": dict(zip(words, ics))}


def saturation(trace: Trace, ref: Trace) -> dict[str, np.ndarray]:
    """Router saturation against a reference trace of the same tokens (another checkpoint), per layer:
    "top1" = share of tokens whose top-1 expert equals the reference's, "topk" = mean |S ∩ S_ref| / k.

    Both are means over the tokens the reference routes at that layer, and "topk" divides each token's
    overlap by |S_ref| (= k unless the reference pads with -1), so a trace compared with itself scores
    exactly 1. Random routing: 1/E and k/E.
    """
    for key in ("n_tokens", "n_layers", "n_experts", "top_k"):
        if trace.meta[key] != ref.meta[key]:
            raise MoelabError(
                f"cannot compare {trace.name} with {ref.name}: {key} {trace.meta[key]} != {ref.meta[key]}; "
                "trace both checkpoints on the same data"
            )
    if (
        trace.token_ids is not None
        and ref.token_ids is not None
        and not np.array_equal(trace.token_ids, ref.token_ids)
    ):
        raise MoelabError(
            f"cannot compare {trace.name} with {ref.name}: their token_ids differ; "
            "trace both checkpoints on the same data with the same --max-tokens"
        )
    L = trace.n_layers
    same_top1, routed = np.zeros(L, dtype=np.int64), np.zeros(L, dtype=np.int64)
    overlap_sum = np.zeros(L)
    for layer in range(L):
        for sl in _chunks(trace.n_tokens):  # _bits checks the ids of both traces
            top, ref_top = _top1(trace.topk_ids[layer, sl]), _top1(ref.topk_ids[layer, sl])
            same_top1[layer] += int(((top == ref_top) & (ref_top >= 0)).sum())
            routed[layer] += int((ref_top >= 0).sum())  # tokens with a non-empty reference set
            ref_bits = _bits(ref, layer, sl)  # (t, W)
            size = _popcount(ref_bits)
            shared = _popcount(_bits(trace, layer, sl) & ref_bits)
            overlap_sum[layer] += (shared[size > 0] / size[size > 0]).sum()
    return {"top1": _shares(same_top1, routed), "topk": _shares(overlap_sum, routed)}


# ----------------------------------------------------------------------------- protocol views

SOURCES = ("recorded", "preferred")
COACTIVATION_MODES = ("all", "adjacent")


class _LazyIds:
    """A stand-in for a (L, T, k') topk_ids array whose `[layer, token_slice]` rows are computed on
    demand by `rows(layer, slice)`, one chunk at a time (any other indexing materialises it all)."""

    def __init__(self, shape: tuple[int, int, int], rows):
        self.shape, self._rows = shape, rows
        self.dtype, self.ndim = np.dtype(np.int64), 3

    def __getitem__(self, key):
        if isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int | np.integer):
            layer, tokens = int(key[0]), key[1]
            if isinstance(tokens, slice):
                return self._rows(layer, tokens)
        return np.asarray(self)[key]

    def __array__(self, dtype=None, copy=None):
        full = np.stack([self._rows(layer, slice(0, self.shape[1])) for layer in range(self.shape[0])])
        return full if dtype is None else full.astype(dtype)


def _view(trace: Trace, topk_ids: _LazyIds, name: str) -> Trace:
    """`trace` with another topk_ids (top_k = its width) and no topk_weights: the metric functions
    then measure the view unchanged. Everything else (token ids, domains, router_probs) is shared."""
    arrays = {key: getattr(trace, key) for key in ("token_ids", "doc_ids", "positions", "domains")}
    arrays.update(
        {
            key: getattr(trace, key)
            for key in (
                "router_probs",
                "context_word",
                "context_sense",
                "context_target",
                "predicted_ids",
                "next_ids",
            )
        }
    )
    arrays["topk_ids"] = topk_ids
    return Trace(arrays, {**trace.meta, "top_k": topk_ids.shape[2]}, name=f"{trace.name} ({name})")


def _preferred_rows(trace: Trace, layer: int, tokens: slice) -> np.ndarray:
    """(t, k): the k experts of largest router probability, in descending order (ties: lower id)."""
    p = np.asarray(trace.router_probs[layer, tokens], dtype=np.float32)  # (t, E)
    return np.argsort(-p, axis=1, kind="stable")[:, : trace.top_k].astype(np.int64)


def preferred_view(trace: Trace) -> Trace:
    """`trace` routed as its router prefers: each token's top-k recomputed from router_probs (the
    unbiased probabilities, before any loss-free balancing bias), in descending order."""
    if trace.router_probs is None:
        raise MoelabError(
            f"{trace.name} has no router_probs; --source preferred needs a trace recorded with "
            "`moelab trace --router-probs`"
        )
    if trace.top_k > trace.n_experts:
        raise MoelabError(
            f"{trace.name}: top_k {trace.top_k} > n_experts; --source preferred needs a flat router"
        )
    shape = (trace.n_layers, trace.n_tokens, trace.top_k)
    return _view(trace, _LazyIds(shape, lambda layer, sl: _preferred_rows(trace, layer, sl)), "preferred")


def top1_view(trace: Trace) -> Trace:
    """`trace` with each token's first expert only (its top-1 in the model's order; -1 if it has none)."""
    shape = (trace.n_layers, trace.n_tokens, 1)
    return _view(trace, _LazyIds(shape, lambda layer, sl: _top1(trace.topk_ids[layer, sl])[:, None]), "top-1")


def preferred_differs(trace: Trace) -> np.ndarray | None:
    """(L,): share of tokens whose preferred top-k set (from router_probs, see `preferred_view`) differs
    from the recorded top-k set; None without router_probs or for a tree trace (top_k > E)."""
    if trace.router_probs is None or trace.top_k > trace.n_experts:
        return None
    preferred = preferred_view(trace)
    out = np.zeros(trace.n_layers)
    for layer in range(trace.n_layers):
        for sl in _chunks(trace.n_tokens):
            differs = (_bits(trace, layer, sl) != _bits(preferred, layer, sl)).any(axis=1)
            out[layer] += int(differs.sum())
    return out / trace.n_tokens


# ----------------------------------------------------------------------------- the whole analysis


def _vocab_by_key(trace: Trace, min_count: int) -> dict | None:
    """{"next": {"raw", "normalized"}, "predicted": {...}} (vocab_specialization by the true and the
    predicted next token), or None for a trace without predicted_ids/next_ids."""
    if trace.predicted_ids is None or trace.next_ids is None:
        return None
    by_key = {key: vocab_specialization(trace, min_count, key) for key in ("next", "predicted")}
    return {key: {"raw": v["raw"], "normalized": v["normalized"]} for key, v in by_key.items()}


def _plain(x):
    """numpy values -> JSON values: lists, ints, floats, NaN -> None."""
    if isinstance(x, dict):
        return {str(key): _plain(value) for key, value in x.items()}
    if isinstance(x, np.ndarray | list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, bool | np.bool_):
        return bool(x)
    if isinstance(x, int | np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return None if math.isnan(x) else float(x)
    return x


def analyze(
    trace: Trace,
    min_count: int = 10,
    path_layers: tuple[int, int] | None = None,
    compare: Trace | Sequence[Trace] | None = None,
    progress: bool = False,
    k: int | None = None,
    coactivation_pairs: str = "all",
    source: str = "recorded",
    nulls: int = 0,
    seed: int = 0,
) -> dict:
    """Every metric of `trace` as a JSON-ready dict (the structure `moelab analyze --json` prints).

    Protocol options (docs/METRICS.md, "Protocol options"; recorded under "protocol"): `k=1` measures
    domain and vocabulary specialization on each token's first expert only; `coactivation_pairs=
    "adjacent"` counts rank-adjacent pairs only; `source="preferred"` analyses the top-k recomputed
    from router_probs (of `trace` and of every `compare` trace). Any trace with router_probs gets
    "preferred_differs": per layer, the share of tokens whose preferred top-k set differs from the
    recorded one.

    Layer rows get "width_load" for traces with mixed expert widths, the result gets "tree" for tree
    traces (moelab.interp.structure); "vocab_specialization_by_key" ({"next", "predicted"}: vocabulary
    specialization keyed on the true and the predicted next token) for traces recorded with
    `moelab trace --predictions` only; "contextual" is present for contextual traces only, "saturation"
    only with `compare`: one reference gives {"top1", "topk"}; several give a list of {"reference",
    "top1", "topk"}.

    `nulls=R` > 0 adds "nulls": the headline numbers with their permutation and label-shuffle null
    baselines over R shuffles seeded by `seed` (moelab.interp.nulls.baselines); 0 leaves it out.
    """
    from tqdm import tqdm

    refs = [] if compare is None else [compare] if isinstance(compare, Trace) else list(compare)
    if source not in SOURCES:
        raise MoelabError(f"source must be one of {SOURCES}, got {source!r}")
    if k not in (None, 1, trace.top_k):
        raise MoelabError(f"k must be 1 or the trace's top_k {trace.top_k}, got {k}")
    if coactivation_pairs not in COACTIVATION_MODES:
        raise MoelabError(f"coactivation must be one of {COACTIVATION_MODES}, got {coactivation_pairs!r}")
    differs = preferred_differs(trace)
    if source == "preferred":
        trace, refs = preferred_view(trace), [preferred_view(ref) for ref in refs]
    specialized = top1_view(trace) if k == 1 else trace  # domain and vocabulary specialization
    path_layers = _layer_span(trace, path_layers)
    steps = [
        ("load", lambda: expert_token_counts(trace)),
        ("router entropy", lambda: router_entropy(trace)),
        ("co-activation", lambda: coactivation(trace, coactivation_pairs)),
        ("domains", lambda: domain_specialization(specialized)),
        ("vocabulary", lambda: vocab_specialization(specialized, min_count)),
        ("vocabulary by key", lambda: _vocab_by_key(specialized, min_count)),
        ("continuity", lambda: expert_continuity_next(trace)),
        ("multi-layer continuity", lambda: expert_continuity_multi(trace)),
        ("continuity between all layers", lambda: expert_continuity_all(trace)),
        ("paths", lambda: paths(trace, path_layers)),
        ("contextual", lambda: contextual(trace)),
        ("structure", lambda: structure.analysis(trace, results["load"], results["domains"])),
        ("transitions", lambda: transitions.analysis(trace)),
        ("routes", lambda: transitions.common_routes(trace, path_layers)),
    ] + [(f"saturation {i}", lambda ref=ref: saturation(trace, ref)) for i, ref in enumerate(refs)]
    results = {}
    bar = tqdm(steps, desc="analyze", unit="metric", disable=not progress, file=sys.stderr, leave=False)
    for name, step in bar:
        bar.set_postfix_str(name)
        results[name] = step()
    bar.close()

    counts, entropy, vocab = results["load"], results["router entropy"], results["vocabulary"]
    loads = np.nan_to_num(_shares(counts, counts.sum(axis=1, keepdims=True)), nan=0.0)
    vios, domains = max_vio(trace, loads), results["domains"]
    layers = [
        {
            "layer": layer,
            "load": loads[layer],
            "max_vio": vios[layer],
            "router_entropy": None if entropy is None else entropy[layer],
            "coactivation": results["co-activation"][layer],
            "domain_specialization": {name: shares[layer] for name, shares in domains.items()},
            "vocab_specialization": {
                "raw": vocab["raw"][layer],
                "normalized": vocab["normalized"][layer],
                "min_count": vocab["min_count"],
            },
            "expert_continuity_next": results["continuity"][layer],
        }
        for layer in range(trace.n_layers)
    ]
    shape = results["structure"]
    if shape["width_load"] is not None:  # mixed expert widths
        for row, widths in zip(layers, shape["width_load"]):
            row["width_load"] = widths
    out = {
        "n_tokens": trace.n_tokens,
        "n_layers": trace.n_layers,
        "n_experts": trace.n_experts,
        "top_k": trace.top_k,
        "layers": layers,
        "expert_continuity_multi": results["multi-layer continuity"],
        "expert_continuity_all": results["continuity between all layers"],
        "paths": results["paths"],
        "transitions": results["transitions"],
        "routes": results["routes"],
    }
    out["protocol"] = {
        "source": source,
        "k": trace.top_k if k is None else k,
        "min_count": int(min_count),
        "coactivation": coactivation_pairs,
    }
    if differs is not None:
        out["preferred_differs"] = differs
    if "router_similarity" in trace.meta:  # recorded at trace time from the model's weights
        out["router_similarity"] = trace.meta["router_similarity"]
    if shape["tree"] is not None:
        out["tree"] = shape["tree"]
    if results["contextual"] is not None:
        out["contextual"] = results["contextual"]
    if results["vocabulary by key"] is not None:
        out["vocab_specialization_by_key"] = results["vocabulary by key"]
    saturations = [results[f"saturation {i}"] for i in range(len(refs))]
    if len(refs) == 1:
        out["saturation"] = saturations[0]
    elif refs:
        out["saturation"] = [{"reference": ref.name, **sat} for ref, sat in zip(refs, saturations)]
    if nulls:  # null baselines of the headline numbers (moelab.interp.nulls; docs/METRICS.md)
        from moelab.interp import nulls as null_baselines

        out["nulls"] = null_baselines.baselines(trace, nulls, seed, min_count, path_layers, k)
    return _plain(out)


# ----------------------------------------------------------------------------- the command


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def summary_table(result: dict, reference: str = "the reference") -> str:
    """A terminal-readable summary of an `analyze` result (`reference`: name of a single --compare trace)."""
    E, k = result["n_experts"], result["top_k"]
    base_share = k / E
    random_next = 1 - math.comb(E - k, k) / math.comb(E, k)
    lines = [
        f"{result['n_tokens']:,} tokens, {result['n_layers']} MoE layers, {E} experts, top-{k}.",
        f"Random routing: max_vio 0, domain share k/E = {base_share:.3f}, continuity {random_next:.3f}, "
        f"entropy ln E = {math.log(E):.3f}.",
        "",
        f"{'layer':>5} {'max_vio':>8} {'entropy':>8} {'cont->next':>10} {'vocab raw':>9} {'vocab norm':>10}"
        f"  {'most specialised domain':<24} {'share':>6} {'x k/E':>6}",
    ]
    for row in result["layers"]:
        best = None  # (share, domain, expert)
        for name, shares in row["domain_specialization"].items():
            valid = [(s, e) for e, s in enumerate(shares) if s is not None]
            if valid:
                share, expert = max(valid)
                if best is None or share > best[0]:
                    best = (share, name, expert)
        where = f"{best[1]} (expert {best[2]})" if best else "-"
        vocab = row["vocab_specialization"]
        lines.append(
            f"{row['layer']:>5} {_fmt(row['max_vio']):>8} {_fmt(row['router_entropy']):>8} "
            f"{_fmt(row['expert_continuity_next']):>10} {_fmt(vocab['raw']):>9} "
            f"{_fmt(vocab['normalized']):>10}"
            f"  {where[:24]:<24} {_fmt(best and best[0]):>6} "
            f"{_fmt(best and best[0] / base_share, '.1f'):>6}"
        )
    p = result["paths"]
    lines += [
        "",
        f"Paths over layers {p['layers'][0]}-{p['layers'][1]}: {p['distinct']:,} distinct top-1 routes; "
        f"{p['cover_80']:,} cover 80% of tokens, {p['cover_95']:,} cover 95%; "
        f"normalised entropy {_fmt(p['norm_entropy'])}.",
    ]
    multi = result["expert_continuity_multi"]
    if multi:
        lines.append(
            "Expert kept for s more layers (random (k/E)^s in brackets): "
            + "  ".join(f"s={s} {_fmt(v)} [{base_share ** int(s):.3f}]" for s, v in multi.items())
        )
    every = result.get("expert_continuity_all", {}).get("by_distance")
    if every:
        lines.append(
            f"Some expert shared with the layer s above (random {random_next:.3f}): "
            + "  ".join(f"s={s} {_fmt(v)}" for s, v in every.items())
        )
    if "router_similarity" in result:
        sim = np.asarray(result["router_similarity"])
        lines.append(
            "Effective-router similarity with the layer s above (mean cosine over experts): "
            + "  ".join(f"s={s} {np.diagonal(sim, s).mean():.3f}" for s in range(1, len(sim)))
        )
    by_key = result.get("vocab_specialization_by_key")
    if by_key:
        lines.append(
            "Normalised vocab specialization per layer by input / true next / predicted next token: "
            + "  ".join(
                f"{_fmt(a)}/{_fmt(b)}/{_fmt(c)}"
                for a, b, c in zip(
                    (row["vocab_specialization"]["normalized"] for row in result["layers"]),
                    by_key["next"]["normalized"],
                    by_key["predicted"]["normalized"],
                )
            )
        )
    lines += structure.summary_lines(result)
    lines += transitions.summary_lines(result)
    if "nulls" in result:
        from moelab.interp import nulls as null_baselines

        lines += null_baselines.summary_lines(result)
    if "contextual" in result:
        lines += ["", "Contextual words (TIS / ICS per layer):"]
        for word, tis in result["contextual"]["tis"].items():
            ics = result["contextual"]["ics"][word]
            cells = "  ".join(f"{_fmt(a, '.2f')}/{_fmt(b, '.2f')}" for a, b in zip(tis, ics))
            lines.append(f"  {word!r:<16} {cells}")
    if "preferred_differs" in result:
        lines += ["", "Tokens whose preferred top-k (from router_probs) differs from the recorded one:"]
        lines += [f"{'layer':>5} {'share':>6}"]
        lines += [f"{layer:>5} {_fmt(share):>6}" for layer, share in enumerate(result["preferred_differs"])]
    protocol = result.get("protocol")
    if protocol and (protocol["source"], protocol["k"], protocol["coactivation"]) != ("recorded", k, "all"):
        lines += [
            "",
            f"Protocol: source {protocol['source']}, specialization on top-{protocol['k']}, "
            f"co-activation over {protocol['coactivation']} pairs, min_count {protocol['min_count']}.",
        ]
    if "saturation" in result:
        sats = result["saturation"]
        sats = [{"reference": reference, **sats}] if isinstance(sats, dict) else sats
        lines.append("")
        for sat in sats:
            lines.append(
                f"Saturation vs {sat['reference']}: top-1 "
                + " ".join(_fmt(v) for v in sat["top1"])
                + " | top-k "
                + " ".join(_fmt(v) for v in sat["topk"])
            )
    return "\n".join(lines)


def _parse_layers(text: str) -> tuple[int, int]:
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise MoelabError(f"--path-layers {text!r} must be FIRST:LAST, e.g. 0:7") from None
    return first, last


def cmd_analyze(args) -> None:
    """`moelab analyze TRACE [--json] [--compare REF ...] [--min-count N] [--path-layers FIRST:LAST]
    [--k 1] [--coactivation all|adjacent] [--source recorded|preferred]`, or
    `moelab analyze RUN --saturation` (moelab.interp.saturation_series)."""
    if getattr(args, "saturation", False):
        from moelab.interp.saturation_series import cmd_saturation

        return cmd_saturation(args)
    from moelab.cli import show_progress

    for flag in ("data", "split", "max_tokens"):
        if getattr(args, flag, None) is not None:
            raise MoelabError(f"--{flag.replace('_', '-')} only applies with --saturation")
    if args.min_count < 1:
        raise MoelabError(f"--min-count must be >= 1, got {args.min_count}")
    trace = Trace.open(args.trace)
    if getattr(args, "source", "recorded") == "preferred" and trace.router_probs is None:
        raise MoelabError(
            f"--source preferred needs router_probs, but {trace.name} has none; "
            "re-trace with `moelab trace --router-probs`"
        )
    if getattr(args, "k", None) not in (None, 1, trace.top_k):
        raise MoelabError(f"--k must be 1 or the trace's top_k {trace.top_k}, got {args.k}")
    refs = [Trace.open(path) for path in args.compare]
    layers = _parse_layers(args.path_layers) if args.path_layers else None
    result = analyze(
        trace,
        min_count=args.min_count,
        path_layers=layers,
        compare=refs[0] if len(refs) == 1 else refs or None,
        progress=show_progress(args),
        k=getattr(args, "k", None),
        coactivation_pairs=getattr(args, "coactivation", "all"),
        source=getattr(args, "source", "recorded"),
        nulls=getattr(args, "nulls", 0),
    )
    if getattr(args, "lens", None):
        from moelab.interp.lens import read_lens

        result["lens"] = read_lens(args.lens, trace.n_layers, trace.n_experts)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"trace {trace.name}")
        print(summary_table(result, reference=refs[0].name if refs else "the reference"))
