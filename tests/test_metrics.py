"""Specialization metrics: every vectorised metric against a plain per-token loop, plus hand-computed cases.

The random traces have repeated token ids, several domains (and unknown ones), -1 expert ids (some
tokens with no expert at all at a layer) and a token-dependent routing preference, so that every
metric is away from its trivial value. Each is run with a 7-token chunk too, to cross chunk edges.
"""

import json
import math
from collections import Counter

import numpy as np
import pytest

from moelab.cli import main
from moelab.errors import MoelabError
from moelab.interp import metrics
from moelab.interp.metrics import Trace

WORDS = ["bank", "bat", "spring"]
SENSES = [["river", "money"], ["animal", "club", "verb"], ["season", "coil"]]
DOMAINS = ["code", "prose", "verse", "empty"]  # "empty" has no tokens


@pytest.fixture(params=[7, metrics.CHUNK_TOKENS], ids=["chunk7", "chunk-default"])
def chunked(request, monkeypatch):
    monkeypatch.setattr(metrics, "CHUNK_TOKENS", request.param)
    return request.param


def make_arrays(seed=0, T=200, L=3, E=6, k=2, vocab=15):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, vocab, T).astype(np.int32)
    preference = rng.random((vocab, E)) * 1.5
    scores = rng.random((L, T, E)) + preference[token_ids][None]
    topk_ids = np.argsort(-scores, axis=-1)[..., :k].astype(np.int16)  # (L, T, k), model order
    topk_ids[rng.random((L, T, k)) < 0.1] = -1
    topk_ids[:, :3] = -1  # tokens 0-2 have no expert at any layer
    topk_ids[1, 10] = -1  # token 10 has none at layer 1 only
    topk_ids[0, 20] = [E - 1, E - 1] + [-1] * (k - 2)  # a repeated id is one member of the set
    logits = rng.normal(size=(L, T, E)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float16)
    word = rng.integers(-1, len(WORDS), T).astype(np.int16)
    sense = np.array([rng.integers(0, len(SENSES[w])) if w >= 0 else -1 for w in word], dtype=np.int16)
    target = (rng.random(T) < 0.35) & (word >= 0)
    return dict(
        topk_ids=topk_ids,
        token_ids=token_ids,
        doc_ids=np.arange(T, dtype=np.int64) // 20,
        positions=(np.arange(T) % 20).astype(np.int32),
        domains=rng.integers(-1, 3, T).astype(np.int16),
        topk_weights=rng.random((L, T, k)).astype(np.float32),
        router_probs=probs,
        context_word=word,
        context_sense=sense,
        context_target=target,
    )


def make_trace(seed=0, contextual=True, **shape):
    a = make_arrays(seed, **shape)
    if not contextual:
        for key in ("context_word", "context_sense", "context_target"):
            a.pop(key)
    ctx = {"words": WORDS, "token_ids": [101, 102, 103], "senses": SENSES} if contextual else None
    return Trace.from_arrays(**a, domain_names=DOMAINS, n_experts=a["router_probs"].shape[-1], contextual=ctx)


def sets(trace):
    """[layer][token] -> the token's top-k set, the obvious way."""
    ids = np.asarray(trace.topk_ids)
    return [[{int(i) for i in ids[l, t] if i >= 0} for t in range(ids.shape[1])] for l in range(ids.shape[0])]


def top1_of(row):
    return next((int(i) for i in row if i >= 0), -1)


def js_loop(p, q):
    total = 0.0
    for a, b in zip(p, q):
        m = (a + b) / 2
        if a > 0:
            total += 0.5 * a * math.log2(a / m)
        if b > 0:
            total += 0.5 * b * math.log2(b / m)
    return math.sqrt(max(total, 0.0))


def histogram(token_sets, E):
    h = [0] * E
    for s in token_sets:
        for e in s:
            h[e] += 1
    n = sum(h)
    return [x / n for x in h] if n else None


# ----------------------------------------------------------------------------- against brute force


