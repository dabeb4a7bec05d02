"""Structure metrics (expert widths, tree routing) against plain per-token loops on synthetic traces.

The tree traces are built here token by token: each token descends a perfect b-ary tree from the root,
choosing a branch (biased by its domain) at every depth, sometimes two branches at a node, sometimes
stopping early, and lists the experts (edges) it used in random order, padded with -1.
"""

import json
import math
from collections import Counter

import numpy as np
import pytest

from moelab.cli import main
from moelab.errors import MoelabError
from moelab.interp import metrics, structure
from moelab.interp.metrics import Trace

DOMAINS = ["code", "prose", "verse", "empty"]  # "empty" has no tokens


@pytest.fixture(params=[7, metrics.CHUNK_TOKENS], ids=["chunk7", "chunk-default"])
def chunked(request, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_TOKENS", request.param)
    return request.param


def tree_arrays(b=2, depth=3, L=2, T=300, seed=0, k=None):
    """(topk_ids (L, T, k), domains (T,)) of tokens descending the tree, by a loop over tokens."""
    rng = np.random.default_rng(seed)
    k = k or 2 * depth  # room for one extra branch per token
    domains = rng.integers(-1, 3, T)
    ids = np.full((L, T, k), -1, dtype=np.int16)
    for layer in range(L):
        for t in range(T):
            used, frontier = [], [0]
            for d in range(depth):
                nxt = []
                for node in frontier:
                    if d > 0 and rng.random() < 0.1:
                        continue  # stops early at this node
                    favourite = (max(domains[t], 0) + layer + node) % b
                    branch = favourite if rng.random() < 0.7 else int(rng.integers(0, b))
                    picks = [branch]
                    if len(used) + len(frontier) < k - 1 and rng.random() < 0.15:
                        picks.append((branch + 1) % b)  # a second branch at this node
                    for c in picks:
                        used.append(node * b + c)
                        nxt.append(node * b + c + 1)
                frontier = nxt
            if t % 50 == 3:
                used = []  # no expert at all
            rng.shuffle(used)
            ids[layer, t, : len(used)] = used[:k]
    return ids, domains.astype(np.int16)


def tree_trace(b=2, depth=3, **kw):
    ids, domains = tree_arrays(b, depth, **kw)
    return Trace.from_arrays(
        ids,
        domains=domains,
        domain_names=DOMAINS,
        n_experts=structure.tree_size(b, depth),
        meta={"tree": {"branches": b, "depth": depth}},
    )


def node_depth(node, b):
    d = 0
    while node > 0:
        node, d = (node - 1) // b, d + 1
    return d


# ----------------------------------------------------------------------------- geometry


def test_tree_geometry_by_hand():
    assert structure.tree_size(2, 3) == 14 and structure.tree_size(3, 2) == 12
    assert structure.expert_depths(2, 3).tolist() == [1, 1, 2, 2, 2, 2] + [3] * 8
    for b, depth in ((2, 4), (3, 3), (5, 2)):
        E = structure.tree_size(b, depth)
        got = structure.expert_depths(b, depth)
        assert got.tolist() == [node_depth(e + 1, b) for e in range(E)]
    assert structure.node_label(0, 2) == "root"
    assert structure.node_label(5, 2) == "1.0"  # node 5 = child 0 of node 2 = child 1 of the root
    assert structure.node_label(17, 3) == "0.1.1"  # 17 = 3·5 + 1 + 1, 5 = 3·1 + 1 + 1, 1 = root's 0


# ----------------------------------------------------------------------------- widths


def test_width_load_matches_loop():
    rng = np.random.default_rng(3)
    L, T, E, k = 3, 400, 8, 2
    ids = np.argsort(rng.random((L, T, E)) + np.linspace(0, 0.6, E), axis=-1)[..., :k].astype(np.int16)
    ids[rng.random((L, T, k)) < 0.1] = -1
    widths = [[12, 12, 24, 24, 48, 48, 96, 96], [32] * 4 + [16] * 4, [64] * 8]
    trace = Trace.from_arrays(ids, n_experts=E, meta={"expert_widths": widths})
    got = structure.width_load(trace, metrics.expert_token_counts(trace))
    for layer in range(L):
        per_width = Counter()
        for t in range(T):
            for e in {int(i) for i in ids[layer, t] if i >= 0}:
                per_width[widths[layer][e]] += 1
        total = sum(per_width.values())
        distinct = sorted(set(widths[layer]))
        assert got[layer]["widths"].tolist() == distinct
        np.testing.assert_allclose(got[layer]["load"], [per_width[w] / total for w in distinct])
        assert got[layer]["experts"].tolist() == [widths[layer].count(w) for w in distinct]
        np.testing.assert_allclose(got[layer]["expert_share"], [widths[layer].count(w) / E for w in distinct])
    assert (
        structure.width_load(Trace.from_arrays(ids, n_experts=E), metrics.expert_token_counts(trace)) is None
    )
    result = metrics.analyze(trace)
    assert [row["width_load"]["load"] for row in result["layers"]] == [g["load"].tolist() for g in got]
    assert "Load per expert width" in metrics.summary_table(result)


# ----------------------------------------------------------------------------- tree metrics


@pytest.mark.parametrize("b, depth", [(2, 3), (3, 2)])
def test_depth_specialization_matches_loop(chunked, b, depth):
    trace = tree_trace(b, depth, seed=b)
    ids, domains = np.asarray(trace.topk_ids), np.asarray(trace.domains)
    got = structure.depth_specialization(trace, metrics.domain_specialization(trace), domains)
    E, T = trace.n_experts, trace.n_tokens
    for layer in range(trace.n_layers):
        sets = [{int(i) for i in ids[layer, t] if i >= 0} for t in range(T)]
        for d in range(1, depth + 1):
            experts = [e for e in range(E) if node_depth(e + 1, b) == d]
            best = {}
            for dom in range(3):
                tokens = [t for t in range(T) if domains[t] == dom]
                best[DOMAINS[dom]] = max(sum(e in sets[t] for t in tokens) / len(tokens) for e in experts)
                assert got["by_domain"][DOMAINS[dom]][layer, d - 1] == pytest.approx(best[DOMAINS[dom]])
            assert got["max_share"][layer, d - 1] == pytest.approx(np.mean(list(best.values())))
            known = [t for t in range(T) if domains[t] >= 0]
            assigned = sum(len([e for e in sets[t] if e in experts]) for t in known)
            assert got["baseline"][layer, d - 1] == pytest.approx(assigned / (len(known) * len(experts)))
    assert set(got["by_domain"]) == set(DOMAINS[:3])  # "empty" has no tokens


def brute_paths(trace, layer, b, depth, top):
    """Path statistics by loops: the path of a token is its set of experts."""
    ids = np.asarray(trace.topk_ids)[layer]
    paths = [frozenset(int(i) for i in row if i >= 0) for row in ids]
    routed = [p for p in paths if p]
    counts = Counter(routed)
    n = len(routed)
    ranked = sorted(counts.values(), reverse=True)
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    covered, cover = 0, 0
    for c in ranked:
        covered, cover = covered + c, cover + 1
        if covered >= 0.8 * n:
            break
    reach = [sum(e in p for p in routed) / n for e in range(trace.n_experts)]
    return counts, n, ranked, entropy, cover, reach


@pytest.mark.parametrize("b, depth, top", [(2, 3, 10), (3, 2, 4), (2, 6, 10)])  # E = 126: two words
def test_tree_paths_match_loop(chunked, b, depth, top):
    trace = tree_trace(b, depth, seed=depth, T=400)
    for layer in range(trace.n_layers):
        got = structure.tree_paths(trace, layer, top=top, min_share=0.05)
        counts, n, ranked, entropy, cover, reach = brute_paths(trace, layer, b, depth, top)
        assert got["routed"] == n and got["distinct"] == len(counts)
        assert got["top_share"] == pytest.approx(sum(ranked[:top]) / n)
        assert got["cover_80"] == cover
        assert got["entropy"] == pytest.approx(entropy)
        assert got["norm_entropy"] == pytest.approx(entropy / (depth * math.log2(b)))
        np.testing.assert_allclose(got["reach"], reach)
        assert [p["share"] for p in got["top"]] == pytest.approx([c / n for c in ranked[:top]])
        for p in got["top"]:
            experts = frozenset(p["experts"].tolist())
            assert counts[experts] / n == pytest.approx(p["share"])
            ends = [e + 1 for e in experts if not any((e + 1) * b + c in experts for c in range(b))]
            assert p["ends"] == sorted(ends)
            assert p["labels"] == [structure.node_label(e, b) for e in p["ends"]]

        def walk(node, reach=reach):  # every listed node is reached by >= 5%, children in branch order
            assert node["share"] == pytest.approx(1.0 if node["node"] == 0 else reach[node["node"] - 1])
            kids = [node["node"] * b + c + 1 for c in range(b)]
            want = [c for c in kids if c - 1 < len(reach) and reach[c - 1] >= 0.05]
            assert [child["node"] for child in node["children"]] == want
            for child in node["children"]:
                walk(child)

        walk(got["tree"])


def test_single_path_tree_by_hand():
    # b = 2, depth 2: experts 0,1 (depth 1) lead to nodes 1, 2; expert 2 leads to node 3 = "0.0"
    ids = np.array([[[0, 2], [2, 0], [0, 3], [1, 4], [-1, -1]]], dtype=np.int16)  # (1, 5, 2)
    trace = Trace.from_arrays(ids, n_experts=6, meta={"tree": {"branches": 2, "depth": 2}})
    got = structure.tree_paths(trace, 0)
    assert got["routed"] == 4 and got["distinct"] == 3
    assert got["top"][0]["labels"] == ["0.0"] and got["top"][0]["share"] == 0.5
    assert got["entropy"] == pytest.approx(1.5) and got["norm_entropy"] == pytest.approx(0.75)
    assert got["reach"].tolist() == [0.75, 0.25, 0.5, 0.25, 0.25, 0.0]
    assert [c["label"] for c in got["tree"]["children"]] == ["0", "1"]
    two = Trace.from_arrays(ids, n_experts=6, meta={"tree": {"branches": 2, "depth": 2, "paths": 2}})
    assert structure.tree_paths(two, 0)["norm_entropy"] == pytest.approx(1.5 / math.log2(6))  # C(4, 2) sets
    with pytest.raises(MoelabError, match="paths"):
        Trace.from_arrays(ids, n_experts=6, meta={"tree": {"branches": 2, "depth": 2, "paths": 5}})


def test_uniform_descent_meets_the_documented_baselines():
    """Uniform top-1 descent: norm entropy -> 1, top-10 share -> 10/b^D, depth shares -> baseline."""
    rng = np.random.default_rng(0)
    b, depth, T = 2, 4, 200_000
    leaf = rng.integers(0, b**depth, T)
    ids = np.empty((1, T, depth), dtype=np.int16)
    node = np.zeros(T, dtype=np.int64)
    for d in range(depth):  # the branch digits of the leaf, most significant first
        branch = (leaf // b ** (depth - 1 - d)) % b
        ids[0, :, d] = node * b + branch
        node = node * b + branch + 1
    domains = rng.integers(0, 2, T).astype(np.int16)
    trace = Trace.from_arrays(
        ids, domains=domains, n_experts=30, meta={"tree": {"branches": b, "depth": depth}}
    )
    p = structure.tree_paths(trace, 0)
    assert p["distinct"] == 16 and p["norm_entropy"] == pytest.approx(1.0, abs=1e-3)
    assert p["top_share"] == pytest.approx(10 / 16, abs=0.01)
    spec = structure.depth_specialization(trace, metrics.domain_specialization(trace), domains)
    np.testing.assert_allclose(spec["baseline"][0], [1 / b**d for d in range(1, depth + 1)])
    np.testing.assert_allclose(spec["max_share"][0], spec["baseline"][0], rtol=0.05)


def test_analyze_and_summary_of_a_tree_trace(tmp_path, capsys):
    trace = tree_trace(2, 3)
    result = metrics.analyze(trace)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    tree = result["tree"]
    assert (tree["branches"], tree["depth"]) == (2, 3) and len(tree["paths"]) == trace.n_layers
    assert tree["paths"][1]["distinct"] == structure.tree_paths(trace, 1)["distinct"]
    assert len(tree["depth_specialization"]["max_share"][0]) == 3
    table = metrics.summary_table(result)
    assert "Tree routing: 2 branches, depth 3" in table and "Domain max share per depth" in table
    assert "tree" not in metrics.analyze(Trace.from_arrays(np.asarray(trace.topk_ids), n_experts=14))
    # through a trace directory and the command
    out = tmp_path / "t"
    out.mkdir()
    arrays = {"topk_ids": np.asarray(trace.topk_ids), "domains": np.asarray(trace.domains)}
    T = trace.n_tokens
    arrays.update(
        token_ids=np.zeros(T, np.int32), doc_ids=np.zeros(T, np.int64), positions=np.zeros(T, np.int32)
    )
    arrays["topk_weights"] = np.ones(arrays["topk_ids"].shape, np.float32)
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", arr)
    widths = [[64] * 2 + [32] * 4 + [16] * 8] * 2
    meta = {"format": "moelab-trace/1", "n_tokens": T, "n_layers": 2, "n_experts": 14, "top_k": 6,
            "domains": DOMAINS, "has_router_probs": False, "contextual": None,
            "tree": {"branches": 2, "depth": 3}, "expert_widths": widths}  # fmt: skip
    (out / "meta.json").write_text(json.dumps(meta))
    assert main(["analyze", str(out), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["tree"]["paths"] == result["tree"]["paths"]
    assert got["layers"][0]["width_load"]["widths"] == [16, 32, 64]
    (out / "meta.json").write_text(json.dumps({**meta, "tree": {"branches": 2, "depth": 4}}))
    with pytest.raises(MoelabError, match="has 30 experts"):
        Trace.open(out)
    (out / "meta.json").write_text(json.dumps({**meta, "expert_widths": [[64] * 14]}))
    with pytest.raises(MoelabError, match="expert_widths must be 2 lists"):
        Trace.open(out)


def test_a_tree_trace_may_have_more_slots_than_experts_but_a_flat_one_may_not():
    # b = 2, depth 2 (6 edges), top-4 paths = every leaf: 4 paths x 2 levels = 8 slots, 6 distinct experts
    ids = np.array([[[0, 2, 3, 1, 4, 5, -1, -1]]], dtype=np.int16)  # (1, 1, 8)
    trace = Trace.from_arrays(ids, n_experts=6, meta={"tree": {"branches": 2, "depth": 2, "paths": 4}})
    assert structure.tree_paths(trace, 0)["reach"].tolist() == [1.0] * 6
    assert metrics.expert_token_counts(trace).tolist() == [[1.0] * 6]
    with pytest.raises(MoelabError, match="top_k 8 exceeds n_experts 6"):
        Trace.from_arrays(ids, n_experts=6)
