"""Routing interventions: remove experts, drop top-k ranks or force a routing, without editing the model.

`intervene(model, ...)` is a context manager. Inside it, every router that `model.routers()` lists
(the router protocol of moelab.moe.routing; any architecture) has a forward hook that replaces its
`RoutingInfo` with the intervened one; the MoE block dispatches what the hook returns, so
`out.routing` (and `out.expert_counts`) show exactly what was dispatched. A router shared by several
layers gets one hook that knows which layer each call serves (calls are counted from the start of
each model forward). On exit, also after an exception, the hooks are removed and the model is what
it was: no weight or buffer is ever written. Layers are numbered among MoE layers, as in
`out.routing`; k = top_k; rank (slot) 0 is the expert with the highest selection score.

Semantics
---------
remove={layer: [expert, ...]}
    The listed experts cannot be selected at that layer. Selection is redone by the router's own
    `select`: for TopKRouter from its selection scores (softmax probabilities with
    lflb_bias_on="scores", logits with "logits", plus the loss-free balancing bias: the same scores
    the router ranks) with the removed experts excluded, so
    each token goes to its next choices. Mixing weights stay the unbiased softmax probabilities (over
    all E experts) of the experts chosen, renormalised over the k chosen only when the router has
    norm_topk_prob, exactly as the router weighs its own choices. At least k experts must remain.
force={layer: expert}
    Every token of that layer goes to `expert` in slot 0; slots 1..k-1 keep the token's best other
    choices (same selection scores, the forced expert and any removed ones excluded). The forced
    expert's weight is its own softmax probability for that token: the weight the router would have
    given it had it chosen it. Forcing changes where a token goes, not how much the router trusts that
    expert (a weight of 1 would also rescale the layer's output). norm_topk_prob renormalises as usual.
drop_ranks=[rank, ...]
    In every MoE layer, the mixing weights of those ranks become 0 (after remove/force). The expert
    stays in `topk_ids` and is dispatched with weight 0, so it contributes nothing; load counts still
    include it. With renormalize=True the remaining weights are rescaled so that each token's weights
    sum to what all k summed to before the drop.

Layers with nothing to change keep the router's output untouched (bit-identical). `router_logits`
are never changed: they are what the router computed.

`ablation_report` measures an intervention: loss overall and per domain with and without it, and
against random ablations of the same size (`moelab ablate` prints it).
"""

from __future__ import annotations

import contextlib
import logging
import math
import operator
import re
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from moelab.errors import MoelabError, require_at_least
from moelab.models.base import model_routers
from moelab.moe.routing import RoutingInfo

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class Intervention:
    """A validated intervention: remove {layer: (experts,)}, drop_ranks (ranks,), force {layer: expert}."""

    remove: dict[int, tuple[int, ...]]
    drop_ranks: tuple[int, ...]
    renormalize: bool
    force: dict[int, int]

    def is_empty(self) -> bool:
        return not (self.remove or self.drop_ranks or self.force)

    def to_json(self) -> dict:
        return {
            "remove": {str(layer): list(experts) for layer, experts in self.remove.items()},
            "drop_ranks": list(self.drop_ranks),
            "renormalize": self.renormalize,
            "force": {str(layer): expert for layer, expert in self.force.items()},
        }


def moe_routers(model: nn.Module) -> list[nn.Module]:
    """The router of each MoE layer, in the order of `out.routing` (`model.routers()`), checked against
    the router protocol (moelab.moe.routing)."""
    try:
        routers = model_routers(model)
    except AttributeError:
        raise MoelabError(
            f"{type(model).__name__} has no routers() method; interventions need moelab's router hook point"
        ) from None
    if not routers:
        raise MoelabError(f"{type(model).__name__} has no MoE layers to intervene on")
    for r in routers:
        missing = [a for a in ("n_experts", "top_k", "select") if not hasattr(r, a)]
        if missing:
            raise MoelabError(
                f"router {type(r).__name__} lacks {', '.join(missing)}; see the router protocol in "
                f"moelab.moe.routing"
            )
    return routers


