"""`moelab lens`: each expert's mean output equals a per-token recomputation, its logits are
lm_head(norm(mean)), counts equal the routing, unused experts are null, and the CLI writes the file."""

import json

import numpy as np
import pytest
import torch

import moelab
from moelab.cli import main
from moelab.data.loader import TokenDataset
from moelab.data.tokenizer import load_tokenizer
from moelab.errors import MoelabError
from moelab.interp.lens import lens

N_TOKENS, SEQ_LEN, TOP = 90, 20, 7


@pytest.fixture(scope="module")
def workspace(two_domain_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("lens")
    tok = load_tokenizer(two_domain_data / "tok")
    config = moelab.load_config(
        None,
        [f"model.vocab_size={tok.vocab_size}", "model.d_model=32", "model.n_layers=2", "model.n_heads=2",
         "model.d_expert=24", "model.n_experts=6", "model.top_k=2", "model.max_seq_len=64",
         f"model.pad_token_id={tok.pad_id}", f"model.eos_token_id={tok.eos_id}", f"data.seq_len={SEQ_LEN}"],
    )  # fmt: skip
    torch.manual_seed(0)
    model = moelab.build(config).eval()
    with torch.no_grad():
        model.moe_layers[1].router.balance_bias[3] = -1e4  # expert 3 of layer 1 never gets a token
        model.norm.weight.uniform_(0.5, 1.5)  # a visible final-norm weight: the lens must apply it
    ckpt = moelab.save_checkpoint(model, root / "ckpt", tokenizer=two_domain_data / "tok" / "tokenizer.json")
    return {"root": root, "tokens": two_domain_data / "tokens", "ckpt": ckpt, "model": model, "tok": tok}


def brute_force(model, tokens: np.ndarray):
    """Per layer: (E, D) float64 sums and (E,) counts of each expert's output, one token at a time."""
    captured = {}

    def hook(layer):
        def fn(_module, args, _out):
            captured.setdefault(layer, []).append((args[0].detach(), args[1].topk_ids.detach()))

        return fn

    handles = [m.experts.register_forward_hook(hook(i)) for i, m in enumerate(model.moe_layers)]
    with torch.no_grad():
        for start in range(0, len(tokens), SEQ_LEN):  # the lens's windows, one forward each
            model(torch.from_numpy(tokens[start : start + SEQ_LEN].astype(np.int64))[None])
    for h in handles:
        h.remove()
    result = []
    for layer, module in enumerate(model.moe_layers):
        experts = module.experts
        gate_up, down = experts.gate_up.detach().double(), experts.down.detach().double()
        sums, counts = torch.zeros(experts.n_experts, gate_up.shape[1], dtype=torch.float64), [0] * 6
        for x, ids in captured[layer]:
            for t in range(x.shape[0]):
                for slot in range(ids.shape[1]):
                    e = int(ids[t, slot])
                    h = x[t].double() @ gate_up[e]  # [gate | up]
                    gate, up = h.chunk(2)
                    sums[e] += (torch.nn.functional.silu(gate) * up) @ down[e]
                    counts[e] += 1
        result.append((sums, counts))
    return result


def test_lens_matches_brute_force(workspace, tmp_path):
    out = tmp_path / "lens.json"
    result = lens(workspace["ckpt"], workspace["tokens"], out=out, max_tokens=N_TOKENS, top=TOP,
                  batch_size=3, device="cpu", progress=False)  # fmt: skip
    assert json.loads(out.read_text()) == result
    assert result["n_tokens"] == N_TOKENS and result["n_layers"] == 2 and result["top"] == TOP
    tokens = np.asarray(TokenDataset(workspace["tokens"], "val").tokens[:N_TOKENS])
    model, tok = workspace["model"], workspace["tok"]
    reference = brute_force(model, tokens)
    assert result["layers"][1]["experts"][3] is None  # no token reached it
    n_checked = 0
    for layer, (sums, counts) in enumerate(reference):
        assert sum(counts) == N_TOKENS * 2
        for e, ex in enumerate(result["layers"][layer]["experts"]):
            if counts[e] == 0:
                assert ex is None
                continue
            assert ex["n_tokens"] == counts[e] and ex["expert"] == e
            mean = sums[e] / counts[e]
            assert ex["mean_norm"] == pytest.approx(float(mean.norm()), rel=1e-4)
            with torch.no_grad():
                logits = model.lm_head(model.norm(mean.float()[None]))[0]
            promoted = torch.topk(logits, TOP).indices.tolist()
            suppressed = torch.topk(-logits, TOP).indices.tolist()
            assert [r["id"] for r in ex["promoted"]] == promoted
            assert [r["id"] for r in ex["suppressed"]] == suppressed
            np.testing.assert_allclose(
                [r["logit"] for r in ex["promoted"]], logits[promoted].numpy(), atol=1e-4
            )
            assert [r["token"] for r in ex["promoted"]] == [tok.decode([i]) for i in promoted]
            n_checked += 1
    assert n_checked == 2 * 6 - 1


def test_lens_cli_writes_the_file(workspace, capsys):
    ckpt = workspace["ckpt"]
    code = main(["lens", str(ckpt), "--data", str(workspace["tokens"]), "--max-tokens", "40", "--top", "3"])
    assert code in (0, None)
    data = json.loads((ckpt / "lens.json").read_text())
    assert data["format"] == "moelab-lens/1" and data["n_tokens"] == 40
    assert all(len(ex["promoted"]) == 3 for ex in data["layers"][0]["experts"] if ex is not None)
    assert "lens of 2 MoE layers" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["lens", "--help"])
    assert "example:" in capsys.readouterr().out


