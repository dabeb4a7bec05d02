"""The output contract, for every architecture: each registered name in `moelab.models.ARCHITECTURES` gets
these tests by being registered, plus variants that stress the seams (mixed expert widths, a dense first
layer with a shared expert, and a test-only architecture whose one router serves every MoE layer).

Every check compares against a reference computed here (by hand from the config, by brute force, or by a
second run of the model that must agree), never against the implementation being tested. The olmoe-only
details (exact parameter formula, init, left padding, ...) stay in test_model.py.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model_overrides
from tree_reference import reference_balance

import moelab
from moelab.data.loader import TokenDataset
from moelab.generate import generate
from moelab.interp import metrics
from moelab.interp.interventions import ablation_report, intervene
from moelab.interp.metrics import Trace
from moelab.interp.trace import trace
from moelab.models import ARCHITECTURES, model_module
from moelab.moe.experts import LocalDispatcher, set_dispatcher
from moelab.train.evaluate import ValLoader, evaluate

TESTS = Path(__file__).resolve().parent
SHARED_ROUTER = TESTS / "archs" / "shared_router.py"
V, D, L, E, K = 128, 64, 2, 8, 2  # tiny_model_overrides(): vocab, d_model, MoE layers, experts, top-k
TREE_E, TREE_SLOTS = 6, 4  # hierarchical: a 2-ary tree of depth 2 (2 + 4 edges), top-2 paths = 2·2 slots


@dataclass(frozen=True)
class Case:
    """One architecture (or variant) under test: config overrides on top of tiny_model_overrides()."""

    id: str
    overrides: tuple[str, ...] = ()
    extra_losses: tuple[str, ...] = ()  # model-specific loss terms the architecture must return
    n_experts: int = E
    slots: int = K  # width of topk_ids: top_k for flat routers; a tree lists up to top_k·depth experts

    def __str__(self) -> str:
        return self.id


TREE = ("model.tree_branches=2", "model.tree_depth=2", f"model.n_experts={TREE_E}")
OWN_CASES = {  # architectures whose config needs more than its name
    "hierarchical": Case(
        "hierarchical", ("model.arch=hierarchical", *TREE), n_experts=TREE_E, slots=TREE_SLOTS
    ),
}
CASES = [OWN_CASES.get(name, Case(name, (f"model.arch={name}",))) for name in ARCHITECTURES] + [
    Case("olmoe-mixed-widths", ("model.expert_widths=[0.5,1.0]",)),  # 4 experts of width 16, 4 of 32
    Case(
        "olmoe-dense-first-shared-expert",
        ("model.n_dense_layers=1", "model.d_dense=48", "model.n_shared_experts=1"),
    ),
    Case(
        "crosslayer-window-attention",
        ("model.arch=crosslayer", "model.routing_window=3", "model.routing_attention_heads=2"),
    ),
    Case("shared-router", (f"model.arch={SHARED_ROUTER}", "model.router_norm_coef=0.1"), ("router_norm",)),
]
all_cases = pytest.mark.parametrize("case", CASES, ids=str)


def build(case: Case, *extra: str, seed: int = 0, router_std: float | None = 0.5):
    """The case's model, seeded; router weights ~ N(0, router_std) so routing depends on the token."""
    torch.manual_seed(seed)
    model = moelab.build(moelab.load_config(None, tiny_model_overrides(*case.overrides, *extra)))
    if router_std is not None:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for router in unique(model.routers()):
                for p in router.parameters():
                    p.normal_(0.0, router_std, generator=g)
    return model


def unique(modules) -> list:
    """Modules in first-seen order, each once (a router may serve several layers)."""
    return list({id(m): m for m in modules}.values())


def sharing(modules) -> list[int]:
    """The sharing pattern of a list of modules: index of each one's first occurrence."""
    ids = [id(m) for m in modules]
    return [ids.index(i) for i in ids]


