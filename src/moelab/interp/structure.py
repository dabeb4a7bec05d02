"""Metrics of a model's expert structure: load per width group (mixed expert widths) and tree routing.

They apply only to traces whose meta.json describes the structure (`moelab trace` records it):
`expert_widths` (the hidden width of every expert, per MoE layer, when they are not all equal) and
`tree` ({"branches": b, "depth": D}: the experts are the edges of a perfect b-ary tree of depth D in
heap order; child c of node i is node b·i + c + 1, expert index = node·b + branch, so expert e leads
into node e + 1, and the token's top-k set lists the edges it used, padded with -1).

Like `moelab.interp.metrics` (which calls these from `analyze`), nothing loops over tokens: counts come
from the per-expert counts and domain shares already computed there, and paths from one `np.unique`
over the tokens' top-k sets held as bit masks. Formulas and random baselines: docs/METRICS.md
("Expert widths", "Tree routing"); tests/test_structure.py checks each against a per-token loop.
"""

from __future__ import annotations

import math

import numpy as np

from moelab.errors import MoelabError

TOP_PATHS = 10  # paths listed (and whose share is reported) per layer
MIN_NODE_SHARE = 0.01  # nodes reached by a smaller share of tokens are left out of the nested tree


# ----------------------------------------------------------------------------- tree geometry


def tree_size(branches: int, depth: int) -> int:
    """Number of edges (= experts) of a perfect b-ary tree of depth D: b + b² + … + b^D."""
    return sum(branches**d for d in range(1, depth + 1))


def tree_shape(trace) -> tuple[int, int] | None:
    """(branches, depth) from a tree trace's meta.json, else None (checked by Trace.open)."""
    tree = trace.meta.get("tree")
    return None if tree is None else (int(tree["branches"]), int(tree["depth"]))


def possible_paths(tree: dict) -> int:
    """How many paths a token can take: C(b^D, k) sets of k distinct leaves (k = tree["paths"], 1 if
    not recorded); uniform random routing spreads tokens evenly over them."""
    return math.comb(tree["branches"] ** tree["depth"], tree.get("paths", 1))


def expert_depths(branches: int, depth: int) -> np.ndarray:
    """(E,) depth of each expert, 1 (the root's children) .. D: the depth of the node it leads into."""
    first = np.array([tree_size(branches, d) + 1 for d in range(depth + 1)])  # first node of each depth
    nodes = np.arange(1, tree_size(branches, depth) + 1)
    return np.searchsorted(first, nodes, side="right")  # first[d - 1] <= node < first[d] -> d


def node_label(node: int, branches: int) -> str:
    """The branch choices from the root to `node`, e.g. "1.0.2" (the root is "root")."""
    steps = []
    while node > 0:
        steps.append(str((node - 1) % branches))
        node = (node - 1) // branches
    return ".".join(reversed(steps)) or "root"


# ----------------------------------------------------------------------------- widths


def width_load(trace, counts: np.ndarray) -> list[dict] | None:
    """Per layer, the share of top-k assignments going to each distinct expert width, or None when the
    trace records no `expert_widths`. counts: (L, E) metrics.expert_token_counts(trace).

    Each layer: {"widths": (G,) sorted, "experts": (G,) experts of that width, "expert_share": (G,)
    experts / E (what perfect balance gives), "load": (G,) share of assignments (NaN without any)}."""
    widths = trace.meta.get("expert_widths")
    if widths is None:
        return None
    E, out = trace.n_experts, []
    for layer, row in enumerate(np.asarray(counts, dtype=np.float64)):
        uniq, group = np.unique(np.asarray(widths[layer]), return_inverse=True)  # (G,), (E,)
        experts = np.bincount(group, minlength=len(uniq))
        per_group = np.bincount(group, weights=row, minlength=len(uniq))
        total = row.sum()
        load = per_group / total if total > 0 else np.full(len(uniq), np.nan)
        out.append({"widths": uniq, "experts": experts, "expert_share": experts / E, "load": load})
    return out


# ----------------------------------------------------------------------------- tree metrics