def test_lens_replaces_only_its_own_file(workspace, tmp_path):
    out = tmp_path / "lens.json"
    lens(workspace["ckpt"], workspace["tokens"], out=out, max_tokens=20, progress=False)
    lens(workspace["ckpt"], workspace["tokens"], out=out, max_tokens=30, progress=False)  # its own: replaced
    assert json.loads(out.read_text())["n_tokens"] == 30
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    with pytest.raises(MoelabError, match="not written by moelab lens"):
        lens(workspace["ckpt"], workspace["tokens"], out=notes, max_tokens=20, progress=False)
    assert notes.read_text() == '{"mine": 1}'


def test_lens_rejects_bad_arguments(workspace):
    with pytest.raises(MoelabError, match="--top"):
        lens(workspace["ckpt"], workspace["tokens"], top=0, progress=False)


HF_CASES = ("olmoe", "qwen2_moe-shared-dense1")  # tests/test_hf_models.py's tiny configs, vocabulary 300


@pytest.mark.parametrize("case", HF_CASES)
def test_lens_of_a_transformers_folder_matches_brute_force(case, transformers, two_domain_data, tmp_path):
    """Each routed expert's mean output, recomputed per token from the folder's expert weights with the
    ids the experts module received; a shared expert and a dense layer are not routed experts."""
    from test_hf_models import CASES, COMMON

    model_type, extra, moe_layers = CASES[case]
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, "vocab_size": 300}, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / "hf")
    tokens_dir = two_domain_data / "tokens"
    with pytest.raises(MoelabError, match="--out"):  # nothing is written into a transformers folder
        lens(tmp_path / "hf", tokens_dir, max_tokens=N_TOKENS, progress=False)
    result = lens(tmp_path / "hf", tokens_dir, out=tmp_path / "lens.json", max_tokens=N_TOKENS, top=TOP,
                  seq_len=SEQ_LEN, batch_size=3, device="cpu", progress=False)  # fmt: skip
    assert result["source"] == "transformers" and result["tokenizer_hash"] is None

    blocks = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts")]
    received = {i: [] for i in range(len(blocks))}
    hooks = [
        b.experts.register_forward_pre_hook(lambda _m, args, i=i: received[i].append((args[0], args[1])))
        for i, b in enumerate(blocks)
    ]
    tokens = np.asarray(TokenDataset(tokens_dir, "val").tokens[:N_TOKENS]).astype(np.int64)
    with torch.no_grad():
        for start in range(0, N_TOKENS, SEQ_LEN):
            model(torch.from_numpy(tokens[start : start + SEQ_LEN])[None], use_cache=False)
    for h in hooks:
        h.remove()
    assert result["n_layers"] == len(blocks) == len(moe_layers)
    E, D = config.num_experts, config.hidden_size
    for layer, block in enumerate(blocks):
        gate_up, down = (
            block.experts.gate_up_proj.detach().double(),
            block.experts.down_proj.detach().double(),
        )
        sums, counts = torch.zeros(E, D, dtype=torch.float64), [0] * E
        for x, ids in received[layer]:
            for t in range(x.shape[0]):
                for slot in range(ids.shape[1]):
                    e = int(ids[t, slot])
                    gate, up = (gate_up[e] @ x[t].double()).chunk(2)
                    sums[e] += down[e] @ (torch.nn.functional.silu(gate) * up)
                    counts[e] += 1
        for e, ex in enumerate(result["layers"][layer]["experts"]):
            if counts[e] == 0:
                assert ex is None
                continue
            mean = sums[e] / counts[e]
            assert ex["n_tokens"] == counts[e]
            assert ex["mean_norm"] == pytest.approx(float(mean.norm()), rel=1e-4)
            with torch.no_grad():
                logits = model.lm_head(model.model.norm(mean.float()[None]))[0]
            assert [r["id"] for r in ex["promoted"]] == torch.topk(logits, TOP).indices.tolist()
            assert [r["id"] for r in ex["suppressed"]] == torch.topk(-logits, TOP).indices.tolist()