def test_load_and_max_vio_match_loops(chunked):
    trace = make_trace()
    S, E = sets(trace), trace.n_experts
    loads, vios = metrics.load(trace), metrics.max_vio(trace)
    for l in range(trace.n_layers):
        counts = [0] * E
        for s in S[l]:
            for e in s:
                counts[e] += 1
        expected = [c / sum(counts) for c in counts]
        np.testing.assert_allclose(loads[l], expected, atol=1e-12)
        assert vios[l] == pytest.approx(max(expected) / (sum(expected) / E) - 1, abs=1e-12)


def test_router_entropy_matches_loop(chunked):
    trace = make_trace()
    probs = np.asarray(trace.router_probs)
    got = metrics.router_entropy(trace)
    for l in range(trace.n_layers):
        total = 0.0
        for t in range(trace.n_tokens):
            row = [float(v) for v in probs[l, t]]
            z = sum(row)
            total -= sum(p / z * math.log(p / z) for p in row if p > 0)
        assert got[l] == pytest.approx(total / trace.n_tokens, abs=1e-9)
    a = make_arrays()
    a.pop("router_probs")
    assert metrics.router_entropy(Trace.from_arrays(a["topk_ids"], n_experts=6)) is None


@pytest.mark.parametrize("shape", [{}, dict(T=120, E=130, k=3)], ids=["E6", "E130"])
def test_coactivation_matches_loop(chunked, shape):
    trace = make_trace(**shape)
    S, E = sets(trace), trace.n_experts
    got = metrics.coactivation(trace)
    for l in range(trace.n_layers):
        with_i, both = [0] * E, [[0] * E for _ in range(E)]
        for s in S[l]:
            for i in s:
                with_i[i] += 1
                for j in s:
                    if j != i:
                        both[i][j] += 1
        expected = [[both[i][j] / with_i[i] if with_i[i] else 0.0 for j in range(E)] for i in range(E)]
        np.testing.assert_allclose(got[l], expected, atol=1e-12)
        assert np.all(np.diag(got[l]) == 0)


def test_domain_specialization_matches_loop(chunked):
    trace = make_trace()
    S, E = sets(trace), trace.n_experts
    got = metrics.domain_specialization(trace)
    assert sorted(got) == ["code", "prose", "verse"]  # "empty" has no tokens; -1 is no domain
    for d, name in enumerate(DOMAINS[:3]):
        for l in range(trace.n_layers):
            members = [t for t in range(trace.n_tokens) if trace.domains[t] == d]
            expected = [sum(e in S[l][t] for t in members) / len(members) for e in range(E)]
            np.testing.assert_allclose(got[name][l], expected, atol=1e-12)


@pytest.mark.parametrize("min_count", [1, 12, 10_000])
def test_vocab_specialization_matches_loop(chunked, min_count):
    trace = make_trace()
    S, E, k = sets(trace), trace.n_experts, trace.top_k
    got = metrics.vocab_specialization(trace, min_count=min_count)
    assert got["min_count"] == min_count
    occurrences = {}
    for t, tok in enumerate(trace.token_ids):
        occurrences.setdefault(int(tok), []).append(t)
    eligible = [tok for tok, ts in occurrences.items() if len(ts) >= min_count]
    for l in range(trace.n_layers):
        if not eligible:
            assert np.isnan(got["raw"][l]) and np.isnan(got["normalized"][l])
            continue
        maxima = []
        for tok in eligible:
            ts = occurrences[tok]
            maxima.append(max(sum(e in S[l][t] for t in ts) / len(ts) for e in range(E)))
        raw = sum(maxima) / len(maxima)
        assert got["raw"][l] == pytest.approx(raw, abs=1e-12)
        assert got["normalized"][l] == pytest.approx((raw - k / E) / (1 - k / E), abs=1e-12)
    if eligible:
        ids, shares = metrics.vocab_shares(trace, 1, min_count)
        assert sorted(ids.tolist()) == sorted(eligible)
        for tok, row in zip(ids, shares):
            ts = occurrences[int(tok)]
            np.testing.assert_allclose(row, [sum(e in S[1][t] for t in ts) / len(ts) for e in range(E)])


