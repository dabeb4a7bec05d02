"""`moelab report`: one self-contained HTML file, checked on hand-built runs against brute-force counts.

The fake run has a metrics.jsonl written here in the documented format, a config.yaml, a checkpoint
with a tiny trained tokenizer (plus an added `<script>` token, to check escaping) and synthetic traces
whose routing is known, so every number the report shows can be recomputed with plain loops.
"""

import base64
import html
import io
import json
import re
import shutil
import subprocess
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

import moelab
from moelab.cli import main
from moelab.config import save_config
from moelab.data.tokenizer import load_tokenizer, train_tokenizer
from moelab.errors import MoelabError
from moelab.interp import report
from moelab.interp.metrics import Trace

L, E, K = 3, 6, 2
T, DOC, WINDOW = 2400, 100, 30  # windows of the model cross documents
DOMAINS = ["prose", "code & <tags>"]
WORDS, SENSES = ["bank", "spring"], [["river", "money"], ["season", "coil", "water"]]
HEADINGS = [
    "1. Overview",
    "2. Training curves",
    "3. Balance over time",
    "4. Specialization",
    "5. Expert cards",
    "6. Contextual tokens",
    "7. Comparison",
]
CHROMIUM = Path("/usr/bin/chromium")
TEXT = (
    "The river bank was quiet in the spring, and the money in the bank was safe.\n"
    "def add(x, y):\n    return x + y  # a small function\n"
    "Shall I compare thee to a summer's day? Thou art more lovely and more temperate.\n"
)


# ----------------------------------------------------------------------------- building a fake run


def write_metrics(path: Path, scale: float = 1.0) -> list[dict]:
    """20 train lines, two val lines, one non-finite step and one torn line, in trainer.py's format."""
    rng = np.random.default_rng(1)
    lines = []
    for i in range(1, 21):
        step = 5 * i
        counts = rng.integers(10, 200, size=(L, E))
        lines.append(
            {
                "type": "train",
                "step": step,
                "loss": scale * (6 - 0.1 * i),
                "ce": scale * (5.9 - 0.1 * i),
                "load_balance": 1 + 0.01 * i,
                "router_z": 2 - 0.02 * i,
                "lr": 1e-3 * min(1, i / 5),
                "load_balance_coef": 0.01,
                "grad_norm": 1 + 0.1 * i,
                "grad_norm_experts": 0.2,
                "grad_norm_rest": 0.9,
                "tokens": 512 * step,
                "tokens_per_s": 4000 + i,
                "step_time_s": 0.1,
                "layers": {
                    "counts": counts.tolist(),
                    "max_vio": (counts.max(1) / counts.mean(1) - 1).tolist(),
                    "router_entropy": [1.7] * L,
                    "bias_range": [[-0.001 * i, 0.002 * i]] * L,
                },
            }
        )
        if step == 50:
            lines.append({"type": "nonfinite", "step": step, "loss": float("nan"), "streak": 1})
    for step, loss in ((50, 5.5), (100, 4.25)):
        lines.append(
            {
                "type": "val",
                "step": step,
                "loss": scale * loss,
                "perplexity": float(np.exp(loss)),
                "tokens": 4096,
                "max_vio_global": [0.1 * step / 50, 0.2 * step / 50, 0.3 * step / 50],
                "domain_loss": {DOMAINS[0]: loss - 0.1, DOMAINS[1]: loss + 0.1},
            }
        )
    text = "".join(json.dumps(rec) + "\n" for rec in lines)
    path.write_text(text + '{"type": "train", "step": 1')  # a torn last line
    return lines


def routing(token_ids: np.ndarray, rng) -> np.ndarray:
    """(L, T, k) top-k ids: mostly decided by the token id, never expert 5 at layer 2."""
    out = np.empty((L, T, K), dtype=np.int16)
    for layer in range(L):
        n = E - 1 if layer == 2 else E
        first = np.where(rng.random(T) < 0.8, (token_ids * 7 + layer) % n, rng.integers(0, n, T))
        second = (first + 1 + rng.integers(0, n - 1, T)) % n
        out[layer] = np.stack([first, second], axis=1)
    return out


def write_trace(out: Path, arrays: dict, meta: dict) -> Path:
    out.mkdir(parents=True)
    for name, arr in arrays.items():
        np.save(out / f"{name}.npy", arr)
    base = {
        "format": "moelab-trace/1",
        "model": "fake",
        "source": "moelab",
        "checkpoint_step": 100,
        "tokenizer_hash": None,
        "n_layers": L,
        "n_experts": E,
        "top_k": K,
        "has_router_probs": False,
        "data": None,
    }
    (out / "meta.json").write_text(json.dumps({**base, "n_tokens": len(arrays["token_ids"]), **meta}))
    return out