def test_analyze_json_carries_the_lens(workspace, tmp_path, capsys):
    from moelab.interp.trace import trace

    ckpt, tokens = workspace["ckpt"], workspace["tokens"]
    directory = trace(ckpt, tmp_path / "trace", data=tokens, max_tokens=60, progress=False)
    result = lens(ckpt, tokens, out=tmp_path / "lens.json", max_tokens=60, top=3, progress=False)
    capsys.readouterr()
    assert main(["analyze", str(directory), "--json", "--lens", str(tmp_path / "lens.json")]) == 0
    analysed = json.loads(capsys.readouterr().out)
    assert analysed["lens"] == result
    assert main(["analyze", str(directory), "--json"]) == 0  # without --lens: no new key
    assert "lens" not in json.loads(capsys.readouterr().out)
    other = dict(result, n_experts=5)
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert main(["analyze", str(directory), "--lens", str(tmp_path / "other.json")]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["analyze", str(directory), "--lens", str(tmp_path / "missing.json")]) == 2


def test_lens_arithmetic_by_hand():
    """Two calls of a 3-expert layer with outputs chosen by hand: means, counts, the -1 slot, the norm and
    the head, computed on paper."""
    from moelab.interp.lens import ExpertMeans, expert_logits

    layer = torch.nn.Identity()
    # call 1: token 0 -> experts (0, 2) with outputs (1, 0), (0, 2); token 1 -> (0, -1) with output (3, 0)
    # call 2: token 0 -> (2, 0) with outputs (0, 4), (1, 2)
    calls = iter(
        [
            (
                torch.tensor([[0, 2], [0, -1]]),
                torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [0.0, 0.0]]]),
            ),
            (torch.tensor([[2, 0]]), torch.tensor([[[0.0, 4.0], [1.0, 2.0]]])),
        ]
    )
    capture = ExpertMeans([layer], 3, lambda _module, _args, _kwargs: next(calls))
    layer(torch.zeros(1))
    layer(torch.zeros(1))
    capture.remove()
    means = capture.means(0)
    assert capture.counts[0].tolist() == [3, 0, 2]  # the -1 slot counts for no expert
    assert means[0].tolist() == [5 / 3, 2 / 3] and means[1] is None and means[2].tolist() == [0.0, 3.0]
    head = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, -1.0]]))
    scale = torch.nn.Linear(2, 2, bias=False)  # a "norm" that doubles the first channel
    with torch.no_grad():
        scale.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    # expert 2: norm -> (0, 3); head -> (0, 3, -3)
    assert expert_logits(scale, head, means[2]).tolist() == [0.0, 3.0, -3.0]
    # expert 0: norm -> (10/3, 2/3); head -> (10/3, 2/3, 8/3)
    assert expert_logits(scale, head, means[0]).tolist() == pytest.approx([10 / 3, 2 / 3, 8 / 3])
