"""Forward + backward speed of ONE MoE layer: moelab's dispatch paths against transformers' OLMoE block.

Every implementation runs on the same weights and the same input. Before any timing, all of them must
agree with transformers' per-expert loop on the output and on every gradient (fp32, atol 1e-4), and a
counter on torch.nn.functional.grouped_mm proves which ones really ran grouped_mm (a silent fallback
would otherwise be timed under the wrong name).

  moelab loop | sorted | grouped   moelab.models.olmoe.MoE (TopKRouter + RoutedExperts with a LocalDispatcher)
  transformers eager               OlmoeSparseMoeBlock with experts_implementation="eager" (its loop)
  transformers grouped_mm          the same block with experts_implementation="grouped_mm"

transformers' default is read at run time from a freshly built OlmoeForCausalLM (5.x picks grouped_mm);
the ratio column is the speed-up against that default (> 1 = faster). Iterations of all implementations
are interleaved, so a slow phase of a noisy machine hits them alike; the median of --repeats is kept.

    python benchmarks/moe_layer.py                               # both shapes, fp32, CPU
    python benchmarks/moe_layer.py --device cuda --dtype bf16 --repeats 20 --warmup 5
    python benchmarks/moe_layer.py --quick --out /tmp/moe.md     # smoke run (seconds): small shape only
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from common import GroupedMMCounter, machine, sync, update_doc  # noqa: E402

from moelab.config import ModelConfig, MoEConfig  # noqa: E402
from moelab.models.olmoe import MoE  # noqa: E402
from moelab.moe.experts import LocalDispatcher, set_dispatcher  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    n_experts: int  # E
    top_k: int  # k
    d_model: int  # D
    d_expert: int  # I
    tokens: int  # T


SHAPES = {
    "small": Shape("small", 8, 2, 128, 256, 2048),
    "olmoe": Shape("olmoe", 64, 8, 512, 256, 4096),  # OLMoE's routing (64 experts, top-8), narrower
}
QUICK_TOKEN_DIVISOR = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MOELAB_PATHS = ("loop", "sorted", "grouped")
HF_IMPLS = ("eager", "grouped_mm")
SECTION_HEADING = "## MoE layer: forward + backward"
SECTION_INTRO = """\
`benchmarks/moe_layer.py` times one MoE layer (router + routed experts, forward and backward with a
random output gradient) for each moelab dispatch path against transformers' `OlmoeSparseMoeBlock` on
the same weights, with its per-expert loop (`eager`) and its `grouped_mm` experts implementation. All
implementations must first agree with transformers' loop on the output and on every gradient (fp32,
atol 1e-4), and a counter on `torch.nn.functional.grouped_mm` confirms that the grouped_mm rows really
ran grouped_mm. `× default` is the speed-up against transformers' default experts implementation
(> 1 is faster). Shapes: `small` E=8, k=2, D=128, I=256, 2048 tokens; `olmoe` E=64, k=8, D=512,
I=256, 4096 tokens (OLMoE-1B-7B's routing, narrower matrices).
"""
DOC_INTRO = """\
# Benchmarks

Speed and memory comparisons live in `benchmarks/`, never in timed unit tests. Each script runs the
implementations it compares side by side in one process, checks that they compute the same thing
before timing them, and reports ratios as well as absolute numbers: the machines these run on are
shared and noisy, so absolute times drift between runs while ratios measured together hold. Timings
are the median of N iterations after warm-up (N is given with each result, with the machine, the
software versions, the date and the exact command). Each benchmark owns one section below and
rewrites only its own results block in it.
"""


# ----------------------------------------------------------------------------- building the layers


def build_layers(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """moelab's MoE block and transformers' OlmoeSparseMoeBlock holding the same weights."""
    from transformers import OlmoeConfig
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    g = torch.Generator().manual_seed(seed)
    E, k, D, I = shape.n_experts, shape.top_k, shape.d_model, shape.d_expert
    # unit-scale activations: outputs are O(1), so atol 1e-4 is a real check
    router = torch.randn(E, D, generator=g) / D**0.5  # (E, D)
    gate_up = torch.randn(E, D, 2 * I, generator=g) / D**0.5  # (E, D, 2I) = [gate | up]
    down = torch.randn(E, I, D, generator=g) / I**0.5  # (E, I, D)

    cfg = ModelConfig(d_model=D, n_experts=E, top_k=k, d_expert=I, norm_topk_prob=False)
    ours = MoE(cfg, MoEConfig(dispatch="grouped"))
    with torch.no_grad():
        ours.router.weight.copy_(router)
        ours.experts.gate_up.copy_(gate_up)
        ours.experts.down.copy_(down)

    hf_cfg = OlmoeConfig(
        hidden_size=D,
        intermediate_size=I,
        num_experts=E,
        num_experts_per_tok=k,
        norm_topk_prob=False,
        hidden_act="silu",
    )
    theirs = OlmoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        theirs.gate.weight.copy_(router)
        theirs.experts.gate_up_proj.copy_(gate_up.transpose(1, 2))  # (E, 2I, D)
        theirs.experts.down_proj.copy_(down.transpose(1, 2))  # (E, D, I)
    return ours.to(device, dtype), theirs.to(device, dtype)


def transformers_default_experts() -> str:
    """The experts implementation transformers picks for an OlmoeForCausalLM built without asking."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    tiny = OlmoeConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_experts=2,
        num_experts_per_tok=1,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=1,
    )
    return OlmoeForCausalLM(tiny).config._experts_implementation or "eager"