def random_ids(B: int, N: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    return torch.randint(3, vocab, (B, N), generator=torch.Generator().manual_seed(seed))


def bincount(topk_ids: torch.Tensor, n_experts: int = E) -> torch.Tensor:
    """Assignments per expert; id -1 (an empty slot) is no assignment."""
    ids = topk_ids.reshape(-1)
    return torch.bincount(ids[ids >= 0], minlength=n_experts).float()


def reference_balancing(case: Case, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(load_balance, router_z) of one layer by hand from its unbiased (T, E) logits, all tokens real:
    OLMoE's per_layer convention for flat routers; per node for a tree (tree_reference.py)."""
    if case.id == "hierarchical":
        lb, z = reference_balance(logits, 2, 2, K)  # TREE: b = 2, depth 2
        return torch.tensor(lb, dtype=torch.float64), torch.tensor(z, dtype=torch.float64)
    n = logits.shape[-1]
    probs = logits.softmax(-1)
    chosen = F.one_hot(probs.topk(K, dim=-1).indices, n).sum(1).double()  # (T, E) 0/1
    return n * (chosen.sum(0) / (logits.shape[0] * K) * probs.mean(0)).sum(), logits.logsumexp(
        -1
    ).square().mean()


def check_slots(case: Case, info) -> None:
    """topk_ids (T, slots): experts in [0, E), each at most once per token; -1 only in an empty slot (weight
    0); flat routers fill every slot."""
    ids, w = info.topk_ids, info.topk_weights
    assert ids.shape[1] == case.slots and w.shape == ids.shape
    assert ((ids >= -1) & (ids < case.n_experts)).all()
    assert (w[ids < 0] == 0).all()
    for row in ids.tolist():
        real = [e for e in row if e >= 0]
        assert len(real) == len(set(real))
    if case.slots == K:
        assert (ids >= 0).all()


def hook_state(model) -> dict[str, tuple]:
    return {name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks)) for name, m in model.named_modules()}


def data_overrides(root: Path) -> list[str]:
    """A model for the two-domain data (see conftest): its vocabulary and the tokenizer's eos/pad ids."""
    ds = TokenDataset(root / "tokens", "val")
    return ["model.vocab_size=320", f"model.pad_token_id={ds.pad_id}", f"model.eos_token_id={ds.eos_id}"]


# ----------------------------------------------------------------------------- 1. shapes, dtypes, losses


