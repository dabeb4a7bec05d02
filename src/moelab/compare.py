"""`make compare`: the matched architecture comparison on the embedded corpus, idempotent.

Every config in configs/compare/ trains on the same data (the demo's embedded corpus and 8k BPE) for the
same tokens, at active parameters within 5% of the baseline's (tests/test_compare.py checks both). For
each: train → evaluate on the whole validation split → trace the validation split and the
contextual-token set → analyze. Then one HTML report with every run side by side and a markdown table
of the numbers with their random baselines (runs/compare/table.md, the table in docs/ARCHITECTURES.md).
A rerun reuses every finished step.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from moelab.demo import finished, has_checkpoint, prepare_data, step, trace_commands
from moelab.interp.nulls import permuted as permuted  # the permuted-routes baseline (one implementation)
from moelab.interp.structure import TOP_PATHS

CONFIGS = Path("configs/compare")
RUNS = Path("runs/compare")
NAMES = ("olmoe", "crosslayer-z8", "crosslayer-z32", "hierarchical", "mixed-widths")


def run_one(name: str, tokens: Path, steps: int | None, n: int) -> Path:
    """Train, evaluate, trace and analyze one config; returns its run directory."""
    from moelab.config import load_config

    config, run = CONFIGS / f"{name}.yaml", RUNS / name
    steps = steps or load_config(config).train.steps
    trained_now = not finished(run, steps)
    resume = ["--resume"] if has_checkpoint(run) else []
    head = f"[{n}/{len(NAMES)}] {name}"
    step(
        f"{head}: train {config}",
        not trained_now,
        ["train", str(config), "--out", str(run), *resume, "--set", f"train.steps={steps}"],
    )
    trace, ctx = run / "trace", run / "trace-contextual"
    fresh = not trained_now and (run / "eval.json").is_file() and (run / "analysis.json").is_file()
    print(f"\n== {head}: evaluate, trace, analyze" + (" (up to date, reusing)" if fresh else ""), flush=True)
    if fresh:
        return run
    evaluate_run(run, tokens)
    for argv in trace_commands(run, tokens, trace, ctx):
        step(f"{head}: moelab {argv[0]}", False, argv)
    analyze_run(run)
    return run


def evaluate_run(run: Path, tokens: Path) -> None:
    """run/eval.json: loss, per-domain loss and MaxVio on the whole validation split."""
    from moelab.train.evaluate import evaluate, open_evaluation

    _, model, val, device = open_evaluation(str(run), str(tokens), "val", 16, 0)
    result = evaluate(model, val, 0, device)
    result["params"] = model.count_parameters()
    write_text(run / "eval.json", json.dumps(result, indent=1))


def analyze_run(run: Path) -> None:
    """run/analysis.json: the metrics of both traces ("data", "domain_lift", "contextual") and the same
    for their permuted-routes baseline ("random", see `permuted`)."""
    from moelab.interp.trace_file import Trace

    data, ctx = Trace.open(run / "trace"), Trace.open(run / "trace-contextual")
    result = trace_metrics(data, ctx)
    result["random"] = trace_metrics(permuted(data), permuted(ctx))
    write_text(run / "analysis.json", json.dumps(result))


def trace_metrics(data, ctx) -> dict:
    from moelab.interp import metrics

    return {
        "data": metrics.analyze(data),
        "domain_lift": domain_lift(data),
        "contextual": metrics.analyze(ctx).get("contextual"),
    }


def write_text(path: Path, text: str) -> None:
    """Write atomically: an interrupted run never leaves a half-written file that looks valid."""
    from moelab.io import atomic_file

    with atomic_file(path) as fh:
        fh.write(text)


def domain_lift(trace) -> dict:
    """How strongly some expert prefers each domain, comparable across architectures.

    lift(l, d) = max_e share(l, d, e) / share(l, e): the share of domain d's tokens whose expert set at
    layer l includes e, over the share of all tokens that include e. Random (domain-blind) routing
    gives 1 for every expert, whatever E, k or tree shape. Returns {"mean": mean over layers and
    domains, "per_layer": (L,) mean over domains}.
    """
    from moelab.interp import metrics

    shares = metrics.domain_specialization(trace)  # {domain: (L, E)}
    if not shares:
        return {"mean": None, "per_layer": []}
    overall = metrics.expert_token_counts(trace) / max(trace.n_tokens, 1)  # (L, E)
    with np.errstate(divide="ignore", invalid="ignore"):
        lifts = np.stack(
            [np.nanmax(np.where(overall > 0, s / overall, np.nan), axis=1) for s in shares.values()]
        )
    per_layer = np.nanmean(lifts, axis=0)  # (L,)
    return {"mean": float(np.nanmean(per_layer)), "per_layer": per_layer.tolist()}


# ----------------------------------------------------------------------------- the table


def summarise(name: str, ev: dict, analysis: dict) -> dict:
    """One row of the comparison: the run's numbers, and under "random" those of its permuted baseline."""
    row = {"name": name, "active": ev["params"]["active"], "loss": ev["loss"]}
    row["domain_loss"] = ev.get("domain_loss", {})
    row.update(routing_numbers(analysis))
    row["random"] = routing_numbers(analysis["random"]) if "random" in analysis else None
    return row