@pytest.mark.parametrize("shape", [dict(L=4), dict(T=120, L=4, E=130, k=3)], ids=["E6", "E130"])
def test_continuity_matches_loops(chunked, shape):
    trace = make_trace(**shape)  # E=130: set masks span three 64-bit words
    S, L, T = sets(trace), trace.n_layers, trace.n_tokens
    nxt = metrics.expert_continuity_next(trace)
    for l in range(L - 1):
        assert nxt[l] == pytest.approx(sum(bool(S[l][t] & S[l + 1][t]) for t in range(T)) / T, abs=1e-12)
    assert np.isnan(nxt[L - 1])
    multi = metrics.expert_continuity_multi(trace)
    assert sorted(multi) == list(range(1, L))
    for s in range(1, L):
        stays = pairs = 0
        for l in range(L - s):
            for t in range(T):
                for e in S[l][t]:
                    pairs += 1
                    stays += all(e in S[l + j][t] for j in range(1, s + 1))
        assert multi[s] == pytest.approx(stays / pairs, abs=1e-12)
    every = metrics.expert_continuity_all(trace)
    for l in range(L):
        for m in range(L):
            meet = 1.0 if l == m else sum(bool(S[l][t] & S[m][t]) for t in range(T)) / T
            assert every["matrix"][l, m] == pytest.approx(meet, abs=1e-12)
    for s in range(1, L):
        mean = sum(every["matrix"][l, l + s] for l in range(L - s)) / (L - s)
        assert every["by_distance"][s] == pytest.approx(mean, abs=1e-12)
    np.testing.assert_allclose(np.diagonal(every["matrix"], 1), nxt[:-1])  # neighbours = continuity_next


@pytest.mark.parametrize("span", [None, (1, 2), (2, 2)])
def test_paths_match_loop(chunked, span):
    trace = make_trace(L=3, E=3, k=2)  # few experts: routes repeat
    first, last = span or (0, trace.n_layers - 1)
    ids = np.asarray(trace.topk_ids)
    routes = Counter()
    for t in range(trace.n_tokens):
        route = tuple(top1_of(ids[l, t]) for l in range(first, last + 1))
        if -1 not in route:
            routes[route] += 1
    n = sum(routes.values())
    counts = sorted(routes.values(), reverse=True)

    def cover(q):
        total = 0
        for i, c in enumerate(counts):
            total += c
            if total >= q * n - 1e-9:
                return i + 1

    entropy = -sum(c / n * math.log2(c / n) for c in counts)
    got = metrics.paths(trace, span)
    assert got["layers"] == [first, last]
    assert got["distinct"] == len(routes)
    assert got["cover_80"] == cover(0.8) and got["cover_95"] == cover(0.95)
    assert got["norm_entropy"] == pytest.approx(entropy / ((last - first + 1) * math.log2(3)), abs=1e-12)


def test_contextual_matches_loop(chunked):
    trace = make_trace()
    S, E = sets(trace), trace.n_experts
    word, sense, target = trace.context_word, trace.context_sense, trace.context_target
    got = metrics.contextual(trace)
    assert sorted(got) == ["ics", "tis"] and list(got["tis"]) == WORDS
    for w, name in enumerate(WORDS):
        for l in range(trace.n_layers):
            targets = [S[l][t] for t in range(trace.n_tokens) if word[t] == w and target[t]]
            samples = [S[l][t] for t in range(trace.n_tokens) if word[t] == w]
            p_target, p_all = histogram(targets, E), histogram(samples, E)
            assert got["tis"][name][l] == pytest.approx(js_loop(p_target, p_all), abs=1e-9)
            distances = []
            for s in range(len(SENSES[w])):
                p_sense = histogram(
                    [S[l][t] for t in range(trace.n_tokens) if word[t] == w and target[t] and sense[t] == s],
                    E,
                )
                if p_sense is not None:
                    distances.append(js_loop(p_sense, p_target))
            assert got["ics"][name][l] == pytest.approx(sum(distances) / len(distances), abs=1e-9)
    assert metrics.contextual(make_trace(contextual=False)) is None