def depth_specialization(trace, shares: dict[str, np.ndarray], domains: np.ndarray) -> dict | None:
    """Domain specialization over the experts of each tree depth, or None without tree/domains.

    shares: metrics.domain_specialization(trace) {domain: (L, E)}; domains: (T,) domain ids.
    Returns {"by_domain": {domain: (L, D)} max share of the domain's tokens over the depth's experts,
    "max_share": (L, D) its mean over domains, "baseline": (L, D) the mean share of a depth's expert,
    i.e. what every expert of that depth gets when its assignments are spread evenly (random routing)}."""
    shape = tree_shape(trace)
    if shape is None or not shares:
        return None
    depths = expert_depths(*shape)  # (E,)
    D = shape[1]
    names = trace.domain_names
    known = np.asarray(domains, dtype=np.int64)
    sizes = np.bincount(known[known >= 0], minlength=len(names))  # (domains,) tokens per domain
    by_domain, assigned = {}, 0.0
    for name, s in shares.items():  # s: (L, E)
        by_domain[name] = np.stack([s[:, depths == d].max(axis=1) for d in range(1, D + 1)], axis=1)
        assigned = assigned + sizes[names.index(name)] * s  # (L, E) assignments of known-domain tokens
    per_depth = np.stack([assigned[:, depths == d].sum(axis=1) for d in range(1, D + 1)], axis=1)  # (L, D)
    width = np.bincount(depths, minlength=D + 1)[1:]  # experts per depth, b^d
    baseline = per_depth / (sizes.sum() * width[None, :])
    max_share = np.mean(np.stack(list(by_domain.values())), axis=0)
    return {"by_domain": by_domain, "max_share": max_share, "baseline": baseline}


def _mask_experts(mask: np.ndarray) -> np.ndarray:
    """(W,) uint64 bit mask -> the sorted expert ids whose bits are set."""
    bits = np.unpackbits(np.ascontiguousarray(mask, dtype="<u8").view(np.uint8), bitorder="little")
    return np.flatnonzero(bits)


def _ends(experts: np.ndarray, branches: int) -> list[int]:
    """The end nodes of a token's route: reached nodes (e + 1) none of whose children is reached."""
    used = set(experts.tolist())
    return [
        e + 1 for e in experts.tolist() if not any((e + 1) * branches + c in used for c in range(branches))
    ]


def _nested(node: int, reach: np.ndarray, branches: int, min_share: float) -> dict:
    """{"node", "label", "share", "children"}: the subtree under `node` of nodes reached by >= min_share."""
    children = []
    for c in range(branches):
        child = node * branches + c + 1
        if child - 1 < reach.shape[0] and reach[child - 1] >= min_share:
            children.append(_nested(child, reach, branches, min_share))
    share = 1.0 if node == 0 else float(reach[node - 1])
    return {"node": node, "label": node_label(node, branches), "share": share, "children": children}


def tree_paths(trace, layer: int, top: int = TOP_PATHS, min_share: float = MIN_NODE_SHARE) -> dict:
    """Path concentration at one layer of a tree trace.

    A token's path is its route through the tree: the set of edges (experts) it used, identified by its
    end nodes (one root-to-leaf chain for a token that descends one branch per depth). Over the N
    tokens with at least one expert: "distinct" paths, "top" (the `top` most used, most first, with
    their share of tokens), "top_share" (their total share), "cover_80" (fewest paths covering 80% of
    tokens), "entropy" (bits) and "norm_entropy" = entropy / log2 possible_paths (1 = uniform over
    every set of k leaves; NaN when there is one); "reach": (E,) share of the tokens reaching node
    e + 1 (taking expert e), and "tree": the nested nodes reached by >= min_share of the tokens."""
    from moelab.interp.metrics import _bits, _chunks

    shape = tree_shape(trace)
    if shape is None:
        raise MoelabError(f"{trace.name} is not a tree trace (meta.json has no 'tree')")
    b, D = shape
    n_paths = possible_paths(trace.meta["tree"])
    masks = np.concatenate([_bits(trace, layer, sl) for sl in _chunks(trace.n_tokens)])  # (T, W)
    masks = masks[masks.any(axis=1)]  # routed tokens
    n = masks.shape[0]
    if n == 0:
        root = {"node": 0, "label": "root", "share": math.nan, "children": []}
        nan, reach = math.nan, np.full(trace.n_experts, math.nan)
        return {"routed": 0, "distinct": 0, "top_share": nan, "cover_80": 0, "entropy": nan,
                "norm_entropy": nan, "top": [], "reach": reach, "tree": root}  # fmt: skip
    if masks.shape[1] == 1:
        keys, counts = np.unique(masks[:, 0], return_counts=True)
        keys = keys[:, None]
    else:
        keys, counts = np.unique(masks, axis=0, return_counts=True)  # rows in lexicographic order
    order = np.argsort(-counts, kind="stable")  # most used first; ties: the lower mask first
    counts, keys = counts[order], keys[order]
    p = counts / n
    entropy = float(-(p * np.log2(p)).sum())
    # reach: tokens whose set holds expert e, by unpacking only the distinct masks, weighted by counts
    experts = np.unpackbits(np.ascontiguousarray(keys, dtype="<u8").view(np.uint8), axis=1, bitorder="little")
    reach = (experts[:, : trace.n_experts].T.astype(np.float64) @ counts) / n  # (E,)
    listed = []
    for key, share in zip(keys[:top], p[:top]):
        used = _mask_experts(key)
        ends = _ends(used, b)
        listed.append(
            {"ends": ends, "labels": [node_label(e, b) for e in ends], "experts": used, "share": share}
        )
    return {
        "routed": n,
        "distinct": int(counts.shape[0]),
        "top_share": float(p[:top].sum()),
        "cover_80": int(np.argmax(np.cumsum(counts) * 100 >= 80 * n)) + 1,
        "entropy": entropy,
        "norm_entropy": entropy / math.log2(n_paths) if n_paths > 1 else math.nan,
        "top": listed,
        "reach": reach,
        "tree": _nested(0, reach, b, min_share),
    }


