"""Null baselines (moelab.interp.nulls): permutation and label-shuffle nulls of the headline metrics."""

from __future__ import annotations

import json

import numpy as np
from test_metrics import make_trace

from moelab.interp import metrics, nulls
from moelab.interp.metrics import Trace


def layer_sets(trace, layer):
    return sorted(tuple(row) for row in np.asarray(trace.topk_ids)[layer].tolist())


def test_permutation_keeps_each_layers_sets_and_loads_and_is_seeded():
    trace = make_trace(T=300)
    a, b, c = nulls.permuted(trace, 5), nulls.permuted(trace, 5), nulls.permuted(trace, 6)
    np.testing.assert_array_equal(np.asarray(a.topk_ids), np.asarray(b.topk_ids))
    assert not np.array_equal(np.asarray(a.topk_ids), np.asarray(c.topk_ids))
    for layer in range(trace.n_layers):
        assert layer_sets(a, layer) == layer_sets(trace, layer)
        assert not np.array_equal(np.asarray(a.topk_ids)[layer], np.asarray(trace.topk_ids)[layer])
    np.testing.assert_array_equal(metrics.expert_token_counts(a), metrics.expert_token_counts(trace))
    np.testing.assert_array_equal(a.token_ids, trace.token_ids)
    np.testing.assert_array_equal(a.domains, trace.domains)
    # an independent permutation per layer, drawn in turn from default_rng(seed)
    ids, dealt, rng = np.asarray(trace.topk_ids), np.asarray(a.topk_ids), np.random.default_rng(5)
    perms = [rng.permutation(300) for _ in range(trace.n_layers)]
    assert not np.array_equal(perms[0], perms[1])
    for layer, perm in enumerate(perms):
        np.testing.assert_array_equal(dealt[layer], ids[layer][perm])


def test_permutation_null_is_the_mean_and_std_over_explicitly_permuted_traces():
    trace = make_trace(T=250)
    R, seed = 4, 7
    got = nulls.baselines(trace, R, seed=seed)
    rng = np.random.default_rng(seed)
    ids = np.asarray(trace.topk_ids)
    cont, ent, dom = [], [], []
    for _ in range(R):
        shuffled = np.stack([layer[rng.permutation(trace.n_tokens)] for layer in ids])
        t = Trace.from_arrays(
            shuffled,
            token_ids=trace.token_ids,
            domains=trace.domains,
            domain_names=trace.domain_names,
            n_experts=trace.n_experts,
        )
        cont.append(metrics.expert_continuity_next(t))
        ent.append(metrics.paths(t)["norm_entropy"])
        shares = np.stack(list(metrics.domain_specialization(t).values()))
        dom.append(np.nanmax(shares, axis=(0, 2)))
    for name, samples in (("continuity_next", cont), ("path_norm_entropy", ent), ("domain_max_share", dom)):
        np.testing.assert_allclose(got[name]["permutation"]["mean"], np.mean(samples, axis=0))
        np.testing.assert_allclose(got[name]["permutation"]["std"], np.std(samples, axis=0))
    np.testing.assert_allclose(got["continuity_next"]["value"], metrics.expert_continuity_next(trace))
    assert got["R"] == R and got["seed"] == seed
    again = nulls.baselines(trace, R, seed=seed)
    np.testing.assert_array_equal(
        again["vocab_raw"]["label_shuffle"]["mean"], got["vocab_raw"]["label_shuffle"]["mean"]
    )
    assert {"tis_mean", "ics_mean", "path_cover_80", "vocab_normalized"} <= set(got)


def test_label_shuffle_keeps_routing_and_shuffles_labels():
    trace = make_trace(T=300)
    rng = np.random.default_rng(0)
    shuffled = nulls.relabeled(trace, "domains", rng)
    assert shuffled.topk_ids is trace.topk_ids
    np.testing.assert_array_equal(np.sort(shuffled.domains), np.sort(trace.domains))
    assert not np.array_equal(shuffled.domains, trace.domains)
    np.testing.assert_array_equal(trace.domains, make_trace(T=300).domains)  # the original is untouched
    expected = np.asarray(trace.domains)[np.random.default_rng(0).permutation(300)]
    np.testing.assert_array_equal(shuffled.domains, expected)
    tokens = nulls.relabeled(trace, "token_ids", np.random.default_rng(1))
    np.testing.assert_array_equal(np.bincount(tokens.token_ids), np.bincount(trace.token_ids))
    np.testing.assert_array_equal(tokens.domains, trace.domains)


def test_domain_routed_trace_is_far_from_its_label_shuffle_null():
    rng = np.random.default_rng(0)
    T, E = 4000, 8
    domains = rng.integers(0, 2, T)
    first = domains * 4 + rng.integers(0, 4, T)  # domain 0 -> experts 0-3, domain 1 -> 4-7
    second = (first + 1 + rng.integers(0, 3, T)) % 4 + domains * 4
    ids = np.stack([first, second], axis=1)
    trace = Trace.from_arrays(
        np.stack([ids, ids]), domains=domains.astype(np.int16), domain_names=["a", "b"], n_experts=E
    )
    got = nulls.baselines(trace, 5, seed=0)["domain_max_share"]
    lab, perm = got["label_shuffle"], got["permutation"]
    assert np.all(got["value"] > 0.45)  # k/E = 0.25; every expert of a domain takes ~half its tokens
    assert np.all(got["value"] - lab["mean"] > 10 * np.maximum(lab["std"], 1e-3))
    assert np.all(lab["mean"] < 0.3) and np.all(perm["mean"] < 0.3)


def test_analyze_adds_nulls_only_when_asked_and_keeps_every_other_key():
    trace = make_trace()
    plain = metrics.analyze(trace)
    assert "nulls" not in plain and "null" not in metrics.summary_table(plain).lower()
    with_nulls = metrics.analyze(trace, nulls=2, seed=1)
    rest = {key: value for key, value in with_nulls.items() if key != "nulls"}
    assert json.dumps(rest, sort_keys=True) == json.dumps(plain, sort_keys=True)
    entry = with_nulls["nulls"]["domain_max_share"]
    assert set(entry) == {"value", "permutation", "label_shuffle"}
    assert len(entry["value"]) == trace.n_layers and set(entry["permutation"]) == {"mean", "std"}
    assert "label_shuffle" not in with_nulls["nulls"]["continuity_next"]
    json.dumps(with_nulls)  # JSON-ready
    table = metrics.summary_table(with_nulls)
    assert "Null baselines (mean±std over 2 shuffles" in table and "routes for 80%" in table
    top1 = metrics.analyze(trace, nulls=1, k=1)["nulls"]
    expected = metrics.analyze(metrics.top1_view(trace))["layers"][0]["vocab_specialization"]["raw"]
    assert top1["vocab_raw"]["value"][0] == expected
