"""`moelab trace`: the arrays equal the model's own routing, labels are right, padding is never traced."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import write_jsonl

import moelab
from moelab.cli import main
from moelab.data.loader import TokenDataset
from moelab.data.tokenize import tokenize_files
from moelab.data.tokenizer import load_tokenizer, train_tokenizer
from moelab.errors import MoelabError
from moelab.interp import trace as trace_mod
from moelab.interp.contextual import load_contextual_set, read_contextual_words


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tokenizer that knows the contextual words, a two-domain tokenized split, and a checkpoint."""
    root = tmp_path_factory.mktemp("trace")
    texts = [s for w in read_contextual_words() for sense in w.senses for s in sense.samples]
    docs = [{"text": t, "domain": "odd" if i % 2 else "even"} for i, t in enumerate(texts)]
    write_jsonl(root / "train.jsonl", docs[:400])
    write_jsonl(root / "val.jsonl", docs[400:])
    train_tokenizer([root / "train.jsonl"], 1200, root / "tok", progress=False)
    tokenize_files([root / "train.jsonl", root / "val.jsonl"], root / "tok", root / "tokens", progress=False)
    tok = load_tokenizer(root / "tok")
    config = moelab.load_config(
        None,
        [f"model.vocab_size={tok.vocab_size}", "model.d_model=32", "model.n_layers=3", "model.n_heads=2",
         "model.d_expert=32", "model.n_experts=6", "model.top_k=2", "model.max_seq_len=64",
         f"model.pad_token_id={tok.pad_id}", f"model.eos_token_id={tok.eos_id}", "data.seq_len=24"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = moelab.build(config).eval()
    with torch.no_grad():  # a visible balancing bias: the trace must use it
        model.moe_layers[1].router.balance_bias.copy_(torch.tensor([0.5, 0.0, -0.5, 0.0, 0.3, 0.0]))
    ckpt = moelab.save_checkpoint(model, root / "ckpt", tokenizer=root / "tok" / "tokenizer.json")
    return {"root": root, "tokens": root / "tokens", "ckpt": ckpt, "model": model, "tok": tok}


def load(d: Path, name: str):
    return np.load(d / f"{name}.npy", mmap_mode="r")


def test_trace_matches_the_model_window_by_window(workspace, tmp_path):
    out = trace_mod.trace(workspace["ckpt"], tmp_path / "t", data=workspace["tokens"], split="val",
                          max_tokens=100, batch_size=3, router_probs=True, progress=False)  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    assert meta["n_tokens"] == 100 and meta["n_layers"] == 3 and meta["n_experts"] == 6 and meta["top_k"] == 2
    assert meta["domains"] == ["even", "odd"] and meta["tokenizer_hash"] == workspace["tok"].hash
    ds = TokenDataset(workspace["tokens"], "val")
    tokens = np.asarray(ds.tokens[:100])
    assert np.array_equal(load(out, "token_ids"), tokens)
    docs = np.searchsorted(ds.offsets, np.arange(100), side="right") - 1
    assert np.array_equal(load(out, "doc_ids"), docs)
    assert np.array_equal(load(out, "domains"), ds.domains[docs])
    assert np.array_equal(load(out, "positions"), np.arange(100) % 24)  # 4 windows of 24 + one of 4
    model = workspace["model"]
    for start in range(0, 100, 24):  # brute force: one forward per window
        ids = torch.from_numpy(tokens[start : start + 24].astype(np.int64))[None]
        with torch.no_grad():
            routing = model(ids).routing
        for layer, r in enumerate(routing):
            n = ids.shape[1]
            assert np.array_equal(load(out, "topk_ids")[layer, start : start + n], r.topk_ids.numpy())
            np.testing.assert_allclose(
                load(out, "topk_weights")[layer, start : start + n], r.topk_weights.numpy(), atol=1e-6
            )  # batched vs one window: matmul blocking differs in the last bits
            probs = r.router_logits.softmax(-1).numpy()
            np.testing.assert_allclose(load(out, "router_probs")[layer, start : start + n], probs, atol=1e-3)
    # the bias of layer 1 changed some selections compared with the unbiased top-k
    probs = load(out, "router_probs")[1].astype(np.float32)
    unbiased = np.sort(np.argsort(-probs, axis=1)[:, :2], axis=1)
    assert (np.sort(load(out, "topk_ids")[1], axis=1) != unbiased).any()


def test_contextual_trace_marks_targets_and_skips_padding(workspace, tmp_path, capsys):
    assert main(["trace", str(workspace["ckpt"]), "--contextual", "--batch-size", "16", "--out",
                 str(tmp_path / "c")]) == 0  # fmt: skip
    out = tmp_path / "c"
    meta = json.loads((out / "meta.json").read_text())
    cset = load_contextual_set(workspace["tok"])
    assert meta["contextual"]["words"] == cset.words and len(cset.words) >= 3
    samples = list(cset.samples())
    assert meta["n_tokens"] == sum(len(s.token_ids) for s in samples)  # no padding traced
    token_ids, target = load(out, "token_ids"), load(out, "context_target")
    word, sense, doc = load(out, "context_word"), load(out, "context_sense"), load(out, "doc_ids")
    assert np.array_equal(token_ids, np.concatenate([s.token_ids for s in samples]))
    expected_targets = np.asarray(cset.token_ids)[word[target]]
    assert np.array_equal(token_ids[target], expected_targets)
    assert target.sum() == sum(len(s.target_positions) for s in samples)
    assert np.array_equal(np.unique(doc), np.arange(len(samples)))
    for i, s in enumerate(samples[:20]):  # every token of sample i carries its word and sense
        assert set(word[doc == i]) == {s.word_index} and set(sense[doc == i]) == {s.sense_index}
    # routing of padded batches equals routing of each sample alone
    model = workspace["model"]
    for i, s in enumerate(samples[:5]):
        with torch.no_grad():
            alone = model(torch.tensor([s.token_ids])).routing
        for layer, r in enumerate(alone):
            assert np.array_equal(load(out, "topk_ids")[layer, doc == i], r.topk_ids.numpy())


def test_trace_refuses_bad_inputs_and_leaves_nothing(workspace, tmp_path, monkeypatch):
    with pytest.raises(MoelabError, match="--data"):
        trace_mod.trace(workspace["ckpt"], tmp_path / "x", progress=False)
    other = tmp_path / "other_tok"
    train_tokenizer([workspace["root"] / "val.jsonl"], 300, other, progress=False)
    tokenize_files([workspace["root"] / "val.jsonl"], other, tmp_path / "other_tokens", val_fraction=0.5,
                   progress=False)  # fmt: skip
    with pytest.raises(MoelabError, match="tokenizer"):
        trace_mod.trace(workspace["ckpt"], tmp_path / "y", data=tmp_path / "other_tokens", progress=False)

    calls = {"n": 0}
    real_add = trace_mod.TraceWriter.add

    def failing_add(self, chunk, routing):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("disk full")
        return real_add(self, chunk, routing)

    monkeypatch.setattr(trace_mod.TraceWriter, "add", failing_add)
    with pytest.raises(RuntimeError):
        trace_mod.trace(
            workspace["ckpt"], tmp_path / "z", data=workspace["tokens"], batch_size=1, progress=False
        )
    assert not (tmp_path / "z").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".z")]