@pytest.mark.parametrize("shape", [{}, dict(T=120, E=130, k=3)], ids=["E6", "E130"])
def test_saturation_matches_loop(chunked, shape):
    trace, ref = make_trace(seed=0, **shape), make_trace(seed=1, **shape)
    ref.token_ids = trace.token_ids  # same tokens, another "checkpoint"
    a, b = sets(trace), sets(ref)
    ids, ref_ids = np.asarray(trace.topk_ids), np.asarray(ref.topk_ids)
    got = metrics.saturation(trace, ref)
    for l in range(trace.n_layers):
        routed = [t for t in range(trace.n_tokens) if b[l][t]]  # tokens the reference sends somewhere
        same = sum(top1_of(ids[l, t]) == top1_of(ref_ids[l, t]) for t in routed)
        assert got["top1"][l] == pytest.approx(same / len(routed), abs=1e-12)
        overlap = sum(len(a[l][t] & b[l][t]) / len(b[l][t]) for t in routed) / len(routed)
        assert got["topk"][l] == pytest.approx(overlap, abs=1e-12)
    # without -1 ids |S_ref| = k: the mean |S ∩ S_ref| / k over all tokens, checked by hand
    x = Trace.from_arrays(np.array([[[0, 1], [2, 3], [1, 0]]]), token_ids=[5, 6, 7], n_experts=4)
    y = Trace.from_arrays(np.array([[[0, 2], [3, 2], [0, 1]]]), token_ids=[5, 6, 7], n_experts=4)
    got = metrics.saturation(x, y)
    assert got["top1"][0] == pytest.approx(1 / 3) and got["topk"][0] == pytest.approx((1 + 2 + 2) / 2 / 3)


def test_chunks_bound_memory(monkeypatch):
    """No membership array is ever larger than one chunk of tokens."""
    monkeypatch.setattr(metrics, "CHUNK_TOKENS", 16)
    rows, members = [], metrics._members

    def spy(trace, layer, tokens):
        out = members(trace, layer, tokens)
        rows.append(out.shape[0])
        return out

    monkeypatch.setattr(metrics, "_members", spy)
    metrics.analyze(make_trace(), min_count=3)
    assert rows and max(rows) <= 16


# ----------------------------------------------------------------------------- hand-computed


def test_load_max_vio_and_coactivation_by_hand():
    # one layer, E=4, k=2: tokens {0,1}, {0,2}, {0}; expert 3 never chosen; 5 assignments
    trace = Trace.from_arrays(np.array([[[0, 1], [0, 2], [0, -1]]]), n_experts=4)
    np.testing.assert_allclose(metrics.load(trace)[0], [0.6, 0.2, 0.2, 0.0])
    assert metrics.max_vio(trace)[0] == pytest.approx(0.6 / 0.25 - 1)  # = 1.4
    expected = [
        [0, 1 / 3, 1 / 3, 0],  # 3 tokens with 0: one with 1, one with 2
        [1, 0, 0, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],  # never chosen
    ]
    np.testing.assert_allclose(metrics.coactivation(trace)[0], expected)


def test_continuity_by_hand():
    # token 0: {0,1} -> {1,2} -> {2,3};  token 1: {0,1} -> {2,3} -> {3,0}
    ids = np.array([[[0, 1], [0, 1]], [[1, 2], [2, 3]], [[2, 3], [3, 0]]])
    trace = Trace.from_arrays(ids, n_experts=4)
    nxt = metrics.expert_continuity_next(trace)
    assert nxt[0] == 0.5 and nxt[1] == 1.0 and np.isnan(nxt[2])
    # s=1: of 8 (token, l<2, e) pairs, 3 stay (t0 l0 e1, t0 l1 e2, t1 l1 e3); s=2: none of 4 stays twice
    assert metrics.expert_continuity_multi(trace) == {1: 3 / 8, 2: 0.0}
    # layers 0 and 2: token 0 {0,1} vs {2,3} disjoint; token 1 {0,1} vs {3,0} meet -> 0.5
    every = metrics.expert_continuity_all(trace)
    np.testing.assert_array_equal(every["matrix"], [[1, 0.5, 0.5], [0.5, 1, 1], [0.5, 1, 1]])
    assert every["by_distance"] == {1: 0.75, 2: 0.5}