@dataclass
class Impl:
    name: str
    module: torch.nn.Module
    setting: str  # moelab dispatch path or transformers experts implementation
    uses_grouped_mm: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (T, D) -> (T, D)
        if isinstance(self.module, MoE):
            set_dispatcher(self.module, LocalDispatcher(self.setting))
            y, _ = self.module(x[None])
            return y[0]
        self.module.experts.config._experts_implementation = self.setting
        return self.module(x[None])[0]


def implementations(ours, theirs) -> list[Impl]:
    impls = [Impl(f"moelab {p}", ours, p, p == "grouped") for p in MOELAB_PATHS]
    impls += [Impl(f"transformers {h}", theirs, h, h == "grouped_mm") for h in HF_IMPLS]
    return impls


# ----------------------------------------------------------------------------- checking, then timing


def step(impl: Impl, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """One forward + backward; returns the output (detached)."""
    for p in impl.module.parameters():
        p.grad = None
    x.grad = None
    y = impl.forward(x)
    y.backward(grad_out)
    return y.detach()


def grads(impl: Impl, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients in moelab's layout: x (T, D), router (E, D), gate_up (E, D, 2I), down (E, I, D)."""
    m = impl.module
    if isinstance(m, MoE):
        return {"x": x.grad, "router": m.router.weight.grad, "gate_up": m.experts.gate_up.grad,
                "down": m.experts.down.grad}  # fmt: skip
    return {"x": x.grad, "router": m.gate.weight.grad, "gate_up": m.experts.gate_up_proj.grad.transpose(1, 2),
            "down": m.experts.down_proj.grad.transpose(1, 2)}  # fmt: skip


def check_agreement(impls: list[Impl], x, grad_out, atol: float, rtol: float) -> dict[str, float]:
    """Every implementation against transformers' loop: output and gradients; grouped_mm really used."""
    ref_impl = next(i for i in impls if i.name == "transformers eager")
    results = {}
    for impl in [ref_impl] + [i for i in impls if i is not ref_impl]:
        with GroupedMMCounter() as counter:
            y = step(impl, x, grad_out)
        # grouped_mm on CUDA runs only in bf16: an fp32 agreement check there uses the fallbacks
        counted = x.device.type == "cpu" or x.dtype == torch.bfloat16
        if counted and impl.uses_grouped_mm != (counter.calls > 0):
            raise AssertionError(
                f"{impl.name}: grouped_mm called {counter.calls} times; expected the opposite"
            )
        got = {"y": y, **{k: v.detach().clone() for k, v in grads(impl, x).items()}}
        if impl is ref_impl:
            ref = got
            continue
        for key in ref:
            torch.testing.assert_close(
                got[key].float(),
                ref[key].float(),
                atol=atol,
                rtol=rtol,
                msg=lambda m, i=impl, k=key: f"{i.name} {k}: {m}",
            )
        results[impl.name] = (got["y"].float() - ref["y"].float()).abs().max().item()
    return results


def time_impls(impls: list[Impl], x, grad_out, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per forward + backward, iterations interleaved across implementations."""
    for _ in range(warmup):
        for impl in impls:
            step(impl, x, grad_out)
    times = {impl.name: [] for impl in impls}
    for _ in range(repeats):
        for impl in impls:
            sync(x.device)
            t0 = time.perf_counter()
            step(impl, x, grad_out)
            sync(x.device)
            times[impl.name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- the run


@dataclass
class Row:
    impl: str
    shape: str
    tokens: int
    seconds: float
    ratio: float  # speed-up against transformers' default


def run_shape(shape: Shape, dtype, device, repeats: int, warmup: int, default_impl: str):
    """Rows of timings, and the largest |Δ output| of each implementation against transformers' loop."""
    # the agreement check runs in fp32 (atol 1e-4); a bf16 run is checked again at bf16 tolerance
    ours, theirs = build_layers(shape, torch.float32, device)
    x, grad_out = make_inputs(shape, torch.float32, device)
    diffs = check_agreement(implementations(ours, theirs), x, grad_out, atol=1e-4, rtol=1e-4)
    if dtype != torch.float32:
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        x, grad_out = make_inputs(shape, dtype, device)
        diffs = check_agreement(implementations(ours, theirs), x, grad_out, atol=5e-2, rtol=5e-2)
    impls = implementations(ours, theirs)
    medians = time_impls(impls, x, grad_out, repeats, warmup)
    base = medians[f"transformers {default_impl}"]
    return [Row(name, shape.name, shape.tokens, s, base / s) for name, s in medians.items()], diffs


def make_inputs(shape: Shape, dtype, device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape.tokens, shape.d_model, generator=g).to(device, dtype).requires_grad_()  # (T, D)
    grad_out = torch.randn(shape.tokens, shape.d_model, generator=g).to(device, dtype)  # (T, D)
    return x, grad_out


def table(rows: list[Row], default_impl: str) -> str:
    lines = [
        f"| implementation | shape | ms/iter | tokens/s | × default ({default_impl}) |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.impl} | {r.shape} | {r.seconds * 1e3:.1f} | {r.tokens / r.seconds:,.0f} | {r.ratio:.2f} |"
        )
    return "\n".join(lines)


def results_block(rows, diffs: dict[str, dict[str, float]], args, default_impl: str, command: str) -> str:
    import transformers

    kind = "quick smoke run (token counts ÷ 8; not representative)" if args.quick else "full run"
    lines = [
        f"### {args.device} {args.dtype}",
        "",
        f"- machine: {machine(torch.device(args.device))}",
        f"- software: torch {torch.__version__}, transformers {transformers.__version__}, "
        f"Python {platform.python_version()}",
        f"- dtype {args.dtype}; median of {args.repeats} iterations after {args.warmup} warm-up "
        f"rounds of every implementation, interleaved; {kind}",
        f"- date: {datetime.date.today().isoformat()}; command: `{command}`",
        f"- transformers' default experts implementation (a fresh OlmoeForCausalLM): `{default_impl}`",
        "- largest |Δ output| against transformers eager, in the timed dtype: "
        + "; ".join(
            f"{shape}: " + ", ".join(f"{n} {d:.1e}" for n, d in ds.items()) for shape, ds in diffs.items()
        ),
        "",
        table(rows, default_impl),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--shapes", default=None, help="comma-separated, from small,olmoe (default: both; --quick: small)"
    )
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed iterations per implementation (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per implementation first")
    p.add_argument("--out", type=Path, default=None, help="markdown file to update (e.g. docs/BENCHMARKS.md)")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: small shape, tokens ÷ 8, 1 repeat, no warm-up"
    )
    args = p.parse_args(argv)
    if args.shapes is None:
        args.shapes = "small" if args.quick else "small,olmoe"
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown or not names:
        p.error(f"--shapes {args.shapes!r}: choose among {', '.join(SHAPES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.quick:
        args.repeats, args.warmup = 1, 0

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    default_impl = transformers_default_experts()
    command = "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])
    rows, diffs = [], {}
    for name in names:
        shape = SHAPES[name]
        if args.quick:
            shape = Shape(shape.name, shape.n_experts, shape.top_k, shape.d_model, shape.d_expert,
                          shape.tokens // QUICK_TOKEN_DIVISOR)  # fmt: skip
        t0 = time.perf_counter()
        shape_rows, diffs[name] = run_shape(shape, dtype, device, args.repeats, args.warmup, default_impl)
        rows += shape_rows
        print(
            f"[{name}: outputs and gradients agree; timed in {time.perf_counter() - t0:.0f} s]",
            file=sys.stderr,
        )
    print(table(rows, default_impl))
    if args.out:
        block = results_block(rows, diffs, args, default_impl, command)
        key = f"moe_layer {args.device} {args.dtype}"
        update_doc(args.out, block, key, SECTION_HEADING, SECTION_INTRO, new_doc=DOC_INTRO)
        print(f"updated {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
