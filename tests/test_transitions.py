"""Cross-layer transitions: against a per-token loop, a hand-computed case, limiting cases, JSON, report."""

import math
from collections import defaultdict

import numpy as np
import pytest
from test_metrics import DOMAINS, chunked, make_trace, top1_of  # noqa: F401 (chunked is a fixture)

from moelab.interp import metrics, transitions
from moelab.interp.metrics import Trace


def loop_joint(trace, layer):
    """{"top1", "topk"} -> {(i, j): weight}, one token at a time."""
    ids = np.asarray(trace.topk_ids)
    top1, topk = defaultdict(float), defaultdict(float)
    for t in range(trace.n_tokens):
        a, b = top1_of(ids[layer, t]), top1_of(ids[layer + 1, t])
        if a >= 0 and b >= 0:
            top1[a, b] += 1
        sa = {int(i) for i in ids[layer, t] if i >= 0}
        sb = {int(i) for i in ids[layer + 1, t] if i >= 0}
        for i in sa:
            for j in sb:
                topk[i, j] += 1 / (len(sa) * len(sb))
    return {"top1": top1, "topk": topk}


def loop_summary(joint, E):
    total = sum(joint.values())
    row = [sum(joint.get((i, j), 0) for j in range(E)) for i in range(E)]
    col = [sum(joint.get((i, j), 0) for i in range(E)) for j in range(E)]
    h_marg = -sum(c / total * math.log2(c / total) for c in col if c > 0)
    h_cond = 0.0
    for i in range(E):
        for j in range(E):
            w = joint.get((i, j), 0)
            if w > 0:
                h_cond -= w / total * math.log2(w / row[i])
    links = sorted(((w / total, i, j) for (i, j), w in joint.items() if w > 0), key=lambda x: -x[0])
    return total, row, h_cond, h_marg, links


@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize("shape", [{}, {"E": 5, "k": 3, "L": 4}])
def test_matches_loop(shape):
    trace = make_trace(**shape)
    E = trace.n_experts
    got = transitions.analysis(trace)
    assert [p["layers"] for p in got["pairs"]] == [[l, l + 1] for l in range(trace.n_layers - 1)]
    for layer, pair in enumerate(got["pairs"]):
        for key, joint in loop_joint(trace, layer).items():
            res = pair[key]
            total, row, h_cond, h_marg, links = loop_summary(joint, E)
            assert res["tokens"] == pytest.approx(total, abs=1e-9)
            for i in range(E):
                for j in range(E):
                    want = joint.get((i, j), 0) / row[i] if row[i] > 0 else math.nan
                    assert res["conditional"][i, j] == pytest.approx(want, abs=1e-12, nan_ok=True)
            assert res["conditional_entropy"] == pytest.approx(h_cond, abs=1e-9)
            assert res["marginal_entropy"] == pytest.approx(h_marg, abs=1e-9)
            assert res["predictability"] == pytest.approx(1 - h_cond / h_marg, abs=1e-9)
            assert len(res["top_links"]) == min(10, len(links))
            for link, (p, i, j) in zip(res["top_links"], links):
                assert link["joint"] == pytest.approx(p, abs=1e-12)  # ties may list another pair
                i, j = link["from"], link["to"]
                assert link["joint"] == pytest.approx(joint[i, j] / total, abs=1e-12)
                assert link["conditional"] == pytest.approx(joint[i, j] / row[i], abs=1e-12)


def tiny_trace(topk_ids, E):
    topk_ids = np.asarray(topk_ids, dtype=np.int16)
    L, T, _ = topk_ids.shape
    return Trace.from_arrays(
        topk_ids=topk_ids,
        token_ids=np.zeros(T, dtype=np.int32),
        doc_ids=np.zeros(T, dtype=np.int64),
        positions=np.arange(T, dtype=np.int32),
        domains=np.zeros(T, dtype=np.int16),
        domain_names=DOMAINS,
        n_experts=E,
    )