def test_paths_by_hand():
    # top-1 routes over 2 layers (slot 0; a -1 in slot 0 falls back to slot 1): (0,1) x3, (2,3), (1,1)
    ids = np.array([[[0, 3], [0, 2], [-1, 0], [2, 1], [1, 0]], [[1, 0], [1, 2], [1, 3], [3, 2], [1, 2]]])
    got = metrics.paths(Trace.from_arrays(ids, n_experts=4))
    entropy = -(0.6 * math.log2(0.6) + 2 * 0.2 * math.log2(0.2))  # 1.37095...
    assert got == {
        "layers": [0, 1],
        "distinct": 3,
        "cover_80": 2,  # 3 + 1 = 4 of 5 tokens = 80%
        "cover_95": 3,
        "norm_entropy": pytest.approx(entropy / (2 * 2)),
    }
    assert got["norm_entropy"] == pytest.approx(0.342737648613667)


def test_js_distance_by_hand():
    assert metrics.js_distance([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-12)
    assert metrics.js_distance([0.5, 0.5, 0, 0], [0, 0, 0.25, 0.75]) == pytest.approx(1.0)
    # P = (1, 0), Q = (1/2, 1/2), M = (3/4, 1/4): JSD = (log2(4/3) + (log2(2/3) + 1) / 2) / 2
    jsd = (math.log2(4 / 3) + (math.log2(2 / 3) + 1) / 2) / 2
    assert metrics.js_distance([1, 0], [0.5, 0.5]) == pytest.approx(math.sqrt(jsd))
    assert math.sqrt(jsd) == pytest.approx(0.5579230452)
    rows = metrics.js_distance([[1, 0], [np.nan, np.nan]], [[0, 1], [1, 0]])
    assert rows[0] == pytest.approx(1.0) and np.isnan(rows[1])


def test_random_routing_meets_the_documented_baselines():
    """docs/METRICS.md's random-routing baselines, on uniformly random top-k sets (±4 sigma)."""
    rng = np.random.default_rng(7)
    L, T, E, k = 4, 20_000, 8, 2

    def random_sets():
        return np.argsort(rng.random((L, T, E)), axis=-1)[..., :k]

    trace = Trace.from_arrays(random_sets(), domains=rng.integers(0, 2, T), n_experts=E)
    other = Trace.from_arrays(random_sets(), n_experts=E)

    def tol(p, n):  # 4 standard deviations of a share p measured on n draws
        return 4 * math.sqrt(p * (1 - p) / n)

    np.testing.assert_allclose(metrics.load(trace), 1 / E, atol=tol(1 / E, T * k))
    p_next = 1 - math.comb(E - k, k) / math.comb(E, k)
    np.testing.assert_allclose(metrics.expert_continuity_next(trace)[:-1], p_next, atol=tol(p_next, T))
    for s, value in metrics.expert_continuity_multi(trace).items():
        assert value == pytest.approx((k / E) ** s, abs=tol((k / E) ** s, T * k * (L - s)))
    off_diagonal = metrics.coactivation(trace)[:, ~np.eye(E, dtype=bool)]
    np.testing.assert_allclose(off_diagonal, (k - 1) / (E - 1), atol=tol(1 / 7, T * k / E))
    for shares in metrics.domain_specialization(trace).values():
        np.testing.assert_allclose(shares, k / E, atol=tol(k / E, T / 2))
    sat = metrics.saturation(trace, other)
    np.testing.assert_allclose(sat["top1"], 1 / E, atol=tol(1 / E, T))
    np.testing.assert_allclose(sat["topk"], k / E, atol=tol(k / E, T * k))


def test_from_arrays_takes_torch_tensors():
    torch = pytest.importorskip("torch")
    a = make_arrays()
    as_torch = Trace.from_arrays(torch.from_numpy(a["topk_ids"].astype(np.int64)), n_experts=6)
    np.testing.assert_array_equal(
        metrics.load(as_torch), metrics.load(Trace.from_arrays(a["topk_ids"], n_experts=6))
    )
    with pytest.raises(MoelabError, match="token_ids has shape"):
        Trace.from_arrays(a["topk_ids"], token_ids=a["token_ids"][:-1])


# ----------------------------------------------------------------------------- analyze, files, CLI


def test_analyze_is_json_with_every_key():
    trace = make_trace()
    result = metrics.analyze(trace, min_count=5)
    assert json.loads(json.dumps(result, allow_nan=False)) == result
    assert list(result) == [
        "n_tokens",
        "n_layers",
        "n_experts",
        "top_k",
        "layers",
        "expert_continuity_multi",
        "expert_continuity_all",
        "paths",
        "transitions",  # tests/test_transitions.py
        "routes",  # tests/test_transitions.py
        "protocol",  # tests/test_protocol.py
        "preferred_differs",
        "contextual",
    ]
    assert (result["n_tokens"], result["n_layers"], result["n_experts"], result["top_k"]) == (200, 3, 6, 2)
    layer_keys = ["layer", "load", "max_vio", "router_entropy", "coactivation", "domain_specialization"]
    layer_keys += ["vocab_specialization", "expert_continuity_next"]
    for l, row in enumerate(result["layers"]):
        assert list(row) == layer_keys and row["layer"] == l
        assert row["load"] == pytest.approx(metrics.load(trace)[l].tolist())
        assert len(row["coactivation"]) == 6 and all(len(r) == 6 for r in row["coactivation"])
        assert row["vocab_specialization"]["min_count"] == 5
    assert result["layers"][-1]["expert_continuity_next"] is None
    assert set(result["expert_continuity_multi"]) == {"1", "2"}
    assert set(result["expert_continuity_all"]["by_distance"]) == {"1", "2"}
    assert len(result["expert_continuity_all"]["matrix"]) == 3
    assert result["paths"] == metrics.paths(trace)
    assert set(result["contextual"]["tis"]) == set(WORDS)
    plain = metrics.analyze(make_trace(contextual=False), path_layers=(1, 2))
    assert "contextual" not in plain and "saturation" not in plain and plain["paths"]["layers"] == [1, 2]


def test_saturation_of_a_trace_with_itself_is_one():
    trace = make_trace()
    assert metrics.analyze(trace, compare=trace)["saturation"] == {"top1": [1.0] * 3, "topk": [1.0] * 3}
    other = make_trace(seed=3)
    other.token_ids = trace.token_ids
    both = metrics.analyze(trace, compare=[trace, other])["saturation"]
    assert [s["top1"] for s in both][0] == [1.0] * 3 and both[1]["top1"] != [1.0] * 3
    with pytest.raises(MoelabError, match="token_ids differ"):
        metrics.saturation(trace, make_trace(seed=3))
    with pytest.raises(MoelabError, match="n_layers"):
        metrics.saturation(trace, make_trace(L=2))


def write_trace(directory, arrays, contextual=True, **meta_changes):
    directory.mkdir()
    T = arrays["token_ids"].shape[0]
    L, _, k = arrays["topk_ids"].shape
    meta = {
        "format": "moelab-trace/1",
        "model": "runs/demo",
        "source": "moelab",
        "checkpoint_step": 100,
        "tokenizer_hash": None,
        "n_tokens": T,
        "n_layers": L,
        "n_experts": 6,
        "top_k": k,
        "domains": DOMAINS,
        "has_router_probs": True,
        "contextual": {"words": WORDS, "token_ids": [101, 102, 103], "senses": SENSES}
        if contextual
        else None,
        "data": "data/demo/tokens",
        **meta_changes,
    }
    for name, array in arrays.items():
        np.save(directory / f"{name}.npy", array)
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


def test_open_round_trip(tmp_path):
    arrays = make_arrays()
    opened = Trace.open(write_trace(tmp_path / "trace", arrays))
    assert isinstance(opened.topk_ids, np.memmap) and opened.meta["checkpoint_step"] == 100
    assert opened.domain_names == tuple(DOMAINS) and opened.contextual["words"] == WORDS
    assert metrics.analyze(opened, min_count=5) == metrics.analyze(make_trace(), min_count=5)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a, d: np.save(d / "topk_ids.npy", a["topk_ids"][:, :-1]), "topk_ids.npy"),
        (lambda a, d: np.save(d / "domains.npy", a["domains"].astype(np.int64)), "domains.npy"),
        (lambda a, d: (d / "router_probs.npy").unlink(), "router_probs.npy is missing"),
        (lambda a, d: (d / "context_target.npy").unlink(), "context_target.npy is missing"),
        (lambda a, d: (d / "meta.json").write_text("{"), "meta.json is damaged"),
        (lambda a, d: (d / "meta.json").unlink(), "has no meta.json"),
    ],
)
def test_open_refuses_a_damaged_trace(tmp_path, damage, message):
    arrays = make_arrays()
    directory = write_trace(tmp_path / "trace", arrays)
    damage(arrays, directory)
    with pytest.raises(MoelabError, match=message):
        Trace.open(directory)


