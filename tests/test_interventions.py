"""Routing interventions, checked against a per-token brute-force routing run through the loop dispatch."""

import json
from pathlib import Path

import pytest
import torch

import moelab
from moelab.cli import main
from moelab.data.loader import TokenDataset
from moelab.errors import MoelabError
from moelab.interp.interventions import ablation_report, intervene
from moelab.moe.dispatch import run_experts
from moelab.train.evaluate import ValLoader, evaluate

E, K, L = 6, 2, 3


def tiny_model(bias_on="scores", norm_topk_prob=False, shared=0, vocab=64, top_k=K, seed=0):
    """A random 3-MoE-layer model whose routers have O(1) logits and a non-zero balancing bias."""
    torch.manual_seed(seed)
    config = moelab.load_config(
        None,
        [
            f"model.vocab_size={vocab}",
            "model.d_model=16",
            f"model.n_layers={L}",
            "model.n_heads=2",
            "model.d_expert=16",
            f"model.n_experts={E}",
            f"model.top_k={top_k}",
            f"model.n_shared_experts={shared}",
            f"model.norm_topk_prob={str(norm_topk_prob).lower()}",
            "model.max_seq_len=32",
            "model.pad_token_id=1",
            "model.eos_token_id=0",
            "moe.lflb=true",
            f"moe.lflb_bias_on={bias_on}",
            "data.seq_len=16",
        ],
    )
    model = moelab.build(config).eval()
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.router.weight.normal_(0.0, 0.5)  # logits O(1): routing depends on the token
            moe.router.balance_bias.copy_(torch.randn(E) * (0.05 if bias_on == "scores" else 0.5))
    return model


def capture(model):
    """Forward hooks recording each MoE layer's input (B, N, D) and output (B, N, D)."""
    seen = {}

    def hook(i):
        def record(module, inputs, output):
            seen[i] = (inputs[0].detach(), output[0].detach())

        return record

    handles = [moe.register_forward_hook(hook(i)) for i, moe in enumerate(model.moe_layers)]
    return seen, handles


def natural_routing(moe, x):
    """What the router does on x (B, N, D) with no intervention (call outside `intervene`)."""
    return moe.router(x.reshape(-1, x.shape[-1]))


def brute_force_ids(router, x, excluded=(), first=None):
    """Per token, walk the experts in descending selection score, skipping `excluded`: (T, k) long."""
    k = router.top_k
    logits = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), router.weight).float()
    probs = logits.softmax(-1)
    scores = (probs if router.bias_on == "scores" else logits) + router.balance_bias
    rows = []
    for t in range(scores.shape[0]):
        order = sorted(range(E), key=lambda e, t=t: -scores[t, e].item())
        chosen = [] if first is None else [first]
        chosen += [e for e in order if e not in excluded and e != first][: k - len(chosen)]
        rows.append(chosen)
    return torch.tensor(rows), probs


def brute_force_output(moe, x, ids, weights):
    flat = x.reshape(-1, x.shape[-1])
    y = run_experts(flat, ids, weights.to(flat.dtype), moe.experts.gate_up, moe.experts.down, "loop")
    if moe.shared is not None:
        y = y + moe.shared(flat)
    return y.view(x.shape)


def mixing(probs, ids, norm):
    w = probs.gather(1, ids)
    return w / w.sum(-1, keepdim=True) if norm else w


@pytest.fixture(scope="module")
def ids():
    return torch.randint(2, 64, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "bias_on,norm,shared", [("scores", False, 0), ("logits", True, 1)], ids=["scores", "logits-norm-shared"]
)
@torch.no_grad()
def test_remove_reroutes_to_next_choices(ids, bias_on, norm, shared):
    model = tiny_model(bias_on, norm, shared)
    layer, removed = 1, [2, 4]
    base = model(ids)
    seen, handles = capture(model)
    with intervene(model, remove={layer: removed}):
        out = model(ids)
    for h in handles:
        h.remove()
    moe = model.moe_layers[layer]
    x, y = seen[layer]
    want_ids, probs = brute_force_ids(moe.router, x, excluded=removed)
    got = out.routing[layer]
    assert not torch.isin(got.topk_ids, torch.tensor(removed)).any()
    assert torch.equal(got.topk_ids, want_ids)
    torch.testing.assert_close(got.topk_weights, mixing(probs, want_ids, norm))
    torch.testing.assert_close(y, brute_force_output(moe, x, want_ids, mixing(probs, want_ids, norm)))
    # the layer before is untouched; the one after routes its (changed) input as it always would
    assert torch.equal(out.routing[0].topk_ids, base.routing[0].topk_ids)
    assert torch.equal(out.routing[0].topk_weights, base.routing[0].topk_weights)
    natural = natural_routing(model.moe_layers[2], seen[2][0])
    assert torch.equal(out.routing[2].topk_ids, natural.topk_ids)
    assert torch.equal(out.routing[2].topk_weights, natural.topk_weights)
    assert not torch.equal(out.routing[2].router_logits, base.routing[2].router_logits)  # input did change
    # the balancing bias matters here: ignoring it would pick other experts for some tokens
    moe.router.balance_bias.zero_()
    assert not torch.equal(want_ids, brute_force_ids(moe.router, x, excluded=removed)[0])


