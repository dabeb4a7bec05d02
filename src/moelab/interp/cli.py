"""`moelab trace | lens | analyze | ablate | report`: argument parsing only; work happens in the modules."""

from __future__ import annotations

from moelab.cli import add_no_progress, lazy


def _lazy(module: str, func: str):
    return lazy(f"moelab.interp.{module}", func)


def add_commands(sub, add) -> None:
    p = add(
        sub,
        "trace",
        "Record the routing of a model (moelab run/checkpoint or transformers MoE folder) on tokenized data.",
        "moelab trace runs/demo --data data/demo/tokens --max-tokens 200000 --out traces/demo",
    )
    p.add_argument("model", help="run dir, checkpoint dir, or a transformers OLMoE/Mixtral/Qwen-MoE folder")
    p.add_argument("--data", help="tokenized data directory (moelab data tokenize)")
    p.add_argument("--split", default="val")
    p.add_argument(
        "--contextual", action="store_true", help="trace the built-in contextual-token set instead"
    )
    p.add_argument("--max-tokens", type=int, default=0, help="stop after N tokens (0 = the whole split)")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the model's data.seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--router-probs", action="store_true", help="also store router_probs (L, T, E) float16")
    p.add_argument(
        "--predictions",
        action="store_true",
        help="also store predicted_ids (argmax of the logits) and next_ids (true next token, -1 = none)",
    )
    p.add_argument("--out", required=True, help="trace directory to write")
    add_no_progress(p)
    p.set_defaults(func=_lazy("trace", "cmd_trace"))

    p = add(
        sub,
        "lens",
        "Expert logit lens: the tokens each routed expert's mean output promotes and suppresses "
        "(lm_head(norm(mean))) on tokenized data.",
        "moelab lens runs/demo --data data/demo/tokens --max-tokens 100000 --out runs/demo/lens.json",
    )
    p.add_argument(
        "run", help="moelab run or checkpoint directory, or a transformers MoE folder (needs --out)"
    )
    p.add_argument("--data", required=True, help="tokenized data directory (moelab data tokenize)")
    p.add_argument("--split", default="val")
    p.add_argument("--max-tokens", type=int, default=0, help="stop after N tokens (0 = the whole split)")
    p.add_argument("--top", type=int, default=10, help="promoted and suppressed tokens per expert")
    p.add_argument("--seq-len", type=int, default=0, help="window length (default: the model's data.seq_len)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", help="JSON file to write (default: RUN/lens.json for a moelab run)")
    add_no_progress(p)
    p.set_defaults(func=_lazy("lens", "cmd_lens"))

    p = add(
        sub,
        "analyze",
        "Specialization metrics of a trace: load, MaxVio, co-activation, domain/vocab specialization, "
        "continuity, paths, contextual TIS/ICS, router saturation.",
        "moelab analyze traces/demo --json   |   moelab analyze runs/demo --saturation",
    )
    p.add_argument("trace", help="trace directory (moelab trace), or a run directory with --saturation")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument(
        "--compare", nargs="+", default=[], help="reference trace(s) of the same tokens: saturation"
    )
    p.add_argument(
        "--min-count", type=int, default=10, help="vocab specialization: minimum occurrences of an id"
    )
    p.add_argument("--path-layers", default=None, help="paths over layers FIRST:LAST (default: all)")
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help="domain/vocab specialization on each token's first k experts: 1 (top-1) or top_k (default)",
    )
    p.add_argument(
        "--coactivation",
        choices=["all", "adjacent"],
        default="all",
        help="co-activation over all pairs of the top-k set (default) or rank-adjacent pairs only",
    )
    p.add_argument(
        "--source",
        choices=["recorded", "preferred"],
        default="recorded",
        help="recorded top-k (default) or the top-k of router_probs (traces made with --router-probs)",
    )
    p.add_argument(
        "--saturation",
        action="store_true",
        help="TRACE is a run dir: trace the same tokens through every kept checkpoint and write "
        "RUN/saturation.json and RUN/saturation.png (saturation vs the final checkpoint)",
    )
    p.add_argument("--data", default=None, help="--saturation: tokenized data (default: the run's data.path)")
    p.add_argument("--split", default=None, help="--saturation: split (default: the run's data.val_split)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="--saturation: tokens traced per checkpoint (default 20000)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="--saturation: tracing batch size")
    p.add_argument(
        "--nulls",
        type=int,
        default=0,
        metavar="R",
        help="null baselines: mean ± std of the headline metrics over R seeded shuffles (default 0 = off)",
    )
    p.add_argument(
        "--lens",
        default=None,
        metavar="LENS_JSON",
        help="include an expert logit lens (moelab lens) of the traced model under the key `lens`",
    )
    add_no_progress(p)
    p.set_defaults(func=_lazy("metrics", "cmd_analyze"))

    p = add(
        sub,
        "ablate",
        "Remove experts, drop top-k ranks or force a routing; report the loss change overall and per domain "
        "against ablating the same number of random experts.",
        "moelab ablate runs/demo --data data/demo/tokens --experts 0:3,1:5",
    )
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--experts", default=None, help="LAYER:EXPERT pairs to remove, e.g. 0:3,0:4,2:1")
    p.add_argument("--drop-ranks", default=None, help="top-k ranks to drop (0 = top-1), e.g. 1 or 1,2")
    p.add_argument("--renormalize", action="store_true", help="renormalise the remaining top-k weights")
    p.add_argument("--force", default=None, help="LAYER:EXPERT,... route every token of LAYER to EXPERT")
    p.add_argument("--random-baselines", type=int, default=3, help="random ablations of the same size")
    p.add_argument("--batches", type=int, default=20, help="validation batches (0 = the whole split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    add_no_progress(p)
    p.set_defaults(func=_lazy("interventions", "cmd_ablate"))

    p = add(
        sub,
        "report",
        "Write one self-contained HTML report (training curves, balance, specialization, expert cards).",
        "moelab report runs/demo --out runs/demo/report.html",
    )
    p.add_argument("runs", nargs="+", help="run directories (several: side-by-side comparison)")
    p.add_argument("--out", default=None, help="HTML file (default: RUN_DIR/report.html)")
    p.add_argument(
        "--trace",
        action="append",
        default=[],
        help="trace dir per run, in the runs' order: DIR or DATA_DIR,CONTEXTUAL_DIR "
        "(default: RUN_DIR/trace and RUN_DIR/trace-contextual)",
    )
    add_no_progress(p)
    p.set_defaults(func=_lazy("report", "cmd_report"))
