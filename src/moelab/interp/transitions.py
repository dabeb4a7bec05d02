"""Cross-layer transitions: how a token's expert at layer l+1 depends on its expert at layer l.

For every adjacent pair of MoE layers, a joint distribution over (expert i at l, expert j at l+1):

- top-1: each token whose top-1 expert (first non-negative id, model order) is defined at both layers
  adds 1 to (top1_l, top1_{l+1});
- top-k: each token with non-empty top-k sets S_l and S_{l+1} adds 1 / (|S_l| · |S_{l+1}|) to every
  (i, j) in S_l × S_{l+1}, so that every counted token weighs 1 in total.

From it: P(j | i) (rows normalised), the conditional entropy H(J|I) and the marginal entropy H(J) in
bits, predictability 1 - H(J|I) / H(J) (0 for independent layers, 1 when layer l decides l+1), and the
strongest links. Counting is bincount over keys i·E + j, token chunk by token chunk like
`moelab.interp.metrics` (which calls `analysis` from `analyze`). Formulas and baselines:
docs/METRICS.md ("Cross-layer transitions"); tests/test_transitions.py checks them against a per-token loop.
"""

from __future__ import annotations

import numpy as np

from moelab.interp import metrics

TOP_LINKS = 10  # (i -> j) links listed per layer pair and variant
TOP_ROUTES = 12  # most common multi-layer routes listed (and drawn in the report)


def joint_counts(trace, layer: int) -> dict[str, np.ndarray]:
    """{"top1", "topk"}: (E, E) float64 token weight of (expert i at `layer`, expert j at `layer` + 1)."""
    E = trace.n_experts
    top1, topk = np.zeros(E * E), np.zeros(E * E)
    metrics._check_layer(trace, layer)
    metrics._check_layer(trace, layer + 1)
    for sl in metrics._chunks(trace.n_tokens):
        a = metrics._top1(trace.topk_ids[layer, sl])
        b = metrics._top1(trace.topk_ids[layer + 1, sl])
        both = (a >= 0) & (b >= 0)
        top1 += np.bincount(a[both] * E + b[both], minlength=E * E)
        ids_a, ids_b = metrics._ids(trace, layer, sl), metrics._ids(trace, layer + 1, sl)  # (t, k), deduped
        size_a, size_b = (ids_a >= 0).sum(axis=1), (ids_b >= 0).sum(axis=1)
        weight = np.divide(1.0, size_a * size_b, out=np.zeros(len(size_a)), where=size_a * size_b > 0)
        keys = ids_a[:, :, None] * E + ids_b[:, None, :]  # (t, k, k)
        valid = (ids_a[:, :, None] >= 0) & (ids_b[:, None, :] >= 0)
        w = np.broadcast_to(weight[:, None, None], keys.shape)
        topk += np.bincount(keys[valid], weights=w[valid], minlength=E * E)
    return {"top1": top1.reshape(E, E), "topk": topk.reshape(E, E)}


def common_routes(trace, layers: tuple[int, int] | None = None, top: int = TOP_ROUTES) -> dict:
    """The `top` most common top-1 routes over layers first..last (default all): {"layers": [first, last],
    "routed": tokens with a route, "routes": [{"experts": [e_first, ..., e_last], "tokens", "share"}]},
    most common first (ties: the route whose first token comes first). Routes as in `metrics.paths`."""
    first, last = metrics._layer_span(trace, layers)
    code, routed = metrics.route_codes(trace, first, last)
    where = np.flatnonzero(routed)  # tokens with a route
    _, first_token, counts = np.unique(code[where], return_index=True, return_counts=True)
    order = np.lexsort((first_token, -counts))[:top]  # by count desc, then first occurrence
    representative = where[first_token[order]]  # one token per chosen route, (R,)
    experts = (
        np.stack(
            [
                metrics._top1(np.asarray(trace.topk_ids[layer, representative]))
                for layer in range(first, last + 1)
            ],
            axis=1,
        )
        if len(representative)
        else np.zeros((0, last - first + 1), dtype=np.int64)
    )  # (R, n)
    n = int(len(where))
    return {
        "layers": [first, last],
        "routed": n,
        "routes": [
            {"experts": [int(e) for e in row], "tokens": int(c), "share": int(c) / n}
            for row, c in zip(experts, counts[order])
        ],
    }


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Entropy in bits along the last axis of rows that sum to 1 (0 · log 0 = 0)."""
    logs = np.log2(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logs).sum(axis=-1)


def summarize(joint: np.ndarray, top: int = TOP_LINKS) -> dict:
    """A joint weight matrix -> {"tokens", "conditional" P(j|i) (NaN rows for unused i),
    "conditional_entropy" H(J|I), "marginal_entropy" H(J) (bits), "predictability", "top_links"}."""
    E = joint.shape[0]
    total = float(joint.sum())
    out = {"tokens": total, "conditional": np.full((E, E), np.nan), "top_links": []}
    if total <= 0:
        return out | {"conditional_entropy": np.nan, "marginal_entropy": np.nan, "predictability": np.nan}
    rows = joint.sum(axis=1)
    used = rows > 0
    cond = out["conditional"]
    cond[used] = joint[used] / rows[used, None]
    p_i = rows / total
    h_cond = float((p_i[used] * _entropy_bits(cond[used])).sum())
    h_marg = float(_entropy_bits(joint.sum(axis=0) / total))
    flat = joint.ravel() / total
    order = np.argsort(-flat, kind="stable")[:top]
    out["top_links"] = [
        {"from": int(k // E), "to": int(k % E), "joint": float(flat[k]), "conditional": float(cond.flat[k])}
        for k in order
        if flat[k] > 0
    ]
    predict = 1 - h_cond / h_marg if h_marg > 0 else np.nan
    return out | {"conditional_entropy": h_cond, "marginal_entropy": h_marg, "predictability": predict}


def analysis(trace) -> dict:
    """{"top_links": TOP_LINKS, "pairs": [{"layers": [l, l+1], "top1": summary, "topk": summary}, ...]}
    for every adjacent layer pair (none for a one-layer trace)."""
    pairs = []
    for layer in range(trace.n_layers - 1):
        joint = joint_counts(trace, layer)
        pairs.append({"layers": [layer, layer + 1], **{key: summarize(m) for key, m in joint.items()}})
    return {"top_links": TOP_LINKS, "pairs": pairs}


def _fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def summary_lines(result: dict) -> list[str]:
    """Terminal lines for the "transitions" key of an `analyze` result (none without layer pairs)."""
    pairs = result.get("transitions", {}).get("pairs", [])
    if not pairs:
        return []
    lines = [
        "",
        "Cross-layer transitions: predictability 1 - H(J|I)/H(J) of the expert at l+1 from the one at l "
        "(independent layers 0), H in bits; strongest top-1 link i->j with P(j|i):",
    ]
    for pair in pairs:
        one, many = pair["top1"], pair["topk"]
        link = one["top_links"][0] if one["top_links"] else None
        strongest = f"{link['from']}->{link['to']} ({_fmt(link['conditional'])})" if link else "-"
        lines.append(
            f"  {pair['layers'][0]:>3}->{pair['layers'][1]:<3} top-1 {_fmt(one['predictability'])} "
            f"(H {_fmt(one['conditional_entropy'], '.2f')}/{_fmt(one['marginal_entropy'], '.2f')})  "
            f"top-k {_fmt(many['predictability'])} "
            f"(H {_fmt(many['conditional_entropy'], '.2f')}/{_fmt(many['marginal_entropy'], '.2f')})  "
            f"link {strongest}"
        )
    return lines