def test_hand_computed_four_tokens():
    # top-1 pairs: (0,1), (0,1), (1,0), token 3 has no expert at layer 1
    trace = tiny_trace([[[0, 1], [0, 2], [1, -1], [2, 0]], [[1, 0], [1, 2], [0, 2], [-1, -1]]], E=3)
    pair = transitions.analysis(trace)["pairs"][0]
    one = pair["top1"]
    assert one["tokens"] == 3
    np.testing.assert_allclose(one["conditional"][:2], [[0, 1, 0], [1, 0, 0]])
    assert np.isnan(one["conditional"][2]).all()
    assert one["conditional_entropy"] == 0  # i decides j
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert one["marginal_entropy"] == pytest.approx(h)
    assert one["predictability"] == pytest.approx(1.0)
    assert [(x["from"], x["to"]) for x in one["top_links"]] == [(0, 1), (1, 0)]
    assert one["top_links"][0]["joint"] == pytest.approx(2 / 3)
    many = pair["topk"]
    # token 0: {0,1}x{0,1} 1/4 each; token 1: {0,2}x{1,2} 1/4 each; token 2: {1}x{0,2} 1/2 each
    want = np.zeros((3, 3))
    want[[0, 0, 1, 1], [0, 1, 0, 1]] += 0.25
    want[[0, 0, 2, 2], [1, 2, 1, 2]] += 0.25
    want[1, [0, 2]] += 0.5
    assert many["tokens"] == pytest.approx(3)
    np.testing.assert_allclose(many["conditional"], want / want.sum(axis=1, keepdims=True))


def test_identical_layers_are_predictable_and_independent_ones_are_not():
    rng = np.random.default_rng(1)
    E, T = 8, 20000
    first = np.stack([rng.permutation(E)[:2] for _ in range(T)])  # (T, 2), distinct ids
    same = transitions.analysis(tiny_trace([first, first], E))["pairs"][0]
    assert same["top1"]["predictability"] == pytest.approx(1.0)
    assert same["top1"]["conditional_entropy"] == pytest.approx(0.0, abs=1e-12)
    assert 0 < same["topk"]["predictability"] < 1  # k = 2: i names one of the two members of S_{l+1}
    other = np.stack([rng.permutation(E)[:2] for _ in range(T)])
    indep = transitions.analysis(tiny_trace([first, other], E))["pairs"][0]
    for key in ("top1", "topk"):
        assert indep[key]["marginal_entropy"] == pytest.approx(3.0, abs=0.01)
        assert abs(indep[key]["predictability"]) < 0.01


def loop_routes(trace, first, last):
    """{route tuple: [tokens, first token]}, one token at a time."""
    ids = np.asarray(trace.topk_ids)
    routes = {}
    for t in range(trace.n_tokens):
        route = tuple(top1_of(ids[layer, t]) for layer in range(first, last + 1))
        if min(route) >= 0:
            routes.setdefault(route, [0, t])[0] += 1
    return routes


@pytest.mark.usefixtures("chunked")
@pytest.mark.parametrize(("shape", "layers"), [({}, None), ({"E": 3, "k": 2, "L": 4}, (1, 3))])
def test_common_routes_match_loop(shape, layers):
    trace = make_trace(**shape)
    first, last = layers or (0, trace.n_layers - 1)
    got = transitions.common_routes(trace, layers, top=5)
    want = loop_routes(trace, first, last)
    ranked = sorted(want.items(), key=lambda kv: (-kv[1][0], kv[1][1]))[:5]
    assert got["layers"] == [first, last]
    assert got["routed"] == sum(c for c, _ in want.values())
    assert [r["experts"] for r in got["routes"]] == [list(route) for route, _ in ranked]
    assert [r["tokens"] for r in got["routes"]] == [c for _, (c, _) in ranked]
    assert got["routes"][0]["share"] == pytest.approx(ranked[0][1][0] / got["routed"])


def test_common_routes_hand_computed():
    # routes over 2 layers: (0,1) x2, (1,0) x1; token 3 has no expert at layer 1 -> no route
    trace = tiny_trace([[[0, 1], [0, 2], [1, -1], [2, 0]], [[1, 0], [1, 2], [0, 2], [-1, -1]]], E=3)
    got = transitions.common_routes(trace)
    assert got == {
        "layers": [0, 1],
        "routed": 3,
        "routes": [
            {"experts": [0, 1], "tokens": 2, "share": 2 / 3},
            {"experts": [1, 0], "tokens": 1, "share": 1 / 3},
        ],
    }