# ----------------------------------------------------------------------------- analyze and summary


def analysis(trace, counts: np.ndarray, shares: dict[str, np.ndarray]) -> dict:
    """The structure metrics of a trace as {"width_load": [per layer] | None, "tree": dict | None}:
    what `metrics.analyze` adds to its result, from the counts and domain shares it computed."""
    out = {"width_load": width_load(trace, counts), "tree": None}
    shape = tree_shape(trace)
    if shape is not None:
        depth = None
        if trace.domains is not None and shares:
            depth = depth_specialization(trace, shares, np.asarray(trace.domains))
        out["tree"] = {
            "branches": shape[0],
            "depth": shape[1],
            "paths_per_token": trace.meta["tree"].get("paths", 1),
            "depth_specialization": depth,
            "paths": [tree_paths(trace, layer) for layer in range(trace.n_layers)],
        }
    return out


def summary_lines(result: dict) -> list[str]:
    """Terminal lines for the structure metrics of an `analyze` result (none for a plain trace)."""
    lines = []
    rows = result["layers"]
    if rows and "width_load" in rows[0]:
        lines += ["", "Load per expert width (share of assignments; balanced = share of experts):"]
        for row in rows:
            w = row["width_load"]
            cells = "  ".join(
                f"{width}: {_pct(load)} [{_pct(base)}]"
                for width, load, base in zip(w["widths"], w["load"], w["expert_share"])
            )
            lines.append(f"  layer {row['layer']:>2}  {cells}")
    tree = result.get("tree")
    if tree:
        b, D, k = tree["branches"], tree["depth"], tree["paths_per_token"]
        n_paths = possible_paths({"branches": b, "depth": D, "paths": k})
        lines += ["", f"Tree routing: {b} branches, depth {D}, {k} path(s) per token ({n_paths:,} possible)."]
        if tree["depth_specialization"] is not None:
            spec = tree["depth_specialization"]
            lines.append("Domain max share per depth (random routing in brackets):")
            for layer, (shares, bases) in enumerate(zip(spec["max_share"], spec["baseline"])):
                cells = "  ".join(
                    f"d{d + 1} {_num(s)} [{_num(base)}]" for d, (s, base) in enumerate(zip(shares, bases))
                )
                lines.append(f"  layer {layer:>2}  {cells}")
        lines.append(f"Paths (top-{TOP_PATHS} share, random {min(1.0, TOP_PATHS / n_paths):.3f}; "
                     "entropy / log2 of the possible paths, random 1):")  # fmt: skip
        for layer, p in enumerate(tree["paths"]):
            best = ", ".join(f"{'+'.join(t['labels'])} {_pct(t['share'])}" for t in p["top"][:3])
            lines.append(
                f"  layer {layer:>2}  {p['distinct']:,} distinct, top-{TOP_PATHS} {_num(p['top_share'])}, "
                f"80% on {p['cover_80']:,}, norm. entropy {_num(p['norm_entropy'])}; most used: {best}"
            )
    return lines


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
