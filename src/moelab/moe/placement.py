"""Expert placement in one process: each routed expert's weights live whole on a device of their own.

`parallel.expert_devices: [d_0, ..., d_{P-1}]` is cycled over the E routed experts of every
RoutedExperts: expert e lives on entry e mod P (so [cuda:0, cuda:1] puts even experts on cuda:0 and odd
ones on cuda:1; E entries give one expert each). P must divide E, so every entry holds E/P experts,
and with mixed widths (width groups in order) each entry gets a share of every width. Entries are
placement slots, not unique devices: ["cpu", "cpu"] makes two slots on one device, which runs every
grouping and transfer step of the multi-device path (the tests rely on it). Dense layers, attention,
routers and shared experts stay on the primary device (where the model is).

Parameters. The stacked width-group tensors (gate_up (n, D, 2I), down (n, I, D), and the learned
output-norm weight (E, D)) cannot span devices, so `place_experts` splits them: slot s becomes the
child `experts.shards.{s}`, an `ExpertShard` holding the rows of its own experts under the original
parameter names (`shards.0.gate_up`, `shards.1.down_1`, `shards.0.output_norm.weight`), and the stacked
parameters are removed. Names stay inside `.experts.` and keep their last part, so optimizer groups,
clipping and no-decay rules treat them as before. The checkpoint format does not change: a state_dict
hook writes the original stacked names (merged on the primary device, expert order), and a load
pre-hook splits stacked tensors onto the slots' devices, so `moelab.load`, save/resume and HF
conversion see an unplaced model, and placed and unplaced models load each other's checkpoints.

Running. `PlacementDispatcher(kernel)` sorts the (token, slot) pairs by placement slot (one host sync
per layer: the pair count of each slot), sends each slot its rows, local expert ids and mixing
weights, runs them there with the local loop | sorted | grouped kernel (moe/dispatch.py), and adds the
results back on the primary device. A CUDA slot off the primary device runs on its device's own
stream, which first waits for the primary stream (its inputs) and which the primary stream waits for
before using the results; autograd replays the same streams in backward. Gradients reach x, the mixing
weights and every expert weight through the device copies, exactly as in the local path.

Place after moving the model to its device (`parallelize` does, first of its steps): a later
`model.to(...)` would gather every slot onto one device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from moelab.errors import ConfigError
from moelab.moe.dispatch import PATHS, ExpertGroup, run_expert_groups
from moelab.moe.experts import ExpertOutputNorm, RoutedExperts

__all__ = ["ExpertShard", "PlacedExperts", "PlacementDispatcher", "parse_devices", "place_experts"]


def parse_devices(devices: Sequence[str], check_available: bool = False) -> list[torch.device]:
    """`parallel.expert_devices` as torch devices (cpu or cuda[:i]); ConfigError on a bad entry."""
    parsed = []
    for d in devices:
        try:
            dev = torch.device(d)
        except (RuntimeError, TypeError):
            raise ConfigError(
                f"parallel.expert_devices: {d!r} is not a device (write cpu, cuda:0, ...)"
            ) from None
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(
                f"parallel.expert_devices: {d!r} is a {dev.type} device; only cpu and cuda are supported"
            )
        if dev.type == "cuda":
            dev = torch.device("cuda", 0 if dev.index is None else dev.index)
            if check_available and dev.index >= torch.cuda.device_count():
                n = torch.cuda.device_count()
                raise ConfigError(f"parallel.expert_devices: {d!r} is not available ({n} CUDA devices here)")
        parsed.append(dev)
    return parsed


def slot_of_experts(n_experts: int, n_slots: int) -> list[int]:
    """Placement slot of each expert: e mod P (P must divide E)."""
    if n_slots > n_experts or n_experts % n_slots:
        raise ConfigError(
            f"parallel.expert_devices has {n_slots} entries for {n_experts} routed experts; give a number "
            f"of entries that divides {n_experts} (it is cycled over the experts)"
        )
    return [e % n_slots for e in range(n_experts)]


class ExpertShard(nn.Module):
    """The experts of one placement slot, all on `device`: per width group the rows of its experts
    under the group's original names, and, with a learned output norm, their rows of its weight."""

    def __init__(self, device: torch.device, experts: list[int]):
        super().__init__()
        self.device = device
        self.experts = experts  # global ids, increasing; local id = position in this list
        self.group_names: list[tuple[int, str, str]] = []  # (first local id, gate_up name, down name)
        self.rows: dict[str, list[int]] = {}  # stacked name -> global id of each of its rows here
        self.output_norm: ExpertOutputNorm | None = None

    def groups(self) -> list[ExpertGroup]:
        return [
            ExpertGroup(first, getattr(self, gu), getattr(self, dn)) for first, gu, dn in self.group_names
        ]

    def extra_repr(self) -> str:
        return f"device={self.device}, experts={self.experts}"