def routing_numbers(analysis: dict) -> dict:
    """The table's routing metrics from one analysis ({"data", "domain_lift", "contextual"})."""
    data = analysis["data"]
    layers, tree = data["layers"], data.get("tree")
    ctx = analysis.get("contextual") or {}
    tis = [v for word in ctx.get("tis", {}).values() for v in word if v is not None]
    ics = [v for word in ctx.get("ics", {}).values() for v in word if v is not None]
    return {
        "max_vio": max_vio(data),
        "domain_lift": analysis["domain_lift"]["mean"],
        "vocab": _mean([row["vocab_specialization"]["normalized"] for row in layers]),
        "tis": _mean(tis),
        "ics": _mean(ics),
        "continuity": _mean([row["expert_continuity_next"] for row in layers]),
        "route_entropy": data["paths"]["norm_entropy"],
        "routes_80": data["paths"]["cover_80"],
        "tree_top10": None if not tree else _mean([layer["top_share"] for layer in tree["paths"]]),
        "tree_top10_uniform": None if not tree else min(1.0, TOP_PATHS / possible_paths(tree)),
    }


def possible_paths(tree: dict) -> int:
    """The distinct sets of top-k leaves a tree token can take: C(b^D, k)."""
    return math.comb(tree["branches"] ** tree["depth"], tree.get("paths_per_token", 1))


def max_vio(data: dict) -> float:
    """Mean over layers of max(load)/mean(load) − 1 over the experts that should share the load
    evenly: all of them, or for a tree those of each depth (deeper experts see fewer tokens by design)."""
    tree = data.get("tree")
    if tree is None:
        return _mean([row["max_vio"] for row in data["layers"]])
    from moelab.interp.structure import expert_depths

    depths = expert_depths(tree["branches"], tree["depth"])  # (E,)
    vios = []
    for row in data["layers"]:
        load = np.asarray(row["load"], dtype=np.float64)
        for d in range(1, tree["depth"] + 1):
            group = load[depths == d]
            vios.append(group.max() / max(group.mean(), 1e-12) - 1)
    return float(np.mean(vios))


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else None


def _cell(value, spec: str = ".3f") -> str:
    return "–" if value is None else format(value, spec)


COLUMNS = (  # (key, header, format, baseline): "permuted" = the run's permuted-routes baseline
    ("domain_lift", "domain lift", ".2f", "permuted"),
    ("vocab", "vocab spec.", ".3f", "permuted"),
    ("tis", "TIS", ".3f", "permuted"),
    ("ics", "ICS", ".3f", "permuted"),
    ("continuity", "continuity", ".3f", "permuted"),
    ("route_entropy", "route entropy", ".3f", "permuted"),
    ("routes_80", "routes for 80%", ",", "permuted"),
    ("tree_top10", "tree: top-10 paths", ".3f", "tree_top10_uniform"),
)


def markdown_table(rows: list[dict]) -> str:
    """The comparison as a markdown table, one row per run. MaxVio is 0 when balanced; every other routing
    metric is followed, in brackets, by its random baseline: the run's permuted-routes value (a layer's
    loads and path counts survive permutation, so the tree's path share is compared with uniform
    descent, 10 / C(b^D, k), instead)."""
    domains = sorted({d for row in rows for d in row["domain_loss"]})
    head = ["run", "active params", "val loss", *(f"{d} loss" for d in domains), "MaxVio"]
    head += [h for _, h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], f"{r['active']:,}", _cell(r["loss"])]
        cells += [_cell(r["domain_loss"].get(d)) for d in domains] + [_cell(r["max_vio"])]
        for key, _, spec, baseline in COLUMNS:
            base = (r.get("random") or {}).get(key) if baseline == "permuted" else r.get(baseline)
            cells.append(
                _cell(r[key], spec) + ("" if base is None or r[key] is None else f" ({_cell(base, spec)})")
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moelab.compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  make compare\n  python -m moelab.compare --only olmoe,crosslayer-z8 --steps 50",
    )
    parser.add_argument("--only", default=None, help="comma-separated subset of: " + ", ".join(NAMES))
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (quick tries)")
    args = parser.parse_args(argv)
    names = NAMES if args.only is None else tuple(n.strip() for n in args.only.split(","))
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        print(
            f"error: unknown comparison run {unknown[0]!r}; choose from {', '.join(NAMES)}", file=sys.stderr
        )
        return 2
    start = time.time()
    _, _, tokens = prepare_data("/3 (data)")
    runs = [run_one(name, tokens, args.steps, NAMES.index(name) + 1) for name in names]
    report = RUNS / "report.html"
    step("report: every run side by side", False, ["report", *map(str, runs), "--out", str(report)])
    rows = [
        summarise(
            run.name,
            json.loads((run / "eval.json").read_text()),
            json.loads((run / "analysis.json").read_text()),
        )
        for run in runs
    ]
    table = markdown_table(rows)
    write_text(RUNS / "table.md", table + "\n")
    print("\n" + table)
    print(f"\ndone in {time.time() - start:.0f} s: {RUNS}/table.md, {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