def test_open_refuses_foreign_meta_and_out_of_range_ids(tmp_path):
    arrays = make_arrays()
    with pytest.raises(MoelabError, match="format"):
        Trace.open(write_trace(tmp_path / "a", arrays, format="other/2"))
    with pytest.raises(MoelabError, match="does not exist"):
        Trace.open(tmp_path / "nowhere")
    with pytest.raises(MoelabError, match=r"router_probs.npy holds float16 \(3, 200, 6\)"):
        Trace.open(write_trace(tmp_path / "b", arrays, n_experts=4))
    arrays.pop("router_probs")
    trace = Trace.open(
        write_trace(tmp_path / "c", arrays, n_experts=4, has_router_probs=False)
    )  # ids reach 5
    with pytest.raises(MoelabError, match="n_experts is 4"):
        metrics.load(trace)
    with pytest.raises(MoelabError, match="path layers"):
        metrics.paths(trace, (2, 5))


def test_cli_analyze(tmp_path, capsys):
    directory = write_trace(tmp_path / "trace", make_arrays(), contextual=False)
    assert main(["analyze", str(directory), "--json", "--min-count", "5", "--compare", str(directory)]) == 0
    result = json.loads(capsys.readouterr().out)
    trace = Trace.open(directory)
    assert result == metrics.analyze(trace, min_count=5, compare=trace)
    assert result["saturation"]["top1"] == [1.0] * 3

    assert main(["analyze", str(directory), "--path-layers", "1:2"]) == 0
    table = capsys.readouterr().out
    assert "max_vio" in table and "Paths over layers 1-2" in table
    assert f"{result['layers'][0]['max_vio']:.3f}" in table

    assert main(["analyze", str(directory), "--path-layers", "x"]) == 2
    assert "moelab: error: --path-layers" in capsys.readouterr().err


