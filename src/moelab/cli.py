"""The `moelab` command. Library code raises MoelabError; this module turns it into one line + exit 2."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path

from moelab.errors import MoelabError, require_at_least


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def lazy(module: str, func: str):
    """A command handler that imports `module` only when the command runs (keeps --help fast)."""

    def run(args):
        return getattr(importlib.import_module(module), func)(args)

    return run


def _add(sub, name: str, help: str, example: str, **kw) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with an example."""
    return sub.add_parser(
        name, help=help, description=help, epilog=f"example:\n  {example}", formatter_class=_Formatter, **kw
    )


def add_no_progress(p: argparse.ArgumentParser) -> None:
    """--no-progress on a command that draws a progress bar."""
    p.add_argument("--no-progress", action="store_true", help="no progress bar (none either off a terminal)")


def show_progress(args) -> bool:
    """Progress bars only on a terminal (redrawn bars fill a log file) and unless --no-progress."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def build_parser() -> argparse.ArgumentParser:
    from moelab import __version__

    parser = argparse.ArgumentParser(
        prog="moelab",
        description="Build, train and analyse interpretable Mixture-of-Experts language models.",
        epilog="examples:\n  moelab params configs/olmoe-1b-7b.yaml\n  moelab data corpus --out data/corpus",
        formatter_class=_Formatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument("--version", action="version", version=f"moelab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = _add(
        sub,
        "params",
        "Print total and active parameter counts of a config.",
        "moelab params configs/olmoe-1b-7b.yaml --json",
    )
    p.add_argument("config", help="config YAML (or a checkpoint/run dir holding config.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print {'total': ..., 'active': ...}")
    p.set_defaults(func=cmd_params)

    p = _add(
        sub,
        "convert",
        "Convert OLMoE checkpoints between moelab and transformers.",
        "moelab convert from-hf path/to/OLMoE-1B-7B-0924 --out ckpt/olmoe",
    )
    conv = p.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    c = _add(
        conv,
        "from-hf",
        "transformers OLMoE folder -> moelab checkpoint.",
        "moelab convert from-hf hf/olmoe --out ckpt/olmoe",
    )
    c.add_argument("hf_dir")
    c.add_argument("--out", required=True, help="checkpoint directory to write (new or empty)")
    c.add_argument(
        "--force",
        action="store_true",
        help="replace --out if an earlier `convert from-hf` wrote it (any other directory is refused)",
    )
    c.set_defaults(func=cmd_convert_from_hf)
    c = _add(
        conv,
        "to-hf",
        "moelab checkpoint -> folder that OlmoeForCausalLM.from_pretrained loads.",
        "moelab convert to-hf ckpt/olmoe --out hf/olmoe",
    )
    c.add_argument("checkpoint")
    c.add_argument("--out", required=True, help="transformers folder to write (new or empty)")
    c.add_argument(
        "--force",
        action="store_true",
        help="replace --out if an earlier `convert to-hf` wrote it (any other directory is refused)",
    )
    c.add_argument(
        "--layout",
        choices=["fused", "per-expert"],
        default="fused",
        help="5.x fused expert tensors (default) or 4.x per-expert modules",
    )
    c.add_argument(
        "--drop-balance-bias",
        action="store_true",
        help="export a loss-free-balancing model without its bias (transformers' OLMoE has none, so some "
        "tokens route to other experts: prints how many, on a sample)",
    )
    c.set_defaults(func=cmd_convert_to_hf)

    p = _add(
        sub,
        "generate",
        "Generate text (or token ids) from a checkpoint with a KV cache.",
        'moelab generate runs/demo --prompt "To be, or not" --max-new-tokens 40',
    )
    p.add_argument("checkpoint", help="checkpoint or run directory")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--prompt", help="prompt text (needs a tokenizer saved with the checkpoint)")
    group.add_argument(
        "--prompt-ids",
        help="comma-separated token ids, e.g. 1,2,3 (decoded to text when the checkpoint has a tokenizer)",
    )
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--json", action="store_true", help="print {'prompt_ids': [...], 'ids': [...], 'text': ...}"
    )
    p.set_defaults(func=cmd_generate)

    p = _add(
        sub,
        "train",
        "Train a model from a config (YAML file or experiment directory).",
        "moelab train configs/tiny-cpu.yaml --set train.steps=100 --out runs/try",
    )
    p.add_argument("config", help="config YAML, or an experiment directory made by `moelab new`")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-3 (repeatable)",
    )
    p.add_argument("--out", type=Path, default=None, help="run directory (default: runs/CONFIG_NAME)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its latest checkpoint"
    )
    p.add_argument(
        "--take-edited-model",
        action="store_true",
        help="with --resume of an experiment: train its edited model.py, not the copy the checkpoint carries",
    )
    add_no_progress(p)
    p.add_argument(
        "--nproc",
        type=int,
        default=0,
        metavar="N",
        help="train with N processes on this machine (launches torchrun; see parallel: in the config)",
    )
    p.set_defaults(func=cmd_train)

    p = _add(
        sub,
        "eval",
        "Evaluate a checkpoint: loss, perplexity, MaxVio, per-domain loss.",
        "moelab eval runs/demo --data data/demo/tokens",
    )
    p.add_argument("checkpoint", help="checkpoint or run directory")
    p.add_argument("--data", required=True, help="tokenized data directory")
    p.add_argument("--split", default="val")
    p.add_argument("--batches", type=int, default=0, help="batches to evaluate (0 = the whole split)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=0, help="default: the checkpoint's data.seq_len")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = _add(
        sub,
        "new",
        "Create an experiment: an editable copy of a model file plus its config.",
        "moelab new my-router --from olmoe && moelab train experiments/my-router\n"
        "  moelab new my-state --from crosslayer   # cross-layer routing state\n"
        "  moelab new my-tree --from hierarchical  # tree experts",
    )
    p.add_argument("name")
    p.add_argument(
        "--from",
        dest="base",
        default="olmoe",
        help="architecture to copy: olmoe | crosslayer | hierarchical (default: olmoe)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="config to start from (default: configs/tiny-cpu-ARCH.yaml if present, else tiny-cpu.yaml)",
    )
    p.add_argument("--dir", default="experiments", help="parent directory (default: experiments)")
    p.set_defaults(func=cmd_new)

    from moelab.data.cli import add_commands as add_data_commands

    add_data_commands(sub, _add)
    from moelab.interp.cli import add_commands as add_interp_commands

    add_interp_commands(sub, _add)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` relaunches it
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args) or 0
    except MoelabError as e:
        print(f"moelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moelab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a full disk outside the atomic writers (which report it themselves)
        message = _disk_full_message(e, args)
        if message is None:
            raise
        print(f"moelab: error: {message}", file=sys.stderr)
        return 2


def _disk_full_message(e: Exception, args) -> str | None:
    """The one line for a write that failed for lack of space, naming the file (or the command's --out)."""
    from moelab.io import disk_full, is_disk_full

    out = getattr(args, "out", None)
    where = Path(e.filename) if isinstance(e, OSError) and e.filename else Path(out or ".")
    if not is_disk_full(e, where if where.is_dir() else where.parent):
        return None
    hint = ""
    if args.command == "train":
        hint = "free some space, then continue the run with --resume (from its last checkpoint)"
    return str(disk_full(where, hint=hint))


# ----------------------------------------------------------------------------- commands


def cmd_params(args) -> None:
    import torch

    from moelab.checkpoint import run_checkpoints
    from moelab.config import load_config
    from moelab.models import build

    source = Path(args.config)
    found = run_checkpoints(source) if source.is_dir() else []
    if found:  # a run: the model its newest checkpoint holds (with its own copy of an experiment's file)
        source = found[-1]
    config = load_config(source, args.overrides)
    with torch.device("meta"):  # no memory: OLMoE-1B-7B is counted without allocating it
        counts = build(config, base_dir=source if source.is_dir() else source.parent).count_parameters()
    if args.json:
        print(json.dumps(counts))
    else:
        print(f"total:  {counts['total']:>15,}")
        print(f"active: {counts['active']:>15,}  ({counts['active'] / counts['total']:.1%} per token)")


def cmd_convert_from_hf(args) -> None:
    from moelab.convert import convert_from_hf

    out = convert_from_hf(args.hf_dir, args.out, force=args.force)
    print(f"wrote moelab checkpoint {out}")


def cmd_convert_to_hf(args) -> None:
    from moelab.convert import balance_bias_effect, convert_to_hf

    drop = args.drop_balance_bias
    out = convert_to_hf(
        args.checkpoint, args.out, layout=args.layout, drop_balance_bias=drop, force=args.force
    )
    print(f"wrote transformers folder {out} (load with OlmoeForCausalLM.from_pretrained)")
    if drop:
        print(format_bias_effect(balance_bias_effect(args.checkpoint)))


def format_bias_effect(effect: dict) -> str:
    """One line on what dropping the balancing bias does to routing (convert.balance_bias_effect)."""
    if not effect["biased"]:
        return "the balancing bias is zero: nothing was dropped and routing is unchanged"
    n = effect["n_tokens"]
    layers = " ".join(f"{c / n:.1%}" for c in effect["per_layer"])
    return (
        f"dropped the loss-free balancing bias: the top-k expert set changes for {effect['changed']:,} of "
        f"{n:,} sampled tokens ({effect['changed'] / n:.1%}) in at least one layer; per layer {layers}. "
        f"Sample: {effect['source']}"
    )


def cmd_generate(args) -> None:
    from moelab.checkpoint import load, resolve_checkpoint
    from moelab.generate import generate

    if args.prompt is not None:
        try:  # the shell hands undecodable bytes over as lone surrogates, which no tokenizer takes
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise MoelabError(
                "--prompt holds bytes that are not UTF-8 text; pass UTF-8 text or token ids (--prompt-ids)"
            ) from None
    from moelab.convert import refuse_hf_folder

    refuse_hf_folder(args.checkpoint, "generate")
    ckpt = resolve_checkpoint(args.checkpoint)
    model = load(ckpt)
    tok_file = ckpt / "tokenizer.json"
    tokenizer = None
    if tok_file.is_file():  # also for --prompt-ids: the output is decoded to text
        from moelab.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tok_file)  # encodes exactly as the training data was encoded
    if args.prompt is not None:
        if tokenizer is None:
            raise MoelabError(f"{ckpt} has no tokenizer.json; pass --prompt-ids 1,2,3 instead of --prompt")
        prompt = tokenizer.encode(args.prompt)
    else:
        try:
            prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise MoelabError(f"--prompt-ids {args.prompt_ids!r} must be comma-separated integers") from None
    ids = generate(  # checks the prompt, temperature and top-p itself
        model,
        prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=model.config.model.eos_token_id,
    )
    text = tokenizer.decode(prompt + ids) if tokenizer else None
    if args.json:
        print(json.dumps({"prompt_ids": prompt, "ids": ids, "text": text}))
    else:
        print(text if text is not None else ",".join(map(str, prompt + ids)))