def make_intervention(
    shapes: list[tuple[int, int]],
    remove: dict[int, list[int]] | None = None,
    drop_ranks: list[int] | None = None,
    renormalize: bool = False,
    force: dict[int, int] | None = None,
    names: tuple[str, str, str] = ("remove", "drop_ranks", "force"),
) -> Intervention:
    """Check the spec against the MoE layers' (n_experts, top_k) `shapes` and normalise it.

    Problems raise a one-line MoelabError naming the argument (`names`: remove, drop_ranks, force).
    """
    remove_name, drop_name, force_name = names
    clean_remove: dict[int, tuple[int, ...]] = {}
    for layer, experts in sorted((remove or {}).items()):
        n_experts, k = _layer_shape(shapes, layer, remove_name)
        experts = sorted({int(e) for e in ([experts] if isinstance(experts, int) else experts)})
        bad = [e for e in experts if not 0 <= e < n_experts]
        if bad:
            raise MoelabError(
                f"{remove_name}: expert {bad[0]} at layer {layer} is outside 0..{n_experts - 1}"
            )
        if n_experts - len(experts) < k:
            raise MoelabError(
                f"{remove_name}: layer {layer} removes {len(experts)} of {n_experts} experts, leaving fewer "
                f"than top_k={k}; remove at most {n_experts - k}"
            )
        if experts:
            clean_remove[int(layer)] = tuple(experts)
    clean_force: dict[int, int] = {}
    for layer, expert in sorted((force or {}).items()):
        n_experts, _ = _layer_shape(shapes, layer, force_name)
        if not 0 <= int(expert) < n_experts:
            raise MoelabError(f"{force_name}: expert {expert} at layer {layer} is outside 0..{n_experts - 1}")
        if int(expert) in clean_remove.get(int(layer), ()):
            raise MoelabError(f"{force_name}: expert {expert} at layer {layer} is also removed there")
        clean_force[int(layer)] = int(expert)
    ranks = tuple(sorted({int(r) for r in drop_ranks or ()}))
    if ranks:
        k = min(top_k for _, top_k in shapes)
        if not all(0 <= r < k for r in ranks):
            raise MoelabError(f"{drop_name}: ranks must lie in 0..{k - 1} (top_k={k}), got {list(ranks)}")
        if renormalize and len(ranks) == k:
            raise MoelabError(f"{drop_name}: dropping all {k} ranks leaves nothing to renormalise")
    return Intervention(clean_remove, ranks, bool(renormalize), clean_force)


def _layer_shape(shapes: list[tuple[int, int]], layer, name: str) -> tuple[int, int]:
    try:
        index = operator.index(layer)
    except TypeError:
        index = -1
    if not 0 <= index < len(shapes):
        raise MoelabError(f"{name}: layer {layer!r} is outside the MoE layers 0..{len(shapes) - 1}")
    return shapes[index]


def _shapes(routers: list[nn.Module]) -> list[tuple[int, int]]:
    return [(r.n_experts, r.top_k) for r in routers]


# ----------------------------------------------------------------------------- rerouting


def reroute(
    router: nn.Module,
    routing: RoutingInfo,
    remove: tuple[int, ...] = (),
    force: int | None = None,
    drop_ranks: tuple[int, ...] = (),
    renormalize: bool = False,
) -> RoutingInfo:
    """The routing `router` produces under the intervention, from its own output (see module docstring)."""
    ids, weights = routing.topk_ids, routing.topk_weights  # (T, k), (T, k)
    if remove or force is not None:
        logits = routing.router_logits  # (T, E) fp32, unbiased
        exclude = torch.tensor(remove, dtype=torch.long, device=logits.device)
        ids, w = router.select(logits, exclude=exclude, force=force)
        weights = w.to(routing.topk_weights.dtype)
    if drop_ranks:
        w = weights.float()
        keep = torch.ones(w.shape[1], device=w.device)
        keep[list(drop_ranks)] = 0.0
        kept = w * keep  # (T, k)
        if renormalize:
            kept = kept * (w.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-30))
        weights = kept.to(weights.dtype)
    return RoutingInfo(routing.router_logits, ids, weights, routing.extra)