def make_prediction_trace(seed=3, T=200, vocab=15):
    """make_trace's arrays plus predicted_ids and next_ids (-1 at each 20-token document's end)."""
    a = make_arrays(seed, T=T, vocab=vocab)
    rng = np.random.default_rng(seed + 1)
    nxt = np.append(a["token_ids"][1:], -1).astype(np.int32)
    nxt[19::20] = -1
    predicted = rng.integers(0, vocab + 3, T).astype(np.int32)
    for key in ("context_word", "context_sense", "context_target"):
        a.pop(key)
    return Trace.from_arrays(
        **a,
        domain_names=DOMAINS,
        n_experts=a["router_probs"].shape[-1],
        predicted_ids=predicted,
        next_ids=nxt,
    )


@pytest.mark.parametrize("key", ["input", "next", "predicted"])
@pytest.mark.parametrize("min_count", [1, 12])
def test_vocab_specialization_by_key_matches_loop(chunked, key, min_count):
    trace = make_prediction_trace()
    S, E, k = sets(trace), trace.n_experts, trace.top_k
    labels = {"input": trace.token_ids, "next": trace.next_ids, "predicted": trace.predicted_ids}[key]
    got = metrics.vocab_specialization(trace, min_count=min_count, key=key)
    occurrences = {}
    for t, tok in enumerate(labels):
        if tok >= 0:  # -1: no next token
            occurrences.setdefault(int(tok), []).append(t)
    eligible = [tok for tok, ts in occurrences.items() if len(ts) >= min_count]
    assert eligible
    for l in range(trace.n_layers):
        maxima = [
            max(sum(e in S[l][t] for t in occurrences[tok]) / len(occurrences[tok]) for e in range(E))
            for tok in eligible
        ]
        raw = sum(maxima) / len(maxima)
        assert got["raw"][l] == pytest.approx(raw, abs=1e-12)
        assert got["normalized"][l] == pytest.approx((raw - k / E) / (1 - k / E), abs=1e-12)
    ids, shares = metrics.vocab_shares(trace, 2, min_count, key=key)
    assert sorted(ids.tolist()) == sorted(eligible)