@all_cases
def test_output_contract(case):
    model = build(case, "moe.load_balance_coef=0.5", "moe.z_loss_coef=0.25")
    cfg = model.config
    B, N = 2, 6
    T = B * N
    ids, labels = random_ids(B, N), random_ids(B, N, seed=1)
    labels[0, 0] = labels[1, 4] = -100
    calls = []  # (router module, RoutingInfo) in call order
    handles = [r.register_forward_hook(lambda m, i, o: calls.append((m, o))) for r in unique(model.routers())]
    try:
        out = model(ids, labels=labels)
    finally:
        for h in handles:
            h.remove()

    assert out.logits.shape == (B, N, V) and out.logits.dtype == torch.float32
    routers = model.routers()
    assert len(routers) == cfg.model.n_layers == L  # one per MoE layer; dense layers route nothing
    assert len(out.routing) == len(routers)
    # routers() is in the order of out.routing: the l-th router call produced out.routing[l]
    assert [id(m) for m, _ in calls] == [id(r) for r in routers]
    for (_, info), r in zip(calls, out.routing, strict=True):
        assert torch.equal(info.topk_ids, r.topk_ids) and torch.equal(info.router_logits, r.router_logits)
    for r in out.routing:
        assert isinstance(r, moelab.RoutingInfo)
        assert r.router_logits.shape == (T, case.n_experts) and r.router_logits.dtype == torch.float32
        assert r.topk_ids.shape == (T, case.slots) and r.topk_ids.dtype == torch.long
        check_slots(case, r)
        assert r.topk_weights.shape == (T, case.slots) and r.topk_weights.dtype == out.logits.dtype
        assert isinstance(r.extra, dict)
    # routing depends on the token (router weights are large), and layers differ
    assert len({tuple(row) for row in out.routing[0].topk_ids.tolist()}) > 1
    assert not torch.equal(out.routing[0].router_logits, out.routing[1].router_logits)
    assert out.expert_counts.shape == (L, case.n_experts)
    counted = torch.stack([bincount(r.topk_ids, case.n_experts) for r in out.routing])
    assert torch.equal(out.expert_counts.float(), counted)

    assert {"ce", "load_balance", "router_z", *case.extra_losses} <= set(out.losses)
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    logits = out.logits.detach()
    ce = F.cross_entropy(logits.flatten(0, 1).double(), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.losses["ce"].double(), ce, atol=1e-5, rtol=1e-5)
    # balancing terms by hand from the returned (unbiased) router logits
    lb, z = [], []
    for r in out.routing:
        layer_lb, layer_z = reference_balancing(case, r.router_logits.detach().double())
        lb.append(layer_lb)
        z.append(layer_z)
    torch.testing.assert_close(out.losses["load_balance"].double(), torch.stack(lb).mean(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.losses["router_z"].double(), torch.stack(z).mean(), atol=1e-5, rtol=1e-5)
    # the total: documented coefficients, read from the config here
    coef = {"ce": 1.0, "load_balance": cfg.moe.load_balance_coef, "router_z": cfg.moe.z_loss_coef}
    for name in out.losses:
        if name not in coef:  # a model-specific term is weighted by the architecture's model.NAME_coef
            coef[name] = getattr(cfg.model, f"{name}_coef")
    if case.id == "shared-router":
        assert coef["router_norm"] == 0.1 and out.losses["router_norm"].item() > 1e-2  # visible in the sum
    total = sum(coef[name] * term.double() for name, term in out.losses.items())
    torch.testing.assert_close(out.loss.double(), total, atol=1e-6, rtol=1e-6)
    out.loss.backward()  # the total is differentiable


# ----------------------------------------------------------------------------- 2. causality


@all_cases
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@torch.no_grad()
def test_causality(case, attention):
    model = build(case, f"model.attention={attention}").eval()
    B, N, j = 2, 10, 6
    ids = random_ids(B, N)
    changed = ids.clone()
    changed[:, j] = (ids[:, j] + 17) % (V - 3) + 3
    a, b = model(ids), model(changed)
    torch.testing.assert_close(a.logits[:, :j], b.logits[:, :j], atol=1e-6, rtol=1e-6)
    assert (a.logits[:, j:] - b.logits[:, j:]).abs().amax(dim=(0, 2)).min() > 1e-4  # later positions see it
    for ra, rb in zip(a.routing, b.routing, strict=True):
        ia, ib = ra.topk_ids.view(B, N, -1), rb.topk_ids.view(B, N, -1)
        assert torch.equal(ia[:, :j], ib[:, :j])
        la, lb = ra.router_logits.view(B, N, -1), rb.router_logits.view(B, N, -1)
        torch.testing.assert_close(la[:, :j], lb[:, :j], atol=1e-6, rtol=1e-6)
        assert not torch.equal(la[:, j], lb[:, j])


# ----------------------------------------------------------------------------- 3. padding


@all_cases
@torch.no_grad()
def test_right_padding_is_invisible(case):
    model = build(case).eval()
    pad = model.config.model.pad_token_id
    short, full = random_ids(1, 5, seed=3), random_ids(1, 8, seed=4)
    batch = torch.cat([torch.cat([short, torch.full((1, 3), pad)], dim=1), full])
    mask = torch.tensor([[1] * 5 + [0] * 3, [1] * 8])
    out = model(batch, attention_mask=mask)
    alone = [model(short), model(full)]
    torch.testing.assert_close(out.logits[0, :5], alone[0].logits[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[1], alone[1].logits[0], atol=1e-5, rtol=1e-5)
    real = mask.reshape(-1).bool()
    for layer, r in enumerate(out.routing):
        want = torch.cat([a.routing[layer].topk_ids for a in alone])
        assert torch.equal(r.topk_ids[real], want)
        want_logits = torch.cat([a.routing[layer].router_logits for a in alone])
        torch.testing.assert_close(r.router_logits[real], want_logits, atol=1e-5, rtol=1e-5)
        # counts: the real tokens only (counting the padding would add 3·k)
        assert torch.equal(out.expert_counts[layer].float(), bincount(r.topk_ids[real], case.n_experts))
        assert torch.equal(out.expert_counts[layer].float(), bincount(want, case.n_experts))
    assigned = sum(int((a.routing[layer].topk_ids >= 0).sum()) for a in alone for layer in range(L))
    assert out.expert_counts.sum().item() == assigned
    if case.slots == K:
        assert assigned == L * 13 * K


# ----------------------------------------------------------------------------- 4. dispatch paths


@all_cases
def test_dispatch_paths_agree_in_outputs_and_gradients(case):
    model = build(case, "moe.dispatch=loop")
    ids, labels = random_ids(2, 7), random_ids(2, 7, seed=1)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    labels[mask == 0] = -100
    results = {}
    for kernel in ("loop", "sorted", "grouped"):
        assert set_dispatcher(model, LocalDispatcher(kernel)) >= L  # every MoE layer's experts
        model.zero_grad(set_to_none=True)
        out = model(ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[kernel] = (out, grads)
    ref, ref_grads = results["loop"]
    names = [n for n, _ in model.named_parameters()]
    assert sorted(ref_grads) == sorted(names)  # every parameter gets a gradient
    assert any(".experts." in n and ref_grads[n].abs().sum() > 0 for n in names)
    for kernel in ("sorted", "grouped"):
        out, grads = results[kernel]
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)
        for r, r0 in zip(out.routing, ref.routing, strict=True):
            assert torch.equal(r.topk_ids, r0.topk_ids)
        assert torch.equal(out.expert_counts, ref.expert_counts)
        assert sorted(grads) == sorted(ref_grads)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=f"{kernel}: {name}")


# ----------------------------------------------------------------------------- 5. checkpoints


COUNTS = torch.tensor([[8.0, 1, 1, 1, 1, 1, 1, 2], [1.0, 1, 1, 1, 1, 1, 1, 9]])  # (L, E), means 2 and 2
RATE = 0.01
# bias += rate · sign(mean - count): one router per layer moves by its own layer's counts ...
BIAS_PER_LAYER = RATE * torch.tensor([[-1.0, 1, 1, 1, 1, 1, 1, 0], [1.0, 1, 1, 1, 1, 1, 1, -1]])
# ... a router serving both layers moves once by the sum [9, 2, 2, 2, 2, 2, 2, 11] (mean 4). Moving once per
# layer would give [0, 2, ..., 2, -1]·rate and the last layer alone [1, ..., 1, -1]·rate: all differ.
BIAS_SHARED = RATE * torch.tensor([-1.0, 1, 1, 1, 1, 1, 1, -1])
# A tree moves each branch toward the mean of its node's branches: edges (0, 1) at the root, (2, 3) and (4, 5)
# below it. Node means (5, 3, 3) and (1, 2, 4); the flat rule (means 22/6 and 14/6) would differ in both.
TREE_COUNTS = torch.tensor([[8.0, 2, 3, 3, 1, 5], [1.0, 1, 2, 2, 7, 1]])
TREE_BIAS = RATE * torch.tensor([[-1.0, 1, 0, 0, 1, -1], [0.0, 0, 0, 0, -1, 1]])


@all_cases
def test_checkpoint_round_trip_with_balancing_biases(case, tmp_path):
    model = build(case, "moe.lflb=true", f"moe.lflb_rate={RATE}").eval()
    routers = model.routers()
    shared = len(unique(routers)) == 1
    assert shared == (case.id == "shared-router")
    tree = case.id == "hierarchical"
    counts = TREE_COUNTS if tree else COUNTS
    model.update_balance_biases(counts)
    for layer, r in enumerate(routers):
        want = BIAS_SHARED if shared else (TREE_BIAS if tree else BIAS_PER_LAYER)[layer]
        assert torch.equal(r.balance_bias, want.float()), layer
    ids = random_ids(2, 9)
    with torch.no_grad():
        ref = model(ids)

    path = moelab.save_checkpoint(model, tmp_path / "ckpt")
    loaded = moelab.load(path)
    assert type(loaded.config.model).__name__ == type(model.config.model).__name__
    assert dataclasses.asdict(loaded.config.model) | {"arch": None} == dataclasses.asdict(
        model.config.model
    ) | {"arch": None}
    assert loaded.config.moe == model.config.moe
    a, b = model.state_dict(), loaded.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert sharing(loaded.routers()) == sharing(routers)
    if shared:
        assert len(unique(loaded.routers())) == 1
    for r, r0 in zip(loaded.routers(), routers, strict=True):
        assert torch.equal(r.balance_bias, r0.balance_bias)
    with torch.no_grad():
        out = loaded(ids)
    assert torch.equal(out.logits, ref.logits)
    for r, r0 in zip(out.routing, ref.routing, strict=True):
        assert torch.equal(r.topk_ids, r0.topk_ids)
    # the loaded model still balances like the original: a shared router moves once
    loaded.update_balance_biases(counts)
    model.update_balance_biases(counts)
    for r, r0 in zip(loaded.routers(), routers, strict=True):
        assert torch.equal(r.balance_bias, r0.balance_bias)


# ----------------------------------------------------------------------------- 6. KV cache


@all_cases
@torch.no_grad()
def test_kv_cache_decoding_equals_recompute(case):
    model = build(case).eval()
    seq = random_ids(1, 5, seed=2)
    cache = model.new_cache(1, 16)
    inputs = seq
    for _ in range(8):
        out = model(inputs, cache=cache)
        assert cache.length == seq.shape[1]
        full = model(seq)
        n = inputs.shape[1]
        torch.testing.assert_close(out.logits[0], full.logits[0, -n:], atol=1e-5, rtol=1e-5)
        for r, rf in zip(out.routing, full.routing, strict=True):
            assert torch.equal(r.topk_ids, rf.topk_ids[-n:])
        token = out.logits[0, -1].argmax().view(1, 1)  # greedy
        seq = torch.cat([seq, token], dim=1)
        inputs = token
    assert generate(model, seq[0, :5], max_new_tokens=8) == seq[0, 5:].tolist()  # moelab generate agrees


# ----------------------------------------------------------------------------- 7. trace and analyze


@all_cases
@torch.no_grad()
def test_trace_and_analyze(case, two_domain_data, tmp_path):
    model = build(case, *data_overrides(two_domain_data)).eval()
    ckpt = moelab.save_checkpoint(
        model, tmp_path / "ckpt", tokenizer=two_domain_data / "tok" / "tokenizer.json"
    )
    n_tokens, window = 240, 24  # the first two documents: both domains
    out = trace(ckpt, tmp_path / "trace", data=two_domain_data / "tokens", split="val",
                max_tokens=n_tokens, seq_len=window, batch_size=4, progress=False)  # fmt: skip
    t = Trace.open(out)
    shape = (n_tokens, len(model.routers()), case.n_experts, case.slots)
    assert (t.n_tokens, t.n_layers, t.n_experts, t.top_k) == shape
    tokens = np.asarray(TokenDataset(two_domain_data / "tokens", "val").tokens[:n_tokens], dtype=np.int64)
    assert np.array_equal(np.asarray(t.token_ids), tokens)
    direct = []  # (L, n, k) per window: one forward per window of the in-memory model
    for start in range(0, n_tokens, window):
        routing = model(torch.from_numpy(tokens[start : start + window])[None]).routing
        direct.append(np.stack([r.topk_ids.numpy() for r in routing]))
    direct = np.concatenate(direct, axis=1)  # (L, T, k)
    assert np.array_equal(np.asarray(t.topk_ids), direct)

    counts = metrics.expert_token_counts(t)  # (L, E)
    assigned = [direct[layer][direct[layer] >= 0] for layer in range(L)]
    want = np.stack([np.bincount(ids, minlength=case.n_experts) for ids in assigned])
    assert np.array_equal(counts, want)
    assert (counts.sum(axis=1) == [ids.size for ids in assigned]).all()
    if case.slots == K:
        assert (counts.sum(axis=1) == n_tokens * K).all()
    result = metrics.analyze(t, min_count=2)
    json.dumps(result)
    assert result["n_tokens"] == n_tokens and len(result["layers"]) == L
    for layer in result["layers"]:
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert set(layer["domain_specialization"]) == {"drama", "science"}
    assert set(np.asarray(t.domains).tolist()) == {0, 1}


# ----------------------------------------------------------------------------- 8. interventions


@all_cases
@torch.no_grad()
def test_interventions(case):
    model = build(case).eval()
    routers = model.routers()
    ids = random_ids(2, 12, seed=5)
    base = model(ids)
    hooks = hook_state(model)

    def natural(layer, info):
        """The router's own selection from a layer's (unbiased) logits: no intervention there."""
        return routers[layer].select(info.router_logits)[0]

    # remove at layer 1 only: the two experts layer 1 uses most
    busy = bincount(base.routing[1].topk_ids, case.n_experts).topk(2).indices.tolist()
    removed = torch.tensor(busy)
    with intervene(model, remove={1: busy}):
        out = model(ids)
    for field in ("router_logits", "topk_ids", "topk_weights"):  # layer 0 bit-identical
        assert torch.equal(getattr(out.routing[0], field), getattr(base.routing[0], field)), field
    r1 = out.routing[1]
    assert torch.isin(base.routing[1].topk_ids, removed).any()
    assert not torch.isin(r1.topk_ids, removed).any()
    assert torch.equal(r1.router_logits, base.routing[1].router_logits)  # its input did not change
    untouched = ~torch.isin(base.routing[1].topk_ids, removed).any(-1)  # tokens that used neither
    assert torch.equal(r1.topk_ids[untouched], base.routing[1].topk_ids[untouched])
    assert torch.equal(out.expert_counts[1], bincount(r1.topk_ids, case.n_experts))  # what was dispatched
    assert not torch.equal(out.logits, base.logits)

    # force at layer 0 only
    forced = int(
        bincount(base.routing[0].topk_ids[:, 0], case.n_experts).argmin()
    )  # rarely (or never) first naturally
    assert (base.routing[0].topk_ids[:, 0] != forced).any()
    with intervene(model, force={0: forced}):
        out = model(ids)
    assert (out.routing[0].topk_ids[:, 0] == forced).all()
    assert torch.equal(out.routing[0].router_logits, base.routing[0].router_logits)
    assert torch.equal(out.routing[1].topk_ids, natural(1, out.routing[1]))  # layer 1 routes as it would
    assert not torch.equal(out.routing[1].router_logits, base.routing[1].router_logits)  # on a new input

    # drop rank 1 in every layer
    with intervene(model, drop_ranks=[1]):
        out = model(ids)
    for layer, r in enumerate(out.routing):
        assert (r.topk_weights[:, 1] == 0).all(), layer
        assert torch.equal(r.topk_ids, natural(layer, r)), layer
        assert (r.topk_weights[:, 0] > 0).all()
    assert torch.equal(out.routing[0].topk_ids, base.routing[0].topk_ids)
    assert torch.equal(out.routing[0].topk_weights[:, 0], base.routing[0].topk_weights[:, 0])

    # all of it undone: no hook left anywhere, bit-identical outputs
    assert hook_state(model) == hooks
    assert not model._forward_hooks and not model._forward_pre_hooks
    for r in unique(routers):
        assert not r._forward_hooks and not r._forward_pre_hooks
    after = model(ids)
    assert torch.equal(after.logits, base.logits)
    for r, r0 in zip(after.routing, base.routing, strict=True):
        assert torch.equal(r.topk_ids, r0.topk_ids) and torch.equal(r.topk_weights, r0.topk_weights)


@all_cases
def test_ablation_report(case, two_domain_data):
    model = build(case, *data_overrides(two_domain_data)).eval()
    val = ValLoader(TokenDataset(two_domain_data / "tokens", "val"), 16, 2)
    report = ablation_report(model, val, remove={1: [0, 1]}, n_random=2, seed=3, max_batches=2)
    assert report["baseline"] == evaluate(model, val, 2, "cpu")
    with intervene(model, remove={1: [0, 1]}):
        assert report["intervention"] == evaluate(model, val, 2, "cpu")
    assert report["delta"]["loss"] == report["intervention"]["loss"] - report["baseline"]["loss"] != 0
    assert len(report["random"]["runs"]) == 2
    assert all(
        sorted(run["remove"]) == ["1"] and len(run["remove"]["1"]) == 2 for run in report["random"]["runs"]
    )
    json.dumps(report)


# ----------------------------------------------------------------------------- 9. moelab new


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_new_experiment_copy_trains(arch, two_domain_data, tmp_path):
    from moelab.experiments import default_config, new_experiment
    from moelab.train.trainer import prepare_run, train

    case = OWN_CASES.get(arch, Case(arch))
    exp = new_experiment("exp", arch, default_config(arch, TESTS.parent / "configs"), tmp_path)
    assert (exp / "model.py").read_text() == Path(model_module(arch).__file__).read_text()
    own = [o for o in case.overrides if not o.startswith("model.arch=")]  # the copy is model.arch=model.py
    overrides = [
        *tiny_model_overrides(*own, *data_overrides(two_domain_data)),
        f"data.path={two_domain_data / 'tokens'}",
        "data.seq_len=16",
        "train.steps=2",
        "train.batch_size=2",
        "train.warmup_steps=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.save_every=0",
        "train.log_every=1",
        "train.device=cpu",
    ]
    config, run_dir = prepare_run(exp, overrides, tmp_path / "run", resume=False)
    train(config, run_dir, progress=False)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2]

    loaded = moelab.load(run_dir)
    registered = model_module(arch).Model.config_class
    section = loaded.config.model
    assert type(section) is type(loaded).config_class  # parsed into the copy's own class ...
    assert type(section).__name__ == registered.__name__  # ... which is the architecture's
    assert [f.name for f in dataclasses.fields(section)] == [f.name for f in dataclasses.fields(registered)]
    assert dataclasses.asdict(section) | {"arch": None} == dataclasses.asdict(config.model) | {"arch": None}
    assert (section.vocab_size, section.n_experts, section.d_model) == (320, case.n_experts, D)
    x = random_ids(1, 8, vocab=320)
    out = loaded(x)
    assert out.logits.shape == (1, 8, 320) and len(out.routing) == L