@contextlib.contextmanager
def intervene(
    model: nn.Module,
    remove: dict[int, list[int]] | None = None,
    drop_ranks: list[int] | None = None,
    renormalize: bool = False,
    force: dict[int, int] | None = None,
) -> Iterator[Intervention]:
    """Change the routing of the model's MoE layers inside the block; restore it exactly on exit.

        with intervene(model, remove={0: [3]}, drop_ranks=[1], renormalize=True):
            out = model(input_ids)   # out.routing: what was dispatched

    Yields the validated `Intervention`. Raises MoelabError for a spec the model cannot take.
    """
    routers = moe_routers(model)
    spec = make_intervention(_shapes(routers), remove, drop_ranks, renormalize, force)
    layers_of: dict[int, list[int]] = {}  # router module -> the MoE layers it serves, in call order
    for layer, router in enumerate(routers):
        layers_of.setdefault(id(router), []).append(layer)
    calls = dict.fromkeys(layers_of, 0)

    def reset_calls(module, args, kwargs):
        for key in calls:
            calls[key] = 0

    def hook(module, inputs, output):
        layers = layers_of[id(module)]
        layer = layers[calls[id(module)] % len(layers)]
        calls[id(module)] += 1
        removed, forced = spec.remove.get(layer, ()), spec.force.get(layer)
        if not (removed or forced is not None or spec.drop_ranks):
            return None  # this layer keeps the router's output untouched
        return reroute(module, output, removed, forced, spec.drop_ranks, spec.renormalize)

    handles = [model.register_forward_pre_hook(reset_calls, with_kwargs=True)]
    try:
        for layer, router in enumerate(routers):
            if layers_of[id(router)][0] != layer:
                continue  # a shared router is hooked once
            if any(spec.remove.get(i) or i in spec.force for i in layers_of[id(router)]) or spec.drop_ranks:
                handles.append(router.register_forward_hook(hook))
        yield spec
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- measuring


def random_like(
    shapes: list[tuple[int, int]], spec: Intervention, generator: torch.Generator
) -> Intervention:
    """The same intervention with its experts drawn at random: as many removed experts at the same
    layers (any expert may be drawn, the requested ones included) and a random forced expert at the
    same layers (never one removed there). drop_ranks/renormalize are kept as they are."""
    remove, force = {}, {}
    for layer in sorted(set(spec.remove) | set(spec.force)):
        perm = torch.randperm(shapes[layer][0], generator=generator).tolist()
        n = len(spec.remove.get(layer, ()))
        if n:
            remove[layer] = tuple(sorted(perm[:n]))
        if layer in spec.force:
            force[layer] = perm[n]
    return Intervention(remove, spec.drop_ranks, spec.renormalize, force)


def ablation_report(
    model: nn.Module,
    val,
    remove: dict[int, list[int]] | None = None,
    drop_ranks: list[int] | None = None,
    renormalize: bool = False,
    force: dict[int, int] | None = None,
    n_random: int = 3,
    seed: int = 0,
    max_batches: int = 20,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict:
    """Loss overall and per domain: baseline, the intervention, and `n_random` random ablations.

    val: a `moelab.train.evaluate.ValLoader` (every evaluation sees the same batches). Returns
    {"baseline": evaluate(...), "intervention": evaluate(...),
     "delta": {"loss": intervention - baseline, "domain_loss": {domain: ...}},
     "random": {"mean_delta", "std_delta", "domain_mean_delta", "domain_std_delta", "z",
                "runs": [{"remove", "force", "delta", "domain_delta", "result": evaluate(...)}, ...]}
               or None, "random_note": what the random runs are, or why there are none,
     "spec": {intervention, "n_random", "seed", "max_batches"}}.
    Random runs draw their experts with torch.Generator().manual_seed(seed) (see `random_like`); std is
    the sample standard deviation (None below 2 runs); z = (delta - mean_delta) / std_delta, or None
    when std_delta < ZERO_STD (the random runs agree to the printed precision: a z-score would only
    divide by rounding noise).
    """
    from moelab.train.evaluate import evaluate

    if n_random < 0 or max_batches < 0:
        raise MoelabError(f"n_random={n_random} and max_batches={max_batches} must be >= 0")
    shapes = _shapes(moe_routers(model))
    spec = make_intervention(shapes, remove, drop_ranks, renormalize, force)
    if spec.is_empty():
        raise MoelabError("nothing to ablate: give experts to remove, ranks to drop or experts to force")
    device = device if device is not None else next(model.parameters()).device
    randomisable = bool(spec.remove or spec.force)
    if n_random and randomisable:
        generator = torch.Generator().manual_seed(seed)
        random_specs = [random_like(shapes, spec, generator) for _ in range(n_random)]
    else:
        random_specs = []

    def run(s: Intervention | None) -> dict:
        if s is None:
            return evaluate(model, val, max_batches, device)
        with intervene(model, s.remove, s.drop_ranks, s.renormalize, s.force):
            return evaluate(model, val, max_batches, device)

    bar = _progress(2 + len(random_specs), progress)
    baseline = run(None)
    bar.update()
    result = run(spec)
    bar.update()
    runs = []
    for s in random_specs:
        r = run(s)
        bar.update()
        d = _delta(baseline, r)
        json_spec = s.to_json()
        runs.append(
            {
                "remove": json_spec["remove"],
                "force": json_spec["force"],
                "delta": d["loss"],
                "domain_delta": d["domain_loss"],
                "result": r,
            }
        )
    bar.close()

    delta = _delta(baseline, result)
    if random_specs:
        deltas = [r["delta"] for r in runs]
        domains = delta["domain_loss"].keys()
        mean, std = _mean_std(deltas)
        stats = {d: _mean_std([r["domain_delta"][d] for r in runs]) for d in domains}
        random = {
            "mean_delta": mean,
            "std_delta": std,
            "domain_mean_delta": {d: m for d, (m, _) in stats.items()},
            "domain_std_delta": {d: s for d, (_, s) in stats.items()},
            "z": (delta["loss"] - mean) / std if std is not None and std >= ZERO_STD else None,
            "runs": runs,
        }
        what = []
        if spec.remove:
            what.append("removes as many random experts at the same layers (drawn from all experts)")
        if spec.force:
            what.append("forces a random expert at the same layers")
        if spec.drop_ranks:
            what.append("drops the same ranks")
        note = "each run " + ", ".join(what)
    else:
        random = None
        note = (
            "no random runs requested"
            if not n_random
            else "drop_ranks picks ranks, not experts: no random counterpart of the same size"
        )
    return {
        "baseline": baseline,
        "intervention": result,
        "delta": delta,
        "random": random,
        "random_note": note,
        "spec": {**spec.to_json(), "n_random": len(random_specs), "seed": seed, "max_batches": max_batches},
    }


ZERO_STD = 5e-5  # nats; a std below this prints as 0.0000 and is taken as zero (no z-score)


def _delta(base: dict, other: dict) -> dict:
    """other - base: loss and per-domain loss (domains present in both)."""
    base_dom, other_dom = base.get("domain_loss", {}), other.get("domain_loss", {})
    return {
        "loss": other["loss"] - base["loss"],
        "domain_loss": {d: other_dom[d] - v for d, v in base_dom.items() if d in other_dom},
    }


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="ablate", unit="eval", disable=not enabled, leave=False)


