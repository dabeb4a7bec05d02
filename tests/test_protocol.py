"""Protocol options of `moelab analyze` (--k 1, --coactivation adjacent, --source preferred) against
per-token loops, hand-computed cases, and the default analysis left as it was."""

import json

import numpy as np
import pytest
from test_metrics import chunked, make_arrays, make_trace, top1_of, write_trace  # noqa: F401

from moelab.cli import main
from moelab.errors import MoelabError
from moelab.interp import metrics
from moelab.interp.metrics import Trace

SHAPES = pytest.mark.parametrize("shape", [{}, dict(T=120, E=130, k=3)], ids=["E6", "E130"])


def preferred_lists(trace):
    """[layer][token] -> the k experts of largest router probability, descending, ties to the lower id."""
    p = np.asarray(trace.router_probs, dtype=np.float32)
    k = trace.top_k
    return [
        [sorted(range(trace.n_experts), key=lambda e: (-p[l, t, e], e))[:k] for t in range(trace.n_tokens)]
        for l in range(trace.n_layers)
    ]


def domain_loop(trace, S):
    out = {}
    for d, name in enumerate(trace.domain_names):
        members = [t for t in range(trace.n_tokens) if trace.domains[t] == d]
        if members:
            out[name] = [
                [sum(e in S[l][t] for t in members) / len(members) for e in range(trace.n_experts)]
                for l in range(trace.n_layers)
            ]
    return out


def vocab_loop(trace, S, k, min_count):
    E, occurrences = trace.n_experts, {}
    for t, tok in enumerate(trace.token_ids):
        occurrences.setdefault(int(tok), []).append(t)
    eligible = [ts for ts in occurrences.values() if len(ts) >= min_count]
    raw = [
        np.mean([max(sum(e in S[l][t] for t in ts) / len(ts) for e in range(E)) for ts in eligible])
        for l in range(trace.n_layers)
    ]
    return np.array(raw), (np.array(raw) - k / E) / (1 - k / E)


def check_specialization(view, trace, S, k, min_count):
    got = metrics.domain_specialization(view)
    expected = domain_loop(trace, S)
    assert sorted(got) == sorted(expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-12)
    vocab = metrics.vocab_specialization(view, min_count)
    raw, normalized = vocab_loop(trace, S, k, min_count)
    np.testing.assert_allclose(vocab["raw"], raw, atol=1e-12)
    np.testing.assert_allclose(vocab["normalized"], normalized, atol=1e-12)


@SHAPES
@pytest.mark.parametrize("min_count", [1, 10])
def test_top1_specialization_matches_loop(chunked, shape, min_count):  # noqa: F811
    trace = make_trace(**shape)
    ids = np.asarray(trace.topk_ids)
    S = [[{top1_of(ids[l, t])} - {-1} for t in range(trace.n_tokens)] for l in range(trace.n_layers)]
    check_specialization(metrics.top1_view(trace), trace, S, 1, min_count)
    result = metrics.analyze(trace, min_count=min_count, k=1)
    assert result["protocol"] == {"source": "recorded", "k": 1, "min_count": min_count, "coactivation": "all"}
    raw, _ = vocab_loop(trace, S, 1, min_count)
    got = [row["vocab_specialization"]["raw"] for row in result["layers"]]
    np.testing.assert_allclose(got, raw, atol=1e-12)
    default = metrics.analyze(trace, min_count=min_count)
    for row, base in zip(result["layers"], default["layers"]):  # everything else as recorded
        assert row["coactivation"] == base["coactivation"] and row["load"] == base["load"]


def adjacent_loop(trace):
    ids, E = np.asarray(trace.topk_ids), trace.n_experts
    out = np.zeros((trace.n_layers, E, E))
    for l in range(trace.n_layers):
        with_i, both = np.zeros(E), np.zeros((E, E))
        for row in ids[l]:
            for i in {int(e) for e in row if e >= 0}:
                with_i[i] += 1
            pairs = set()
            for a, b in zip(row[:-1], row[1:]):
                if a >= 0 and b >= 0 and a != b:
                    pairs |= {(int(a), int(b)), (int(b), int(a))}
            for i, j in pairs:
                both[i, j] += 1
        out[l] = [[both[i, j] / with_i[i] if with_i[i] else 0.0 for j in range(E)] for i in range(E)]
    return out


@SHAPES
def test_adjacent_coactivation_matches_loop(chunked, shape):  # noqa: F811
    trace = make_trace(**shape)
    got = metrics.coactivation(trace, "adjacent")
    np.testing.assert_allclose(got, adjacent_loop(trace), atol=1e-12)
    if trace.top_k == 2:  # one pair per token: the same as all pairs
        np.testing.assert_allclose(got, metrics.coactivation(trace), atol=1e-12)
    result = metrics.analyze(trace, coactivation_pairs="adjacent")
    np.testing.assert_allclose([row["coactivation"] for row in result["layers"]], got, atol=1e-12)
    assert result["protocol"]["coactivation"] == "adjacent"
    with pytest.raises(MoelabError, match="coactivation"):
        metrics.analyze(trace, coactivation_pairs="some")