def test_trace_of_a_transformers_moe(workspace, tmp_path, transformers):
    """A transformers Qwen2-MoE folder (with a dense layer) traces with the same format."""
    cfg = transformers.Qwen2MoeConfig(
        vocab_size=workspace["tok"].vocab_size, hidden_size=32, intermediate_size=64,
        moe_intermediate_size=16, shared_expert_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
        mlp_only_layers=[0], max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.Qwen2MoeForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "hf")
    out = trace_mod.trace(tmp_path / "hf", tmp_path / "t", data=workspace["tokens"], max_tokens=40,
                          seq_len=20, progress=False)  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == "transformers:qwen2_moe" and meta["n_layers"] == 2  # layer 0 is dense
    ids = torch.from_numpy(np.asarray(load(out, "token_ids")[:20], dtype=np.int64))[None]
    with torch.no_grad():
        router_logits = hf(ids, output_router_logits=True).router_logits
    moe_logits = [r for r in router_logits if r is not None][-2:]
    for layer, logits in enumerate(moe_logits):
        expected = torch.topk(logits.float().softmax(-1), 2).indices.numpy()
        assert np.array_equal(load(out, "topk_ids")[layer, :20], expected)


def test_trace_refuses_to_replace_a_directory_that_is_not_a_trace(workspace, tmp_path):
    victim = tmp_path / "run"
    (victim / "checkpoints").mkdir(parents=True)
    (victim / "checkpoints" / "keep.txt").write_text("precious")
    with pytest.raises(MoelabError, match="is not a trace"):
        trace_mod.trace(workspace["ckpt"], victim, data=workspace["tokens"], max_tokens=10, progress=False)
    assert (victim / "checkpoints" / "keep.txt").read_text() == "precious"
    for kwargs, flag in (({"batch_size": 0}, "--batch-size"), ({"max_tokens": -1}, "--max-tokens"),
                         ({"seq_len": 10_000}, "--seq-len")):  # fmt: skip
        with pytest.raises(MoelabError, match=flag):
            trace_mod.trace(
                workspace["ckpt"], tmp_path / "t", data=workspace["tokens"], progress=False, **kwargs
            )
    with pytest.raises(MoelabError, match="--contextual"):
        trace_mod.trace(
            workspace["ckpt"], tmp_path / "t", data=workspace["tokens"], contextual=True, progress=False
        )