class PlacedExperts(RoutedExperts):
    """A RoutedExperts whose experts live in `shards` (its class is swapped in place by `place_experts`;
    the stacked parameters are gone, their names survive in the state dict)."""

    shards: nn.ModuleList
    primary: torch.device
    norm_learned: bool

    def groups(self) -> list[ExpertGroup]:
        """The full width groups gathered on the primary device (differentiable copies), for code that
        reads the weights; the dispatcher uses each shard's own groups."""
        full = gather_stacked(self)
        return [ExpertGroup(first, full[gu], full[dn]) for first, gu, dn in self.group_names]

    def expert_sizes(self) -> list[int]:
        d_model = self.shards[0].groups()[0].gate_up.shape[1]
        return [3 * d_model * width + (d_model if self.norm_learned else 0) for width in self.hidden]

    def route_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(E,) slot and (E,) local id of each expert, long tensors on `device` (built once per device)."""
        cache = self.__dict__.setdefault("_route_tables", {})
        if device not in cache:
            slot = torch.empty(self.n_experts, dtype=torch.long)
            local = torch.empty(self.n_experts, dtype=torch.long)
            for s, shard in enumerate(self.shards):
                slot[shard.experts] = s
                local[shard.experts] = torch.arange(len(shard.experts))
            cache[device] = (slot.to(device), local.to(device))
        return cache[device]


def _stacked_parts(module: PlacedExperts):
    """(stacked name, first expert, [(shard, name in the shard, global ids of its rows)]) per stacked
    tensor, the learned output-norm weight included."""
    for first, gu, dn in module.group_names:
        for name in (gu, dn):
            yield name, first, [(sh, name, sh.rows[gu]) for sh in module.shards if gu in sh.rows]
    if module.norm_learned:
        yield "output_norm.weight", 0, [(sh, "output_norm.weight", sh.experts) for sh in module.shards]


def gather_stacked(module: PlacedExperts) -> dict[str, torch.Tensor]:
    """Stacked name -> the full tensor on the primary device, rows in expert order (differentiable)."""
    full = {}
    for name, first, parts in _stacked_parts(module):
        rows = torch.cat([sh.get_parameter(n).to(module.primary) for sh, n, _ in parts])
        ids = torch.tensor([e - first for _, _, r in parts for e in r], device=module.primary)
        full[name] = rows[torch.argsort(ids)]  # rows back in expert order
    return full


def _state_dict_hook(module: PlacedExperts, state_dict, prefix, local_metadata) -> None:
    """Write the stacked names an unplaced model has, instead of the shards' own."""
    for name, tensor in gather_stacked(module).items():
        state_dict[prefix + name] = tensor.detach()
    for key in [k for k in state_dict if k.startswith(prefix + "shards.")]:
        del state_dict[key]


def _load_pre_hook(module: PlacedExperts, state_dict, prefix, *args) -> None:
    """Split stacked tensors of a checkpoint into the shards' rows, each on its slot's device (so
    `load_state_dict(assign=True)` also puts them there)."""
    for name, first, parts in _stacked_parts(module):
        full = state_dict.pop(prefix + name, None)
        if full is None:
            continue  # missing: strict loading reports the shard keys
        for sh, n, rows in parts:
            shard_index = list(module.shards).index(sh)
            idx = torch.tensor([e - first for e in rows], device=full.device)
            state_dict[f"{prefix}shards.{shard_index}.{n}"] = full[idx].to(sh.device)


def place_experts(model: nn.Module, devices: Sequence[str]) -> int:
    """Move each routed expert's weights to its device (see the module docstring); returns how many
    RoutedExperts were placed (0 when `devices` is empty). The dispatcher is set to
    PlacementDispatcher with the kernel of the dispatcher the experts had."""
    if not devices:
        return 0
    slots = parse_devices(devices, check_available=True)
    modules = [m for m in model.modules() if isinstance(m, RoutedExperts)]
    for module in modules:
        if isinstance(module, PlacedExperts):
            raise ConfigError("parallel.expert_devices: these experts are placed already")
        _place(module, slots)
    return len(modules)


@torch.no_grad()
def _place(module: RoutedExperts, slots: list[torch.device]) -> None:
    owner = slot_of_experts(module.n_experts, len(slots))
    primary = getattr(module, module.group_names[0][1]).device
    shards = [
        ExpertShard(dev, [e for e in range(module.n_experts) if owner[e] == s]) for s, dev in enumerate(slots)
    ]
    for first, gu, dn in module.group_names:
        stacked = {gu: getattr(module, gu), dn: getattr(module, dn)}  # (n, D, 2I), (n, I, D)
        for shard in shards:
            mine = [e for e in shard.experts if first <= e < first + stacked[gu].shape[0]]
            if not mine:
                continue
            shard.rows[gu] = mine
            shard.group_names.append((shard.experts.index(mine[0]), gu, dn))
            idx = torch.tensor([e - first for e in mine], device=primary)
            for name, weight in stacked.items():
                rows = weight[idx].to(shard.device)  # (n_s, ...) the rows of this slot's experts
                shard.register_parameter(name, nn.Parameter(rows, requires_grad=weight.requires_grad))
        delattr(module, gu)
        delattr(module, dn)
    norm = module.output_norm
    learned = norm is not None and norm.weight is not None
    for shard in shards:
        if norm is not None:
            shard.output_norm = ExpertOutputNorm(len(shard.experts), 1, norm.eps, learned=False)
            if learned:
                idx = torch.tensor(shard.experts, device=norm.weight.device)
                shard.output_norm.weight = nn.Parameter(norm.weight[idx].to(shard.device))  # (E_s, D)
    if learned:
        norm.weight = None  # its rows live in the shards now
    kernel = getattr(module.dispatcher, "kernel", "grouped")
    module.__class__ = PlacedExperts
    module.shards = nn.ModuleList(shards)
    module.primary, module.norm_learned = primary, learned
    module.register_state_dict_post_hook(_state_dict_hook)
    module.register_load_state_dict_pre_hook(_load_pre_hook)
    module.dispatcher = PlacementDispatcher(kernel)