def data_trace(out: Path, script_id: int, control_id: int, vocab: int) -> Path:
    rng = np.random.default_rng(0)
    common = rng.choice(np.arange(2, vocab - 1), size=40, replace=False)
    token_ids = rng.choice(common, size=T).astype(np.int32)
    token_ids[rng.random(T) < 0.05] = script_id
    token_ids[:99][token_ids[:99] == script_id] = common[0]
    # the first <script> ends document 0 (its example has no right context) after a control byte
    token_ids[94:100] = [common[0], common[1], common[0], common[1], control_id, script_id]
    topk = routing(token_ids, rng)
    topk[0, token_ids == script_id, 0] = 0  # <script> always goes to expert 0 at layer 0
    topk[0, token_ids == script_id, 1] = 3
    domains = ((np.arange(T) // DOC) % 2).astype(np.int16)
    domains[: DOC // 2] = -1  # unknown domain
    arrays = {
        "token_ids": token_ids,
        "doc_ids": (np.arange(T) // DOC).astype(np.int64),
        "positions": (np.arange(T) % WINDOW).astype(np.int32),
        "domains": domains,
        "topk_ids": topk,
        "topk_weights": np.full((L, T, K), 0.5, dtype=np.float32),
    }
    return write_trace(out, arrays, {"domains": DOMAINS, "contextual": None})


def contextual_trace(out: Path, vocab: int) -> Path:
    rng = np.random.default_rng(2)
    n, per = 30, 20  # samples of 20 tokens
    word = np.repeat(rng.integers(0, len(WORDS), n), per).astype(np.int16)
    sense = np.repeat([rng.integers(0, len(SENSES[w])) for w in word[::per]], per).astype(np.int16)
    target = np.zeros(n * per, dtype=bool)
    target[np.arange(n) * per + 7] = True
    token_ids = rng.integers(2, vocab, n * per).astype(np.int32)
    token_ids[target] = np.array([100, 101])[word[target]]
    topk = np.argsort(rng.random((L, n * per, E)), axis=-1)[..., :K].astype(np.int16)
    arrays = {
        "token_ids": token_ids,
        "doc_ids": np.repeat(np.arange(n), per).astype(np.int64),
        "positions": np.tile(np.arange(per), n).astype(np.int32),
        "domains": np.full(n * per, -1, dtype=np.int16),
        "topk_ids": topk,
        "topk_weights": np.full((L, n * per, K), 0.5, dtype=np.float32),
        "context_word": word,
        "context_sense": sense,
        "context_target": target,
    }
    ctx = {"words": WORDS, "token_ids": [100, 101], "senses": SENSES, "dropped": {"bat": "2 tokens <blink>"}}
    return write_trace(out, arrays, {"domains": [], "contextual": ctx})


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    """A run directory with metrics, config, checkpoint + tokenizer and both traces."""
    from tokenizers import Tokenizer

    root = tmp_path_factory.mktemp("report")
    (root / "train.jsonl").write_text(
        "".join(json.dumps({"text": TEXT * (i % 3 + 1)}) + "\n" for i in range(60))
    )
    train_tokenizer([root / "train.jsonl"], 300, root / "tok", progress=False)
    tok = Tokenizer.from_file(str(root / "tok" / "tokenizer.json"))
    tok.add_tokens(["<script>"])  # decodes to a string that must never reach the page unescaped
    tok.save(str(root / "tok" / "tokenizer.json"))
    tokenizer = load_tokenizer(root / "tok")
    script_id = tokenizer.tokenizer.token_to_id("<script>")
    control_id = next(i for i in range(tokenizer.vocab_size) if tokenizer.decode([i]) == "\x01")
    config = moelab.load_config(
        None,
        [
            f"model.vocab_size={tokenizer.vocab_size}",
            "model.d_model=16",
            f"model.n_layers={L}",
            "model.n_heads=2",
            "model.d_expert=16",
            f"model.n_experts={E}",
            f"model.top_k={K}",
            "model.max_seq_len=64",
            "model.pad_token_id=1",
            "model.eos_token_id=0",
            "moe.lflb=true",
            "train.steps=100",
            "data.seq_len=50",
        ],
    )
    run = root / "runs" / "alpha"
    run.mkdir(parents=True)
    save_config(config, run / "config.yaml")
    lines = write_metrics(run / "metrics.jsonl")
    moelab.save_checkpoint(
        moelab.build(config), run / "checkpoints" / "step-0000100", tokenizer=root / "tok" / "tokenizer.json"
    )
    (run / "checkpoints" / "latest").write_text("step-0000100\n")
    data_trace(run / "trace", script_id, control_id, tokenizer.vocab_size)
    contextual_trace(run / "trace-contextual", tokenizer.vocab_size)
    return {"root": root, "run": run, "tok": tokenizer, "script_id": script_id, "lines": lines}


@pytest.fixture(scope="module")
def page(fake):
    out = report.build_report([fake["run"]], out=fake["root"] / "out" / "report.html")
    return {"path": out, "html": out.read_text(encoding="utf-8")}


# ----------------------------------------------------------------------------- reading the page


class Page(HTMLParser):
    """Collects attributes of every tag, section texts and expert cards."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags, self.h2, self.cards, self._h2 = [], [], {}, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        self._h2 = tag == "h2"
        if "data-layer" in attrs:
            self.cards[int(attrs["data-layer"]), int(attrs["data-expert"])] = attrs["id"]

    def handle_data(self, data):
        if self._h2:
            self.h2.append(data)
            self._h2 = False


def card_html(text: str, layer: int, expert: int) -> str:
    start = text.index(f'id="card-{layer}-{expert}"')
    end = text.find('<div class="card"', start)
    return text[start : end if end >= 0 else text.index("</details>", start)]


def section(text: str, key: str) -> str:
    start = text.index(f'<section id="{key}">')
    return text[start : text.index("</section>", start)]


def visible(text: str, token: bool = False) -> str:
    """How the report prints decoded text (a token alone when `token`), recomputed here."""
    if token:
        text = text.replace(" ", "␣").replace("\t", "⇥")
    text = text.replace("\n", "↵").replace("\r", "␍")
    pictures = {c: chr(0x2400 + c) for c in range(32) if c != 9} | {0x7F: "\u2421"}
    return "".join(pictures.get(ord(ch), "\ufffd" if 0x80 <= ord(ch) < 0xA0 else ch) for ch in text)


def brute_top_tokens(trace: Trace, layer: int, min_count: int, n: int = 8) -> list[tuple]:
    """expert_top_tokens by plain loops over tokens."""
    tokens = [int(t) for t in trace.token_ids]
    ids = [[int(x) for x in row if x >= 0] for row in trace.topk_ids[layer]]
    total = Counter(tokens)
    per_expert = Counter(e for row in ids for e in set(row))
    pair = Counter((t, e) for t, row in zip(tokens, ids) for e in set(row))
    out = []
    for e in range(trace.n_experts):
        p = per_expert[e] / len(tokens)
        rows = []
        for t, count in total.items():
            c = pair[(t, e)]
            if count >= min_count and c > 0 and c / count > p:
                rows.append(((c + min_count * p) / (count + min_count), t, c, count, (c / count) / p))
        rows.sort(key=lambda r: (-r[0], r[1]))
        out.append([(t, c, count, lift) for _, t, c, count, lift in rows[:n]])
    return out


# ----------------------------------------------------------------------------- tests


def test_page_is_one_self_contained_file(page):
    text, parsed = page["html"], Page(page["html"])
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"https?://|<script|@import|url\(", text, re.IGNORECASE)
    images = 0
    for tag, attrs in parsed.tags:
        assert not (tag == "link" and "stylesheet" in attrs.get("rel", "")), attrs
        for key in ("src", "href"):
            value = attrs.get(key)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, key, value[:80])
        if tag == "img":  # every plot is a real PNG
            from PIL import Image

            png = base64.b64decode(attrs["src"].removeprefix("data:image/png;base64,"), validate=True)
            assert png[:8] == b"\x89PNG\r\n\x1a\n"
            width, height = Image.open(io.BytesIO(png)).size
            assert width > 300 and height > 150 and attrs["alt"]
            images += 1
    assert images >= 9
    assert sorted(p.name for p in page["path"].parent.iterdir()) == ["report.html"]  # no temporary left


def test_every_section_heading_in_order(page):
    assert Page(page["html"]).h2 == HEADINGS
    assert all(f'href="#{key}"' in page["html"] for key, _ in report.SECTIONS)


def test_overview_numbers_come_from_the_run(fake, page):
    overview = section(page["html"], "overview")
    last_train = [r for r in fake["lines"] if r["type"] == "train"][-1]
    assert f"{last_train['loss']:.4f}" in overview and f"{last_train['tokens']:,}" in overview
    assert "4.2500 (perplexity 70.1, step 100)" in overview  # the last val line
    assert "100 of 100" in overview and "1 non-finite step(s) skipped" in overview
    assert "1 unreadable line(s)" in overview  # the torn last line
    assert f"{T:,} tokens, {L} layers × {E} experts, top-{K}" in overview
    assert "d_model 16" in overview and "loss-free balancing, rate 0.001" in overview


def test_balance_section_shows_the_last_max_vio_global(page):
    balance = section(page["html"], "balance")
    assert "validation at step 100" in balance
    # step 100 doubles the step-50 values; then the mean over layers
    assert "<td>MaxVio_global</td><td>0.200</td><td>0.400</td><td>0.600</td><td>0.400</td>" in balance
    assert balance.count("<img") == 4  # MaxVio lines, load heatmaps, bias range, router entropy


def test_final_max_vio_global_says_what_it_counts(page):
    """The trainer validates on train.eval_batches batches, not the whole split: the label says so."""
    balance = re.sub(r"<[^>]+>", "", section(page["html"], "balance"))
    assert "whole set" not in balance
    assert (
        "4,096 tokens of train.eval_batches: 20 batches of the validation split, not the whole split"
        in balance
    )
    assert "moelab eval RUN --data DIR" in balance


def test_read_metrics_bins_are_exact_means(fake, monkeypatch, tmp_path):
    monkeypatch.setattr(report.runs, "LINE_BINS", 3)  # 20 lines -> bins merge twice, width 4
    monkeypatch.setattr(report.runs, "HEATMAP_BINS", 2)
    m = report.read_metrics(fake["run"] / "metrics.jsonl")
    train = [r for r in fake["lines"] if r["type"] == "train"]
    assert (m.nonfinite, m.unreadable, len(m.val)) == (1, 1, 2)
    np.testing.assert_array_equal(m.train["loss"][1], [r["loss"] for r in train])
    steps, vio = m.layers["max_vio"]
    assert len(steps) == 5  # at most 2 * 3 bins: 6 of width 1 -> 3 of width 2 -> ... -> 5 of width 4
    for b in range(5):  # each bin is the plain mean of its lines
        group = train[4 * b : 4 * b + 4]
        assert steps[b] == pytest.approx(np.mean([r["step"] for r in group]))
        np.testing.assert_allclose(vio[b], np.mean([r["layers"]["max_vio"] for r in group], axis=0))
    steps, load = m.layers["load"]
    shares = [np.array(r["layers"]["counts"], float) for r in train]
    shares = [c / c.sum(-1, keepdims=True) for c in shares]
    assert len(steps) == 3  # at most 4 bins: widths 8, 8 and a partial 4
    for b, group in enumerate((shares[:8], shares[8:16], shares[16:])):
        np.testing.assert_allclose(load[b], np.mean(group, axis=0))


def test_top_tokens_match_a_brute_force_ranking(fake):
    trace = Trace.open(fake["run"] / "trace")
    for min_count in (10, 3):
        for layer in range(L):
            got = report.expert_top_tokens(trace, layer, min_count)
            want = brute_top_tokens(trace, layer, min_count)
            assert [[r[:3] for r in rows] for rows in got] == [[r[:3] for r in rows] for rows in want]
            for g, w in zip(got, want):
                np.testing.assert_allclose([r[3] for r in g], [r[3] for r in w])
    assert report.expert_top_tokens(trace, 2)[5] == []  # expert 5 never used at layer 2
    assert report.expert_top_tokens(trace, 0)[0][0][0] == fake["script_id"]


def test_cards_for_every_expert_with_load_tokens_and_examples(fake, page):
    text, tok = page["html"], fake["tok"]
    assert set(Page(text).cards) == {(layer, e) for layer in range(L) for e in range(E)}
    trace = Trace.open(fake["run"] / "trace")
    for layer in range(L):
        counts = Counter(int(e) for e in trace.topk_ids[layer].ravel() if e >= 0)
        want_top = brute_top_tokens(trace, layer, 10)
        for e in range(E):
            card = card_html(text, layer, e)
            assert f"load {100 * counts[e] / sum(counts.values()):.1f}%" in card
            shown = re.findall(r'<code title="id (\d+)">([^<]*)</code>', card)
            assert [int(i) for i, _ in shown] == [t for t, *_ in want_top[e]]
            assert [s for _, s in shown] == [
                html.escape(visible(tok.decode([t]), token=True)) for t, *_ in want_top[e]
            ]
    assert "no over-represented token" in card_html(text, 2, 5)
    # examples: the first occurrence of each top token routed to the expert, marked; on the left only
    # what the model saw (its window, its document), on the right the rest of the document
    tokens = np.asarray(trace.token_ids)
    for layer in range(L):
        ids = np.asarray(trace.topk_ids[layer])
        for e, top in enumerate(brute_top_tokens(trace, layer, 10)):
            found = re.findall(
                r'<li class="ctx">…(.*?)<mark>(.*?)</mark>(.*?)…</li>', card_html(text, layer, e)
            )
            assert len(found) == min(3, len(top))
            for (left, mark, right), (t, *_) in zip(found, top):
                pos = next(p for p in range(T) if tokens[p] == t and e in ids[p])
                start = max(pos - 8, pos - pos % WINDOW, pos - pos % DOC)
                stop = min(pos + 5, pos - pos % DOC + DOC)
                assert html.unescape(mark) == visible(tok.decode([t]))
                assert html.unescape(left) == visible(tok.decode(tokens[start:pos].tolist()))
                assert html.unescape(right) == visible(tok.decode(tokens[pos + 1 : stop].tolist()))


def test_text_from_the_run_is_escaped(fake, page):
    text = page["html"]
    assert "&lt;script&gt;" in card_html(text, 0, 0)  # the added token, top token of expert 0
    assert "<script" not in text.lower() and "<tags>" not in text and "<blink>" not in text
    assert "code &amp; &lt;tags&gt;" in text and "2 tokens &lt;blink&gt;" in text
    assert "\u2401<mark>&lt;script&gt;</mark>" in card_html(text, 0, 0)  # the control byte, made visible
    assert not re.search("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]", text)


def test_specialization_section_numbers(fake, page):
    spec = section(page["html"], "specialization")
    trace = Trace.open(fake["run"] / "trace")
    domains, ids = np.asarray(trace.domains), np.asarray(trace.topk_ids)
    for layer in range(L):  # domain max share, by loops
        best = []
        for d in range(len(DOMAINS)):
            rows = [set(ids[layer, t]) for t in range(T) if domains[t] == d]
            best.append(max(sum(e in r for r in rows) / len(rows) for e in range(E)))
        cont = "–"
        if layer < L - 1:
            cont = f"{np.mean([bool(set(ids[layer, t]) & set(ids[layer + 1, t])) for t in range(T)]):.3f}"
        row = rf"<td>{layer}</td>(<td>[^<]*</td>){{4}}<td>{cont}</td><td>{np.mean(best):.3f}</td>"
        assert re.search(row, spec)
    assert "distinct routes" in spec and spec.count("<img") == 6  # 3: cross-layer transitions + routes


def test_specialization_section_shows_the_nulls(fake, page):
    """The report analyses with REPORT_NULLS shuffles: its null table equals analyze(..., nulls=R)."""
    from moelab.interp.metrics import analyze
    from moelab.interp.nulls import html_table
    from moelab.interp.report.runs import REPORT_NULLS

    spec = section(page["html"], "specialization")
    expected = html_table(analyze(Trace.open(fake["run"] / "trace"), nulls=REPORT_NULLS))
    assert f"mean±std over {REPORT_NULLS} shuffles" in expected and expected in spec


def test_contextual_section_counts_targets_per_sense(fake, page):
    ctx = section(page["html"], "contextual")
    trace = Trace.open(fake["run"] / "trace-contextual")
    targets = Counter(
        (int(w), int(s))
        for w, s, hit in zip(trace.context_word, trace.context_sense, trace.context_target)
        if hit
    )
    for w, word in enumerate(WORDS):
        senses = ", ".join(f"{s} ({targets[(w, j)]})" for j, s in enumerate(SENSES[w]))
        total = sum(targets[(w, j)] for j in range(len(SENSES[w])))
        assert f"<td>{word}</td>" in ctx and f"<td>{senses}</td><td>{total}</td>" in ctx
    assert ctx.count("<img") == 1 and "TIS" in ctx and "ICS" in ctx


def test_single_run_comparison_is_a_note(page):
    comparison = section(page["html"], "comparison")
    assert 'class="note"' in comparison and "<img" not in comparison


def test_missing_inputs_become_notes(fake, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(fake["run"] / "metrics.jsonl", bare)
    text = report.build_report(bare, out=tmp_path / "bare.html").read_text(encoding="utf-8")
    assert Page(text).h2 == HEADINGS and not Page(text).cards
    assert f"moelab trace {bare} --data DIR --out {bare / 'trace'}" in text
    assert f"moelab trace {bare} --contextual --out {bare / 'trace-contextual'}" in text
    assert "no config.yaml" in text and section(text, "training").count("<img") == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "trace").mkdir()
    (empty / "trace" / "meta.json").write_text("{not json")  # a damaged default trace: a warning
    text = report.build_report(empty).read_text(encoding="utf-8")
    assert (empty / "report.html").is_file()
    assert "no metrics.jsonl" in section(text, "training") and "moelab train" in section(text, "balance")
    assert 'class="warn"' in section(text, "overview") and "meta.json is damaged" in text


def table_rows(text: str) -> dict[str, list[str]]:
    """First cell -> the other cells of every body row of the tables in `text` (unescaped)."""
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", text):
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_two_runs_are_compared(fake, tmp_path):
    beta = tmp_path / "beta"
    shutil.copytree(fake["run"], beta)
    lines = write_metrics(beta / "metrics.jsonl", scale=0.5)
    shutil.rmtree(beta / "trace")
    out = report.build_report([fake["run"], beta], out=tmp_path / "both.html")
    text = out.read_text(encoding="utf-8")
    comparison = section(text, "comparison")
    assert comparison.count("<img") == 1
    assert "<th>metric</th><th>alpha</th><th>beta</th><th>random routing</th>" in comparison
    rows = table_rows(comparison)
    beta_val = [r for r in lines if r["type"] == "val"][-1]
    assert rows["final val loss"] == ["4.2500", f"{beta_val['loss']:.4f}", "–"]
    for name in DOMAINS:  # the last val line's domain losses (the same for both: domain_loss is unscaled)
        assert rows[f"val loss · {name}"] == [f"{beta_val['domain_loss'][name]:.4f}"] * 2 + ["–"]
    assert rows["MaxVio_global (val, mean over layers)"] == ["0.400", "0.400", "0.000"]
    trace = Trace.open(fake["run"] / "trace")
    ids = np.asarray(trace.topk_ids)
    cont = np.mean(
        [np.mean([bool(set(ids[l, t]) & set(ids[l + 1, t])) for t in range(T)]) for l in range(L - 1)]
    )
    assert rows["continuity → next"] == [f"{cont:.3f}", "–", "0.600"]  # 1 - C(4, 2) / C(6, 2)
    assert (
        rows["domain max share"][1:] == ["–", f"{K / E:.3f}"]
        and rows["vocab spec. (normalized)"][2] == "0.000"
    )
    tis = [np.mean(v) for v in report.load_run(beta, "beta").ctx["tis"].values()]
    assert rows["TIS (mean)"][1] == f"{np.mean(tis):.3f}" and rows["TIS (mean)"][2] == "–"
    assert "path top-10 share" not in rows  # no tree run
    h = report.headline(report.load_run(beta, "beta"))
    assert h["val_loss"] == 2.125 and h["max_vio_global"] == pytest.approx(0.4) and h["domain_max"] is None


def tree_routing(domains: np.ndarray, rng, b: int = 2, depth: int = 2) -> np.ndarray:
    """(L, T, depth) experts of tokens descending a b-ary tree (branch biased by domain), by a loop;
    every 7th token stops after the first depth."""
    out = np.full((L, T, depth), -1, dtype=np.int16)
    for layer in range(L):
        for t in range(T):
            node = 0
            for d in range(depth if t % 7 else 1):
                branch = (max(domains[t], 0) + layer) % b if rng.random() < 0.7 else int(rng.integers(0, b))
                out[layer, t, d] = node * b + branch
                node = node * b + branch + 1
    return out


def test_tree_and_mixed_width_run(fake, tmp_path):
    """A tree run with mixed widths: per-depth specialization, the path tree, load per width (trace and
    telemetry) and their comparison rows, each against loops."""
    run = tmp_path / "tree"
    shutil.copytree(fake["run"], run, ignore=shutil.ignore_patterns("trace*"))
    widths = [32, 32, 16, 16, 16, 16]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()[:-1]]
    with open(run / "metrics.jsonl", "w") as fh:
        for rec in records:
            if rec["type"] == "train":
                c = np.array(rec["layers"]["counts"], float)
                rec["layers"]["width_load"] = (
                    np.stack([c[:, :2].sum(1), c[:, 2:].sum(1)], 1) / c.sum(1)[:, None]
                )
                rec["layers"]["width_load"] = rec["layers"]["width_load"][:, ::-1].tolist()  # widths 16, 32
                rec["width_groups"] = {"widths": [16, 32], "experts": [[4, 2]] * L}
            fh.write(json.dumps(rec) + "\n")
    src = Trace.open(fake["run"] / "trace")
    domains = np.asarray(src.domains)
    ids = tree_routing(domains, np.random.default_rng(5))
    arrays = {key: np.asarray(getattr(src, key)) for key in ("token_ids", "doc_ids", "positions", "domains")}
    arrays.update(topk_ids=ids, topk_weights=np.full(ids.shape, 0.5, dtype=np.float32))
    meta = {"domains": DOMAINS, "contextual": None, "tree": {"branches": 2, "depth": 2}}
    write_trace(run / "trace", arrays, {**meta, "expert_widths": [widths] * L})
    out = report.build_report([fake["run"], run], out=tmp_path / "tree.html")
    text = out.read_text(encoding="utf-8")
    spec = section(text, "specialization")
    sets = [[{int(e) for e in ids[l, t] if e >= 0} for t in range(T)] for l in range(L)]
    depth_of = [1, 1, 2, 2, 2, 2]
    depth1 = []  # (max share, baseline) of depth 1 per layer
    for layer in range(L):
        cells = []
        for d in (1, 2):
            experts = [e for e in range(E) if depth_of[e] == d]
            best = []
            for dom in range(len(DOMAINS)):
                tokens = [t for t in range(T) if domains[t] == dom]
                best.append(max(sum(e in sets[layer][t] for t in tokens) / len(tokens) for e in experts))
            known = [t for t in range(T) if domains[t] >= 0]
            base = sum(len(sets[layer][t] & set(experts)) for t in known) / (len(known) * len(experts))
            cells.append(f"{np.mean(best):.3f} ({base:.3f})")
            if d == 1:
                depth1.append((np.mean(best), base))
        per_width = [
            sum(len(s & set(range(2, 6))) for s in sets[layer]),
            sum(len(s & {0, 1}) for s in sets[layer]),
        ]
        total = sum(per_width)
        loads = [f"{per_width[0] / total:.3f} (0.667)", f"{per_width[1] / total:.3f} (0.333)"]
        # the run's rows follow alpha's (which has no tree): the first match is alpha's layer row
        tree_html = spec[spec.index('<h3 class="run">tree</h3>') :]
        assert re.search(
            rf"<td>{layer}</td><td>{re.escape(cells[0])}</td><td>{re.escape(cells[1])}</td>", tree_html
        )
        assert re.search(
            rf"<td>{layer}</td><td>{re.escape(loads[0])}</td><td>{re.escape(loads[1])}</td>", tree_html
        )
        # the path tree: every node reached by >= 1% of the routed tokens, with its share
        routed = [s for s in sets[layer] if s]
        paths = tree_html[tree_html.index(f'data-layer="{layer}"') :]
        for node in range(1, 7):
            share = sum(node - 1 in s for s in routed) / len(routed)
            shown = f'<li data-node="{node}">' in paths.split("</details>")[0]
            assert shown == (share >= 0.01)
        counts = Counter(frozenset(s) for s in routed)
        best_count = counts.most_common(1)[0][1]
        first = re.search(r"<td>1</td><td>([^<]*)</td><td>([^<]*)</td>", paths)
        assert first.group(2) == f"{best_count / len(routed):.1%}"
    assert section(text, "balance").count("load per expert width over training") == 1
    comparison = table_rows(section(text, "comparison"))
    routed_top = []
    for layer in range(L):
        counts = Counter(frozenset(s) for s in sets[layer] if s)
        routed_top.append(sum(c for _, c in counts.most_common(10)) / sum(counts.values()))
    assert comparison["path top-10 share"] == ["–", f"{np.mean(routed_top):.3f}", "1.000"]  # 10 / 2^2 > 1
    assert comparison["load share · width 32"][0] == "–" and comparison["load share · width 32"][2] == "0.333"
    spec1, base1 = np.mean(depth1, axis=0)
    assert comparison["domain max share · depth 1"] == ["–", f"{spec1:.3f}", f"{base1:.3f}"]


def test_trace_option_pairs_and_stale_warning(fake, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fake["run"], run, ignore=shutil.ignore_patterns("trace*"))
    meta = json.loads((fake["run"] / "trace" / "meta.json").read_text())
    shutil.copytree(fake["run"] / "trace", tmp_path / "t1")
    (tmp_path / "t1" / "meta.json").write_text(json.dumps({**meta, "checkpoint_step": 40}))
    shutil.copytree(fake["run"] / "trace-contextual", tmp_path / "t2")
    out = report.build_report([run], out=tmp_path / "r.html", traces=[f"{tmp_path / 't2'},{tmp_path / 't1'}"])
    text = out.read_text(encoding="utf-8")
    assert len(Page(text).cards) == L * E and "<td>bank</td>" in text
    assert "made at step 40 but the latest checkpoint is step 100" in text
    with pytest.raises(MoelabError, match="two data traces"):
        report.build_report([run], traces=[f"{tmp_path / 't1'},{tmp_path / 't1'}"])


def test_cli(fake, tmp_path):
    out = tmp_path / "cli.html"
    assert main(["report", str(fake["run"]), "--out", str(out)]) == 0
    assert Page(out.read_text(encoding="utf-8")).h2 == HEADINGS
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert main(["report", str(fake["run"]), "--trace", "a", "--trace", "b"]) == 2  # one per run
    assert main(["report", str(fake["run"]), "--trace", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert main(["report", str(fake["run"]), "--out", str(tmp_path)]) == 2  # a directory, not a file
    assert main(["report", str(fake["run"]), "--out", str(out)]) == 0  # its own report: replaced
    notes = tmp_path / "notes.html"
    notes.write_text("<p>somebody's page</p>")
    assert main(["report", str(fake["run"]), "--out", str(notes)]) == 2  # not a report: untouched
    assert notes.read_text() == "<p>somebody's page</p>"


@pytest.mark.browser
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_renders_in_headless_chromium(page, tmp_path):
    flags = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
    ]
    url = page["path"].resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    assert all(f">{heading}</h2>" in dom.stdout for heading in HEADINGS)
    assert dom.stdout.count('class="card"') == L * E
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1280,2000", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.stat().st_size > 10_000
    from PIL import Image

    image = Image.open(shot)
    assert image.size == (1280, 2000)
    assert len(np.unique(np.asarray(image.convert("L")))) > 50  # plots and text, not a blank page


def test_balance_section_dead_experts_and_load_percentiles(fake, page, tmp_path):
    """Lines with `dead_experts` / `load_pct` add a plot and a table of the last line; the fake run
    without them (the `page` fixture) renders neither."""
    assert "dead experts" not in section(page["html"], "balance").lower()
    run = tmp_path / "dead"
    run.mkdir()
    shutil.copy(fake["run"] / "config.yaml", run)
    rng = np.random.default_rng(5)
    lines = []
    for rec in fake["lines"]:
        rec = json.loads(json.dumps(rec))
        if rec["type"] == "train":
            counts = np.array(rec["layers"]["counts"], float)
            counts[:, : rng.integers(0, 3)] = 0  # 0-2 dead experts per line
            share = counts / counts.sum(1, keepdims=True)
            rec["layers"]["dead_experts"] = (counts == 0).sum(1).tolist()
            rec["layers"]["load_pct"] = np.percentile(share, [0, 25, 50, 75, 100], axis=1).T.tolist()
        lines.append(rec)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    m = report.read_metrics(run / "metrics.jsonl")
    train = [r for r in lines if r["type"] == "train"]
    steps, dead = m.layers["dead_experts"]
    assert dead.shape == (20, L) and m.layers["load_pct"][1].shape == (20, L, 5)
    np.testing.assert_array_equal(dead, [r["layers"]["dead_experts"] for r in train])
    balance = section(
        report.build_report(run, out=tmp_path / "r.html").read_text(encoding="utf-8"), "balance"
    )
    assert balance.count("<img") == 5 and 'alt="dead experts per layer"' in balance
    last = train[-1]["layers"]
    assert f"last logged window (step {train[-1]['step']}; balanced: {100 / E:.2f}% each)" in balance
    rows = table_rows(balance)
    for layer in range(L):
        want = [str(last["dead_experts"][layer]), *(f"{100 * v:.2f}%" for v in last["load_pct"][layer])]
        assert rows[str(layer)] == want
    assert "<th>min</th><th>p25</th><th>median</th><th>p75</th><th>max</th>" in balance


def test_expert_cards_show_the_logit_lens_when_the_run_has_one():
    from types import SimpleNamespace

    from moelab.interp.report.html import _lens_line

    promoted = [{"id": 7, "logit": 3.0, "token": " king"}, {"id": 9, "logit": 2.0}]
    suppressed = [{"id": 4, "logit": -3.0, "token": "<&>"}]
    lens = {"layers": [{"experts": [{"promoted": promoted, "suppressed": suppressed}, None]}]}
    line = _lens_line(SimpleNamespace(lens=lens), 0, 0)
    assert "<code> king</code> <code>9</code>" in line and "<code>&lt;&amp;&gt;</code>" in line
    assert _lens_line(SimpleNamespace(lens=lens), 0, 1) == ""  # an expert without tokens
    assert (
        _lens_line(SimpleNamespace(lens=lens), 3, 0) == ""
        and _lens_line(SimpleNamespace(lens=None), 0, 0) == ""
    )