# ----------------------------------------------------------------------------- 10. parameter counts


@all_cases
def test_count_parameters(case):
    model = build(case)
    cfg = model.config.model
    by_id = {id(p): p.numel() for _, p in model.named_parameters(remove_duplicate=False)}
    total = sum(by_id.values())  # a parameter reachable under several names counts once
    if case.id == "shared-router":
        naive = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False))
        assert naive == total + E * D  # the router appears under both layers' names
    # routed experts by hand: hidden width int(r · d_expert) per equal group, 3·D·I parameters each
    if case.id == "hierarchical":
        hidden = [32 // 2] * 2 + [32 // 4] * 4  # d_expert // b^depth
    elif cfg.expert_widths:
        per_group = cfg.n_experts // len(cfg.expert_widths)
        hidden = [int(r * cfg.d_expert) for r in cfg.expert_widths for _ in range(per_group)]
    else:
        hidden = [cfg.d_expert] * cfg.n_experts
    if case.id == "olmoe-mixed-widths":
        assert hidden == [16] * 4 + [32] * 4
    sizes = [3 * cfg.d_model * width for width in hidden]
    routed = {
        id(p): p.numel()
        for name, p in model.named_parameters(remove_duplicate=False)
        if ".experts." in f".{name}"
    }
    assert sum(routed.values()) == cfg.n_layers * sum(sizes)  # the *.experts.* naming contract
    inactive = cfg.n_layers * (sum(sizes) - cfg.top_k * sum(sizes) / len(sizes))
    if case.id == "hierarchical":  # the most a token can use: 2 paths = 2 experts at each depth
        inactive = cfg.n_layers * (sum(sizes) - 3 * D * (2 * 16 + 2 * 8))
    assert model.count_parameters() == {"total": total, "active": total - round(inactive)}