def test_adjacent_coactivation_by_hand():
    trace = Trace.from_arrays(np.array([[[0, 1, 2], [0, 2, -1], [2, 0, 1], [1, 1, 0]]]), n_experts=3)
    # with 0: 4 tokens, with 1: 3, with 2: 3. Adjacent pairs: {0,1} {1,2} | {0,2} | {2,0} {0,1} | {1,0}
    np.testing.assert_allclose(
        metrics.coactivation(trace, "adjacent")[0], [[0, 3 / 4, 2 / 4], [3 / 3, 0, 1 / 3], [2 / 3, 1 / 3, 0]]
    )
    np.testing.assert_allclose(  # all pairs: {0,1} in 3 tokens, {0,2} in 3, {1,2} in 2
        metrics.coactivation(trace)[0], [[0, 3 / 4, 3 / 4], [3 / 3, 0, 2 / 3], [3 / 3, 2 / 3, 0]]
    )


@SHAPES
def test_preferred_source_matches_loop(chunked, shape):  # noqa: F811
    trace = make_trace(**shape)
    P = preferred_lists(trace)
    view = metrics.preferred_view(trace)
    for l in range(trace.n_layers):
        np.testing.assert_array_equal(view.topk_ids[l, slice(0, trace.n_tokens)], P[l])
    S = [[set(row) for row in layer] for layer in P]
    check_specialization(view, trace, S, trace.top_k, 5)
    recorded = [[{int(e) for e in row if e >= 0} for row in layer] for layer in np.asarray(trace.topk_ids)]
    share = [np.mean([a != b for a, b in zip(S[l], recorded[l])]) for l in range(trace.n_layers)]
    np.testing.assert_allclose(metrics.preferred_differs(trace), share, atol=1e-12)
    # top-1 of the preferred routing = argmax of router_probs
    S1 = [[{row[0]} for row in layer] for layer in P]
    check_specialization(metrics.top1_view(view), trace, S1, 1, 5)
    result = metrics.analyze(trace, min_count=5, source="preferred", k=1, coactivation_pairs="adjacent")
    assert result["protocol"] == {"source": "preferred", "k": 1, "min_count": 5, "coactivation": "adjacent"}
    np.testing.assert_allclose(result["preferred_differs"], share, atol=1e-12)
    loads = [[sum(e in s for s in S[l]) for e in range(trace.n_experts)] for l in range(trace.n_layers)]
    loads = np.array(loads) / np.sum(loads, axis=1, keepdims=True)
    np.testing.assert_allclose([row["load"] for row in result["layers"]], loads, atol=1e-12)


def test_preferred_differs_by_hand():
    probs = np.array(
        [
            [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],  # preferred {0, 1}, {1, 2}
            [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]],
        ],
        dtype=np.float16,
    )
    ids = np.array([[[0, 1], [2, 1]], [[0, 2], [1, 2]]])  # same, same (other order) | differs, same
    trace = Trace.from_arrays(ids, router_probs=probs, n_experts=3)
    np.testing.assert_allclose(metrics.preferred_differs(trace), [0.0, 0.5])
    assert metrics.analyze(trace)["preferred_differs"] == [0.0, 0.5]
    plain = Trace.from_arrays(ids, n_experts=3)
    assert metrics.preferred_differs(plain) is None and "preferred_differs" not in metrics.analyze(plain)
    with pytest.raises(MoelabError, match="router_probs"):
        metrics.preferred_view(plain)


def test_defaults_unchanged():
    trace = make_trace()
    default = metrics.analyze(trace)
    explicit = metrics.analyze(trace, k=trace.top_k, coactivation_pairs="all", source="recorded")
    assert default == explicit
    assert default["protocol"] == {"source": "recorded", "k": 2, "min_count": 10, "coactivation": "all"}
    np.testing.assert_allclose(
        [row["coactivation"] for row in default["layers"]], metrics.coactivation(trace), atol=0
    )
    vocab = metrics.vocab_specialization(trace)
    np.testing.assert_allclose(
        [row["vocab_specialization"]["raw"] for row in default["layers"]], vocab["raw"]
    )
    domains = metrics.domain_specialization(trace)
    for name, shares in domains.items():
        np.testing.assert_allclose([row["domain_specialization"][name] for row in default["layers"]], shares)
    with pytest.raises(MoelabError, match="k must be"):
        metrics.analyze(trace, k=3)


def test_cli_protocol_flags(tmp_path, capsys):
    directory = write_trace(tmp_path / "trace", make_arrays(), contextual=False)
    flags = ["--k", "1", "--coactivation", "adjacent", "--source", "preferred"]
    assert main(["analyze", str(directory), *flags, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    trace = Trace.open(directory)
    assert result == metrics.analyze(trace, k=1, coactivation_pairs="adjacent", source="preferred")
    assert result["protocol"] == {"source": "preferred", "k": 1, "min_count": 10, "coactivation": "adjacent"}
    assert main(["analyze", str(directory), *flags]) == 0
    table = capsys.readouterr().out
    assert "differs from the recorded one" in table and "Protocol: source preferred" in table

    arrays = make_arrays()
    arrays.pop("router_probs")
    plain = write_trace(tmp_path / "plain", arrays, contextual=False, has_router_probs=False)
    assert main(["analyze", str(plain), "--source", "preferred"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--source preferred needs router_probs" in err and "\n" not in err
    assert main(["analyze", str(plain), "--k", "2", "--json"]) == 0  # k = top_k: the default
    assert "preferred_differs" not in json.loads(capsys.readouterr().out)
    assert main(["analyze", str(plain), "--k", "3"]) == 2
    assert "--k must be 1" in capsys.readouterr().err