@torch.no_grad()
def test_context_manager_restores_exactly(ids):
    model = tiny_model()
    before = model(ids)
    with intervene(model, remove={0: [0, 1]}, drop_ranks=[1], renormalize=True, force={2: 3}):
        changed = model(ids)
    assert not torch.allclose(changed.logits, before.logits)
    assert torch.equal(model(ids).logits, before.logits)
    with pytest.raises(RuntimeError, match="inside"), intervene(model, remove={1: [5]}):
        raise RuntimeError("inside")
    after = model(ids)
    assert torch.equal(after.logits, before.logits)
    assert all(torch.equal(a.topk_ids, b.topk_ids) for a, b in zip(after.routing, before.routing))
    assert all(not moe.router._forward_hooks for moe in model.moe_layers)


@pytest.mark.parametrize("renormalize", [False, True])
@torch.no_grad()
def test_drop_rank_one_equals_zero_second_weight(ids, renormalize):
    model = tiny_model()
    seen, handles = capture(model)
    with intervene(model, drop_ranks=[1], renormalize=renormalize):
        out = model(ids)
    for h in handles:
        h.remove()
    for layer, moe in enumerate(model.moe_layers):
        x, y = seen[layer]
        natural = natural_routing(moe, x)
        got = out.routing[layer]
        assert torch.equal(got.topk_ids, natural.topk_ids)
        want = natural.topk_weights.clone()
        want[:, 1] = 0.0
        if renormalize:
            want[:, 0] = natural.topk_weights.sum(-1)
        torch.testing.assert_close(got.topk_weights, want)
        torch.testing.assert_close(got.topk_weights.sum(-1), want.sum(-1))
        torch.testing.assert_close(y, brute_force_output(moe, x, natural.topk_ids, want))


@torch.no_grad()
def test_force_puts_the_expert_in_slot_zero(ids):
    model = tiny_model(norm_topk_prob=True)
    seen, handles = capture(model)
    with intervene(model, force={0: 5}, remove={0: [1]}):
        out = model(ids)
    for h in handles:
        h.remove()
    moe, (x, y) = model.moe_layers[0], seen[0]
    got = out.routing[0]
    assert (got.topk_ids[:, 0] == 5).all()
    want_ids, probs = brute_force_ids(moe.router, x, excluded=[1], first=5)
    assert torch.equal(got.topk_ids, want_ids)
    want_w = mixing(probs, want_ids, True)  # the forced expert's own probability, renormalised over k
    torch.testing.assert_close(got.topk_weights, want_w)
    torch.testing.assert_close(y, brute_force_output(moe, x, want_ids, want_w))
    natural = natural_routing(model.moe_layers[0], x)
    assert (natural.topk_ids[:, 0] != 5).any()  # forcing changed something


@torch.no_grad()
def test_force_with_top1(ids):
    model = tiny_model(top_k=1)
    with intervene(model, force={2: 4}):
        out = model(ids)
    got = out.routing[2]
    assert got.topk_ids.shape == (ids.numel(), 1) and (got.topk_ids == 4).all()
    torch.testing.assert_close(got.topk_weights[:, 0], got.router_logits.softmax(-1)[:, 4])