# ----------------------------------------------------------------------------- CLI

_PAIR = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")


def parse_pairs(text: str, flag: str, n_layers: int, n_experts: int) -> list[tuple[int, int]]:
    """'0:3,0:4,2:1' -> [(0, 3), (0, 4), (2, 1)], checked against the model's ranges."""
    pairs = []
    for item in text.split(","):
        match = _PAIR.match(item)
        if not match:
            raise MoelabError(f"{flag}: {item.strip()!r} is not LAYER:EXPERT (e.g. {flag} 0:3,2:1)")
        layer, expert = int(match[1]), int(match[2])
        if not 0 <= layer < n_layers:
            raise MoelabError(f"{flag}: layer {layer} in {item.strip()!r} is outside 0..{n_layers - 1}")
        if not 0 <= expert < n_experts:
            raise MoelabError(f"{flag}: expert {expert} in {item.strip()!r} is outside 0..{n_experts - 1}")
        pairs.append((layer, expert))
    return pairs


def parse_ranks(text: str, top_k: int) -> list[int]:
    try:
        ranks = [int(r) for r in text.split(",")]
    except ValueError:
        raise MoelabError(
            f"--drop-ranks: {text!r} is not a comma-separated list of ranks (e.g. 1,2)"
        ) from None
    bad = [r for r in ranks if not 0 <= r < top_k]
    if bad:
        raise MoelabError(f"--drop-ranks: rank {bad[0]} is outside 0..{top_k - 1} (top_k={top_k})")
    return ranks


def parse_args_spec(args, n_layers: int, n_experts: int, top_k: int) -> dict:
    """The intervention keyword arguments from the CLI flags."""
    remove: dict[int, list[int]] = {}
    for layer, expert in parse_pairs(args.experts, "--experts", n_layers, n_experts) if args.experts else ():
        remove.setdefault(layer, []).append(expert)
    force: dict[int, int] = {}
    for layer, expert in parse_pairs(args.force, "--force", n_layers, n_experts) if args.force else ():
        if force.get(layer, expert) != expert:
            raise MoelabError(
                f"--force: layer {layer} is forced to both {force[layer]} and {expert}; pick one"
            )
        force[layer] = expert
    drop_ranks = parse_ranks(args.drop_ranks, top_k) if args.drop_ranks else []
    if args.renormalize and not drop_ranks:
        raise MoelabError("--renormalize needs --drop-ranks")
    if not (remove or force or drop_ranks):
        raise MoelabError("nothing to ablate: pass --experts L:E,..., --drop-ranks R,... or --force L:E,...")
    kwargs = {"remove": remove, "drop_ranks": drop_ranks, "renormalize": args.renormalize, "force": force}
    make_intervention([(n_experts, top_k)] * n_layers, **kwargs, names=_FLAGS)
    return kwargs