class PlacementDispatcher:
    """Runs each placement slot's experts on its device with a local kernel (see the module docstring)."""

    def __init__(self, kernel: str = "grouped"):
        if kernel not in PATHS:
            raise ValueError(f"unknown dispatch kernel {kernel!r}; choose one of {', '.join(PATHS)}")
        self.kernel = kernel
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def __repr__(self) -> str:
        return f"PlacementDispatcher({self.kernel!r})"

    def _stream(self, device: torch.device, primary: torch.device):
        """The side stream of a CUDA slot off the primary device; None where the current stream serves."""
        if device.type != "cuda" or device == primary:
            return None
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def __call__(self, experts: PlacedExperts, x, topk_ids, topk_weights, per_slot: bool = False):
        if not isinstance(experts, PlacedExperts):
            raise TypeError("PlacementDispatcher runs experts placed by moelab.moe.placement.place_experts")
        T, k = topk_ids.shape
        primary, n_slots = x.device, len(experts.shards)
        dtype = torch.get_autocast_dtype(primary.type) if torch.is_autocast_enabled(primary.type) else x.dtype
        slot_of, local_of = experts.route_tables(primary)
        flat = topk_ids.reshape(-1)  # (T·k,)
        none = flat < 0
        slot = slot_of[flat.clamp(min=0)].masked_fill(
            none, n_slots
        )  # (T·k,) slot of each pair; P = no expert
        local = local_of[flat.clamp(min=0)]  # (T·k,) expert id inside its slot
        order = torch.argsort(slot, stable=True)  # (T·k,) pairs grouped by slot
        counts = torch.bincount(slot, minlength=n_slots + 1).tolist()  # one host sync per layer
        pair_chunks = torch.split(order, counts)[:n_slots]
        w_flat = topk_weights.reshape(-1)  # (T·k,)
        main = torch.cuda.current_stream(primary) if primary.type == "cuda" else None
        results = []  # (pairs (n_s,), out rows (n_s, D), y rows (n_s, D) or None), on the primary device
        for shard, pairs in zip(experts.shards, pair_chunks):
            if pairs.numel() == 0:
                continue
            rows, ids, w = (
                x[pairs // k],
                local[pairs, None],
                w_flat[pairs, None],
            )  # (n_s, D), (n_s, 1), (n_s, 1)
            stream = self._stream(shard.device, primary)
            if stream is None:
                res = self._run(shard, rows, ids, w, per_slot)
            else:
                stream.wait_stream(main)  # the slot's inputs are written on the primary stream
                with torch.cuda.stream(stream):
                    res = self._run(shard, rows, ids, w, per_slot)
            results.append((pairs, *res))
        if main is not None:
            for shard in experts.shards:
                stream = self._stream(shard.device, primary)
                if stream is not None:
                    main.wait_stream(stream)  # results are ready before the primary stream reads them
        out = x.new_zeros(T, x.shape[1], dtype=dtype)  # (T, D)
        if not results:
            return (out, x.new_zeros(T, k, x.shape[1], dtype=dtype)) if per_slot else out
        pairs = torch.cat([r[0] for r in results])  # (n, ) pair index of each result row
        out = out.index_add(0, pairs // k, torch.cat([r[1] for r in results]))
        if not per_slot:
            return out
        y = x.new_zeros(T * k, x.shape[1], dtype=dtype).index_copy(
            0, pairs, torch.cat([r[2] for r in results])
        )
        return out, y.view(T, k, -1)  # (T, k, D); 0 for id -1

    def _run(self, shard: ExpertShard, rows, ids, w, per_slot):
        """One slot on its device, each pair a one-slot token; results come back to the primary device.
        Copies between two CUDA devices are ordered by torch with both devices' current streams."""
        primary, dev = rows.device, shard.device
        res = run_expert_groups(
            rows.to(dev), ids.to(dev), w.to(dev), shard.groups(), self.kernel, shard.output_norm, per_slot
        )
        out, y = res if per_slot else (res, None)  # (n_s, D), (n_s, 1, D)
        return out.to(primary), (y[:, 0].to(primary) if per_slot else None)