def cmd_train(args) -> int | None:
    import os

    if args.nproc:
        return _launch_torchrun(args.nproc, args.argv)
    from moelab.train.distributed import shutdown
    from moelab.train.trainer import prepare_run, train

    config, run_dir = prepare_run(args.config, args.overrides, args.out, args.resume, args.take_edited_model)
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"run directory: {run_dir}")
    try:
        record = train(config, run_dir, resume=args.resume, progress=show_progress(args))
    finally:
        shutdown()
    if not main_rank:
        return None
    if record.get("stopped"):
        print(f"stopped by {record['stopped']} at step {record['step']}; checkpoint {record['checkpoint']}")
        print(f"resume with: moelab train {run_dir / 'config.yaml'} --out {run_dir} --resume")
    else:
        print(f"done: {run_dir} (metrics.jsonl, checkpoints/)")


def _launch_torchrun(nproc: int, command: list[str]) -> int:
    """Run this same `moelab train` command (without --nproc) as N processes of a torchrun job."""
    import os
    import subprocess

    if nproc < 1:
        raise MoelabError(f"--nproc {nproc} must be >= 1")
    if "WORLD_SIZE" in os.environ:
        raise MoelabError("--nproc launches torchrun; inside a torchrun job leave it out")
    argv, skip = [], False
    for a in command:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.call([*launch, "-m", "moelab.cli", *argv])


def cmd_eval(args) -> None:
    from moelab.convert import refuse_hf_folder
    from moelab.train.evaluate import evaluate, open_evaluation

    require_at_least(
        ("--batches", args.batches, 0), ("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 0)
    )
    refuse_hf_folder(args.checkpoint, "eval")
    ckpt, model, val, device = open_evaluation(
        args.checkpoint, args.data, args.split, args.batch_size, args.seq_len
    )
    result = evaluate(model, val, args.batches, device)
    if args.json:
        print(json.dumps(result))
        return
    print(f"checkpoint {ckpt}  data {args.data}:{args.split}  tokens {result['tokens']:,}")
    print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.2f}")
    print("MaxVio_global per layer: " + " ".join(f"{v:.3f}" for v in result["max_vio_global"]))
    for name, value in result.get("domain_loss", {}).items():
        print(f"  {name:<12} loss {value:.4f}")


def cmd_new(args) -> None:
    from moelab.experiments import default_config, new_experiment

    config = Path(args.config) if args.config else default_config(args.base)
    out = new_experiment(args.name, args.base, config, Path(args.dir))
    print(f"created {out}/ (model.py, config.yaml). Edit model.py, then: moelab train {out}")


if __name__ == "__main__":
    sys.exit(main())