_FLAGS = ("--experts", "--drop-ranks", "--force")


def cmd_ablate(args) -> None:
    import json

    from moelab.checkpoint import CONFIG, resolve_checkpoint
    from moelab.cli import show_progress
    from moelab.config import load_config
    from moelab.convert import refuse_hf_folder
    from moelab.train.evaluate import open_evaluation

    require_at_least(
        ("--random-baselines", args.random_baselines, 0),
        ("--batches", args.batches, 0),
        ("--batch-size", args.batch_size, 1),
    )
    refuse_hf_folder(args.checkpoint, "ablate")
    ckpt = resolve_checkpoint(args.checkpoint)
    if not (ckpt / CONFIG).is_file():
        raise MoelabError(f"checkpoint {ckpt} has no {CONFIG}")
    mc = load_config(ckpt / CONFIG).model
    kwargs = parse_args_spec(args, mc.n_layers, mc.n_experts, mc.top_k)  # flags checked before loading
    ckpt, model, val, device = open_evaluation(ckpt, args.data, args.split, args.batch_size)
    make_intervention(_shapes(moe_routers(model)), **kwargs, names=_FLAGS)
    report = ablation_report(
        model,
        val,
        **kwargs,
        n_random=args.random_baselines,
        seed=args.seed,
        max_batches=args.batches,
        device=device,
        progress=show_progress(args),
    )
    report["spec"].update(checkpoint=str(ckpt), data=str(args.data), split=args.split)
    if args.json:
        print(json.dumps(report))
    else:
        print(format_report(report))


def format_report(report: dict) -> str:
    """A readable table: overall and per domain, baseline | intervention | Δ | random Δ mean ± std."""
    spec = report["spec"]
    parts = []
    if spec["remove"]:
        parts.append(
            "remove " + " ".join(f"L{l}:{{{','.join(map(str, e))}}}" for l, e in spec["remove"].items())
        )
    if spec["drop_ranks"]:
        norm = " (renormalised)" if spec["renormalize"] else ""
        parts.append(f"drop ranks {','.join(map(str, spec['drop_ranks']))}{norm}")
    if spec["force"]:
        parts.append("force " + " ".join(f"L{l}→E{e}" for l, e in spec["force"].items()))
    base, inter, delta, rand = report["baseline"], report["intervention"], report["delta"], report["random"]
    lines = [
        f"checkpoint {spec.get('checkpoint', '?')}  data {spec.get('data', '?')}:{spec.get('split', '?')}"
        f"  tokens {base['tokens']:,}",
        "intervention: " + "; ".join(parts),
    ]
    if rand is not None:
        lines.append(
            f"random baseline: {spec['n_random']} runs (seed {spec['seed']}): {report['random_note']}"
        )
    else:
        lines.append(f"random baseline: none ({report['random_note']})")
    rand_head = f"random Δ (n={spec['n_random']})" if rand is not None else ""
    lines += ["", f"{'loss':<16}{'baseline':>10}{'intervention':>14}{'Δ':>10}   {rand_head}".rstrip()]

    def row(name, b, i, d, m, s):
        r = ""
        if m is not None:
            r = f"{m:+.4f}" + (f" ± {s:.4f}" if s is not None else "")
        return f"{name:<16}{b:>10.4f}{i:>14.4f}{d:>+10.4f}   {r}".rstrip()

    m, s = (rand["mean_delta"], rand["std_delta"]) if rand else (None, None)
    lines.append(row("all", base["loss"], inter["loss"], delta["loss"], m, s))
    for name, d in delta["domain_loss"].items():
        m, s = (rand["domain_mean_delta"][name], rand["domain_std_delta"][name]) if rand else (None, None)
        lines.append(row("  " + name, base["domain_loss"][name], inter["domain_loss"][name], d, m, s))
    if rand is not None and rand["std_delta"] is not None and rand["std_delta"] < ZERO_STD:
        lines.append(
            f"\nthe random ablations' std is zero (all {spec['n_random']} changed the loss by "
            f"{rand['mean_delta']:+.4f}), so Δ is not expressed in standard deviations; it differs from "
            f"their mean by {delta['loss'] - rand['mean_delta']:+.4f}"
        )
    elif rand is not None and rand["z"] is not None and math.isfinite(rand["z"]):
        lines.append(f"\nΔ is {rand['z']:+.1f} standard deviations from the random ablations' mean")
    return "\n".join(lines)