def test_bad_specs_raise():
    model = tiny_model()
    for kwargs, match in [
        ({"remove": {0: [0, 1, 2, 3, 4]}}, "fewer than top_k"),
        ({"remove": {3: [0]}}, "layer 3"),
        ({"remove": {0: [6]}}, "expert 6"),
        ({"force": {1: 2}, "remove": {1: [2]}}, "also removed"),
        ({"drop_ranks": [2]}, "0..1"),
        ({"drop_ranks": [0, 1], "renormalize": True}, "nothing to renormalise"),
    ]:
        with pytest.raises(MoelabError, match=match), intervene(model, **kwargs):
            pass
    assert all(not moe.router._forward_hooks for moe in model.moe_layers)
    with intervene(model, remove={0: [0, 1, 2, 3]}) as spec:  # exactly k left is fine
        assert spec.remove == {0: (0, 1, 2, 3)}


# ----------------------------------------------------------------------------- report and CLI


@pytest.fixture(scope="module")
def data(two_domain_data, tmp_path_factory) -> dict[str, Path]:
    """Tokenized splits with two domains (see conftest) and a random checkpoint saved with their tokenizer."""
    ckpt = tmp_path_factory.mktemp("ablate") / "ckpt"
    tokenizer = two_domain_data / "tok" / "tokenizer.json"
    moelab.save_checkpoint(tiny_model(vocab=320), ckpt, tokenizer=tokenizer)
    return {"tokens": two_domain_data / "tokens", "ckpt": ckpt}


def val_loader(data):
    return ValLoader(TokenDataset(data["tokens"], "val"), 16, 2)


def test_ablation_report(data):
    model, val = moelab.load(data["ckpt"]), val_loader(data)
    report = ablation_report(model, val, remove={0: [1], 2: [0, 3]}, n_random=3, seed=7, max_batches=3)
    assert set(report) == {"baseline", "intervention", "delta", "random", "random_note", "spec"}
    base, inter = report["baseline"], report["intervention"]
    assert base == evaluate(model, val, 3, "cpu")
    with intervene(model, remove={0: [1], 2: [0, 3]}):
        assert inter == evaluate(model, val, 3, "cpu")
    assert set(base["domain_loss"]) == {"drama", "science"}
    assert report["delta"]["loss"] == inter["loss"] - base["loss"] != 0
    for d in ("drama", "science"):
        assert report["delta"]["domain_loss"][d] == inter["domain_loss"][d] - base["domain_loss"][d]
    assert report["spec"] == {
        "remove": {"0": [1], "2": [0, 3]},
        "drop_ranks": [],
        "renormalize": False,
        "force": {},
        "n_random": 3,
        "seed": 7,
        "max_batches": 3,
    }
    rand = report["random"]
    runs = rand["runs"]
    assert len(runs) == 3
    for run in runs:
        assert (
            sorted(run["remove"]) == ["0", "2"]
            and len(run["remove"]["0"]) == 1
            and len(run["remove"]["2"]) == 2
        )
        assert run["delta"] == run["result"]["loss"] - base["loss"]
        assert (
            run["domain_delta"]["drama"]
            == run["result"]["domain_loss"]["drama"] - base["domain_loss"]["drama"]
        )
    one = runs[0]
    with intervene(model, remove={int(k): v for k, v in one["remove"].items()}):
        assert evaluate(model, val, 3, "cpu")["loss"] == one["result"]["loss"]
    deltas = torch.tensor([r["delta"] for r in runs], dtype=torch.float64)
    assert rand["mean_delta"] == pytest.approx(deltas.mean().item())
    assert rand["std_delta"] == pytest.approx(deltas.std().item())  # sample std
    assert rand["domain_mean_delta"]["drama"] == pytest.approx(
        sum(r["domain_delta"]["drama"] for r in runs) / 3
    )
    again = ablation_report(model, val, remove={0: [1], 2: [0, 3]}, n_random=3, seed=7, max_batches=3)
    assert again["random"]["runs"] == runs  # deterministic per seed
    other = ablation_report(model, val, remove={0: [1], 2: [0, 3]}, n_random=3, seed=8, max_batches=3)
    assert [r["remove"] for r in other["random"]["runs"]] != [r["remove"] for r in runs]
    json.dumps(report)  # JSON-ready

    drop = ablation_report(model, val, drop_ranks=[1], n_random=3, max_batches=2)
    assert drop["random"] is None and "drop_ranks" in drop["random_note"]
    forced = ablation_report(model, val, force={1: 2}, n_random=2, max_batches=2)
    assert [len(r["force"]) for r in forced["random"]["runs"]] == [1, 1]