def test_vocab_specialization_by_key_errors_and_missing_arrays():
    plain = make_trace(contextual=False)
    assert np.isnan(metrics.vocab_specialization(plain, 5, key="next")["raw"]).all()
    with pytest.raises(MoelabError, match="--predictions"):
        metrics.vocab_shares(plain, 0, 5, key="predicted")
    with pytest.raises(MoelabError, match="key must be one of"):
        metrics.vocab_specialization(plain, 5, key="output")
    a = make_arrays()
    with pytest.raises(MoelabError, match="go together"):
        Trace.from_arrays(topk_ids=a["topk_ids"], token_ids=a["token_ids"], next_ids=a["token_ids"])


def test_analyze_vocab_by_key_only_with_predictions(tmp_path, capsys):
    plain = make_trace(contextual=False)
    old = metrics.analyze(plain, min_count=5)
    assert "vocab_specialization_by_key" not in old
    assert "true next / predicted" not in metrics.summary_table(old)
    trace = make_prediction_trace()
    # same routing and token ids without the prediction arrays: every other key is unchanged
    bare = Trace.from_arrays(
        **{key: getattr(trace, key) for key in ("topk_ids", "token_ids", "doc_ids", "positions", "domains",
                                                 "topk_weights", "router_probs")},
        domain_names=DOMAINS, n_experts=trace.n_experts,
    )  # fmt: skip
    result, before = metrics.analyze(trace, min_count=5), metrics.analyze(bare, min_count=5)
    by_key = result.pop("vocab_specialization_by_key")
    assert result == before
    for key in ("next", "predicted"):
        want = metrics.vocab_specialization(trace, 5, key=key)
        assert set(by_key[key]) == {"raw", "normalized"}
        np.testing.assert_allclose(by_key[key]["raw"], want["raw"])
        np.testing.assert_allclose(by_key[key]["normalized"], want["normalized"])
    json.dumps(by_key)
    assert "by input / true next / predicted next token" in metrics.summary_table(
        {**result, "vocab_specialization_by_key": by_key}
    )
    # k=1 keys the first expert only, as the other specialization metrics
    top1 = metrics.analyze(trace, min_count=5, k=1)["vocab_specialization_by_key"]["next"]["raw"]
    np.testing.assert_allclose(
        top1, metrics.vocab_specialization(metrics.top1_view(trace), 5, key="next")["raw"]
    )
    # through a trace directory: meta.json declares the arrays and Trace.open checks them
    directory = tmp_path / "t"
    directory.mkdir()
    for key in ("topk_ids", "token_ids", "doc_ids", "positions", "domains", "topk_weights", "router_probs",
                "predicted_ids", "next_ids"):  # fmt: skip
        np.save(directory / f"{key}.npy", np.asarray(getattr(trace, key)))
    (directory / "meta.json").write_text(json.dumps(trace.meta))
    opened = Trace.open(directory)
    assert np.array_equal(opened.next_ids, trace.next_ids)
    np.save(directory / "next_ids.npy", np.asarray(trace.next_ids, dtype=np.int64))
    with pytest.raises(MoelabError, match="next_ids.npy holds int64"):
        Trace.open(directory)
    (directory / "next_ids.npy").unlink()
    with pytest.raises(MoelabError, match="next_ids.npy is missing"):
        Trace.open(directory)