def test_trace_records_expert_widths_and_tree_shape(workspace, tmp_path):
    """Mixed widths: each layer's routed expert widths, read from the model; equal widths: no entry. A model
    config with tree_branches and tree_depth gets meta["tree"]."""
    plain = trace_mod.open_router(workspace["ckpt"])
    assert plain.expert_widths is None and plain.tree is None
    config = workspace["model"].config
    overrides = [f"model.{key}={getattr(config.model, key)}" for key in
                 ("vocab_size", "d_model", "n_layers", "n_heads", "d_expert", "n_experts", "top_k",
                  "max_seq_len", "pad_token_id", "eos_token_id")]  # fmt: skip
    mixed = moelab.build(moelab.load_config(None, [*overrides, "model.expert_widths=[0.5,1.0]"]))
    ckpt = moelab.save_checkpoint(
        mixed, tmp_path / "mixed", tokenizer=workspace["root"] / "tok" / "tokenizer.json"
    )
    router = trace_mod.open_router(ckpt)
    out = trace_mod.trace(router, tmp_path / "t", data=workspace["tokens"], max_tokens=30, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["expert_widths"] == [[16, 16, 16, 32, 32, 32]] * 3 and "tree" not in meta
    from types import SimpleNamespace

    cfg = SimpleNamespace(tree_branches=2, tree_depth=3, top_k=2)
    assert trace_mod._tree(cfg) == {"branches": 2, "depth": 3, "paths": 2}
    assert trace_mod._tree(config.model) is None
    # a tree router lists the distinct experts of top_k paths in top_k · depth columns
    tree = trace_mod.Router(**{**router.__dict__, "top_k": 1, "tree": {"branches": 2, "depth": 2}})
    out = trace_mod.trace(tree, tmp_path / "tree", data=workspace["tokens"], max_tokens=30, progress=False)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["tree"] == {"branches": 2, "depth": 2} and meta["top_k"] == 2
    from moelab.interp.metrics import Trace, analyze

    assert analyze(Trace.open(out))["tree"]["paths"][0]["routed"] == 30


def test_trace_predictions_match_the_model(workspace, tmp_path):
    """--predictions: predicted_ids = argmax of a plain forward's logits, next_ids = the input shifted
    within each window (-1 at a window's last token); contextual samples end at their last real token."""
    out = trace_mod.trace(workspace["ckpt"], tmp_path / "t", data=workspace["tokens"], max_tokens=60,
                          batch_size=2, predictions=True, progress=False)  # fmt: skip
    meta = json.loads((out / "meta.json").read_text())
    assert meta["has_predictions"] is True
    tokens = np.asarray(load(out, "token_ids"))
    predicted, nxt = load(out, "predicted_ids"), load(out, "next_ids")
    assert predicted.dtype == np.int32 and nxt.dtype == np.int32 and predicted.shape == nxt.shape == (60,)
    model = workspace["model"]
    for start in range(0, 60, 24):  # windows of 24, 24 and 12
        window = tokens[start : start + 24]
        with torch.no_grad():
            logits = model(torch.from_numpy(window.astype(np.int64))[None]).logits[0]
        assert np.array_equal(predicted[start : start + len(window)], logits.argmax(-1).numpy())
        assert np.array_equal(nxt[start : start + len(window)], np.append(window[1:], -1))
    # the routing is the same as without --predictions (the LM head hook does not change the rest)
    plain = trace_mod.trace(workspace["ckpt"], tmp_path / "plain", data=workspace["tokens"], max_tokens=60,
                            batch_size=2, progress=False)  # fmt: skip
    assert np.array_equal(load(plain, "topk_ids"), load(out, "topk_ids"))
    assert not (plain / "predicted_ids.npy").exists()
    assert json.loads((plain / "meta.json").read_text())["has_predictions"] is False
    from moelab.interp.metrics import Trace, analyze

    result = analyze(Trace.open(out), min_count=2)
    assert set(result["vocab_specialization_by_key"]) == {"next", "predicted"}
    assert "vocab_specialization_by_key" not in analyze(Trace.open(plain), min_count=2)


def test_trace_predictions_contextual_padding(workspace, tmp_path):
    out = trace_mod.trace(workspace["ckpt"], tmp_path / "c", contextual=True, batch_size=5,
                          predictions=True, progress=False)  # fmt: skip
    tokens, docs = np.asarray(load(out, "token_ids")), np.asarray(load(out, "doc_ids"))
    predicted, nxt = np.asarray(load(out, "predicted_ids")), np.asarray(load(out, "next_ids"))
    model = workspace["model"]
    for doc in np.unique(docs)[:4]:
        sample = tokens[docs == doc]
        with torch.no_grad():
            logits = model(torch.from_numpy(sample.astype(np.int64))[None]).logits[0]
        assert np.array_equal(predicted[docs == doc], logits.argmax(-1).numpy())
        assert np.array_equal(nxt[docs == doc], np.append(sample[1:], -1))


def test_cli_trace_predictions(workspace, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["trace", str(workspace["ckpt"]), "--data", str(workspace["tokens"]), "--max-tokens", "30",
                 "--predictions", "--out", str(out)]) == 0  # fmt: skip
    assert (out / "predicted_ids.npy").is_file() and (out / "next_ids.npy").is_file()
    capsys.readouterr()
    assert main(["analyze", str(out), "--json", "--min-count", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["vocab_specialization_by_key"]["next"]["raw"]) == 3
    assert main(["analyze", str(out), "--min-count", "2"]) == 0
    assert "true next / predicted next token" in capsys.readouterr().out