def test_cli_ablate(data, capsys):
    args = [
        "ablate",
        str(data["ckpt"]),
        "--data",
        str(data["tokens"]),
        "--batches",
        "2",
        "--batch-size",
        "2",
    ]
    assert main([*args, "--experts", "0:1", "--random-baselines", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spec"]["remove"] == {"0": [1]} and len(report["random"]["runs"]) == 2
    model = moelab.load(data["ckpt"])
    val = val_loader(data)
    assert report["baseline"]["loss"] == pytest.approx(evaluate(model, val, 2, "cpu")["loss"], abs=1e-9)

    assert main([*args, "--drop-ranks", "1", "--renormalize", "--force", "2:0"]) == 0
    table = capsys.readouterr().out
    assert "baseline" in table and "drama" in table and "science" in table and "±" in table

    for bad, flag in [
        (["--experts", "0-1"], "--experts"),
        (["--experts", "3:0"], "--experts"),
        (["--experts", "0:0,0:1,0:2,0:3,0:4"], "--experts"),
        (["--force", "0:6"], "--force"),
        (["--drop-ranks", "2"], "--drop-ranks"),
        ([], "nothing to ablate"),
    ]:
        assert main([*args, *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moelab: error: ") and flag in err[0], err


def test_model_files_from_before_the_router_protocol_still_work_through_moe_layers(ids):
    """An experiment copy of an older olmoe.py has `moe_layers` but no `routers()`: interventions,
    tracing and telemetry fall back to the `.router` of each MoE layer."""
    from moelab.train.telemetry import balance_bias_range

    model = tiny_model()

    class OlderModelFile(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        @property
        def moe_layers(self):
            return self.inner.moe_layers

        def forward(self, *args, **kwargs):
            return self.inner(*args, **kwargs)

    older = OlderModelFile(model).eval()
    assert not hasattr(older, "routers")
    with intervene(older, remove={0: [0, 1]}):
        out = older(ids)
    assert not torch.isin(out.routing[0].topk_ids, torch.tensor([0, 1])).any()
    assert torch.isin(older(ids).routing[0].topk_ids, torch.tensor([0, 1])).any()
    assert balance_bias_range(older).shape == (len(model.moe_layers), 2)


def test_cli_ablate_on_a_model_whose_router_is_shared_by_every_layer(two_domain_data, tmp_path, capsys):
    """`moelab ablate --experts 1:E` removes E at MoE layer 1 only, though one router serves all layers."""
    arch = Path(__file__).parent / "archs" / "shared_router.py"
    torch.manual_seed(0)
    config = moelab.load_config(
        None,
        [f"model.arch={arch}", "model.vocab_size=320", "model.d_model=16", f"model.n_layers={L}"]
        + ["model.n_heads=2", "model.d_expert=16", f"model.n_experts={E}", f"model.top_k={K}"]
        + ["model.max_seq_len=32", "model.pad_token_id=1", "model.eos_token_id=0", "data.seq_len=16"],
    )
    model = moelab.build(config).eval()
    with torch.no_grad():
        model.routers()[0].weight.normal_(0.0, 0.5)
    assert len({id(r) for r in model.routers()}) == 1
    ckpt = tmp_path / "ckpt"
    moelab.save_checkpoint(model, ckpt, tokenizer=two_domain_data / "tok" / "tokenizer.json")
    tokens = two_domain_data / "tokens"
    args = ["ablate", str(ckpt), "--data", str(tokens), "--batches", "2", "--batch-size", "2", "--json"]
    assert main([*args, "--experts", "1:0,1:1", "--random-baselines", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spec"]["remove"] == {"1": [0, 1]}
    loaded = moelab.load(ckpt)
    val = ValLoader(TokenDataset(tokens, "val"), 16, 2)
    ids = next(val.batches(1))["input_ids"]
    with intervene(loaded, remove={1: [0, 1]}):
        assert report["intervention"]["loss"] == pytest.approx(
            evaluate(loaded, val, 2, "cpu")["loss"], abs=1e-9
        )
        out = loaded(ids).routing
    natural = loaded(ids).routing
    assert torch.isin(natural[1].topk_ids, torch.tensor([0, 1])).any()  # the removal changes something
    assert not torch.isin(out[1].topk_ids, torch.tensor([0, 1])).any()
    assert torch.equal(out[0].topk_ids, natural[0].topk_ids)  # the same router, untouched at layer 0
    assert report["delta"]["loss"] != 0