def test_in_analyze_json_and_summary():
    trace = make_trace()
    result = metrics.analyze(trace)
    assert result["transitions"]["top_links"] == transitions.TOP_LINKS
    pair = result["transitions"]["pairs"][0]
    assert np.array(pair["top1"]["conditional"], dtype=float).shape == (trace.n_experts,) * 2
    assert "layers" in result and "paths" in result  # the other keys stay
    assert result["routes"] == transitions.common_routes(trace)
    text = metrics.summary_table(result)
    assert "Cross-layer transitions" in text
    assert f"top-1 {pair['top1']['predictability']:.3f}" in text
    one_layer = transitions.analysis(tiny_trace([[[0, 1], [1, 2]]], E=3))
    assert one_layer["pairs"] == [] and transitions.summary_lines({"transitions": one_layer}) == []


def test_report_shows_transition_heatmaps(tmp_path):
    from moelab.interp.report.cards import _expert_cards
    from moelab.interp.report.html import render_html
    from moelab.interp.report.runs import Run

    trace = make_trace()
    run = Run(path=tmp_path, name="run", trace=trace, analysis=metrics.analyze(trace))
    run.cards = _expert_cards(trace, run.analysis, 10)
    run.notes = {key: "missing" for key in ("metrics", "config", "checkpoint", "trace", "contextual")}
    html = render_html([run])
    spec = html[html.index('<section id="specialization">') :]
    spec = spec[: spec.index("</section>")]
    for label in ("top-1", "top-k"):
        assert f'<img alt="cross-layer transition heatmaps ({label})" src="data:image/png;base64,' in spec
    assert "predictability" in spec and "3→3" in spec  # the strongest top-1 link of make_trace's 0→1
    assert "<script" not in html


def test_route_layout_tiles_each_expert_box_with_its_routes():
    from moelab.interp.report.transitions import route_layout

    routes = [
        {"experts": [0, 1, 2], "tokens": 5},
        {"experts": [0, 2, 2], "tokens": 3},
        {"experts": [1, 1, 0], "tokens": 2},
    ]
    nodes, bands = route_layout(routes, gap=0.1)
    boxes = {(n["column"], n["expert"]): (n["y0"], n["y1"]) for n in nodes}
    assert sorted(boxes) == [(0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 2)]
    # column 0: expert 0 holds routes 0 and 1 (0.5 + 0.3), then the gap, then expert 1 (route 2, 0.2)
    assert boxes[0, 0] == pytest.approx((0.0, 0.8)) and boxes[0, 1] == pytest.approx((0.9, 1.1))
    assert bands[0][0] == pytest.approx((0.0, 0.5)) and bands[1][0] == pytest.approx((0.5, 0.8))
    for rank, route in enumerate(routes):
        for column, expert in enumerate(route["experts"]):
            y0, y1 = bands[rank][column]
            assert y1 - y0 == pytest.approx(route["tokens"] / 10)  # width = share of the drawn tokens
            box = boxes[column, expert]
            assert box[0] - 1e-12 <= y0 < y1 <= box[1] + 1e-12
    for (column, expert), (y0, y1) in boxes.items():  # a box is exactly as tall as its routes
        inside = sum(r["tokens"] / 10 for r in routes if r["experts"][column] == expert)
        assert y1 - y0 == pytest.approx(inside)


def test_report_draws_the_route_diagram(tmp_path):
    from moelab.interp.report.cards import _expert_cards
    from moelab.interp.report.html import render_html
    from moelab.interp.report.runs import Run

    trace = make_trace()
    analysis = metrics.analyze(trace)
    run = Run(path=tmp_path, name="run", trace=trace, analysis=analysis)
    run.cards = _expert_cards(trace, analysis, 10)
    run.notes = {key: "missing" for key in ("metrics", "config", "checkpoint", "trace", "contextual")}
    html = render_html([run])
    first, last = analysis["routes"]["layers"]
    assert f'<img alt="most common routes through layers {first}-{last}" src="data:image/png;base64,' in html
    analysis["routes"] = transitions.common_routes(trace, (1, 1))  # one layer: no diagram
    assert "most common routes" not in render_html([run])
