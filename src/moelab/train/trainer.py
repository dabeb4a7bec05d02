"""`moelab train`: the training loop, with exact resume, telemetry and clean interruption.

One optimizer step = `grad_accum` micro-batches. After the step, the loss-free balancing biases
move from the expert counts summed over those micro-batches (padding excluded). The numbers a
step needs (loss terms, gradient norms, finiteness) come back in one host transfer; a logged step
adds one more for all per-layer telemetry, so there are no per-expert host syncs. The step counts are
also summed on device over the window since the previous logged line (dead experts, load percentiles).

Under torchrun (train/distributed.py) every rank takes batch_size / world_size sequences of each
micro-batch; after the micro-batches the gradients are averaged once, and one all-reduce carries the
step's loss terms, expert counts and stop flag (so the biases stay identical and a signal on any rank
stops all of them at the same step). Rank 0 alone logs and writes checkpoints of the gathered state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.checkpoint import MODEL_FILE, TOKENIZER
from moelab.config import Config, save_config
from moelab.data.loader import PackedLoader, TokenDataset
from moelab.data.tokenizer import load_tokenizer
from moelab.errors import MoelabError
from moelab.models import build
from moelab.moe.losses import global_balance, loss_coefficients, weighted_loss
from moelab.train.checkpoint import (
    latest_checkpoint,
    load_training_checkpoint,
    rng_state,
    save_training_checkpoint,
    set_rng_state,
)
from moelab.train.device import autocast_for, resolve_device
from moelab.train.distributed import (
    all_reduce_sum,
    average_gradients,
    balance_count_reducer,
    barrier,
    full_optimizer_state,
    full_state_dict,
    init_distributed,
    shard_optimizer_state,
)
from moelab.train.evaluate import evaluate, make_val_loader
from moelab.train.loggers import Loggers
from moelab.train.optim import build_optimizer, clip_grad_groups, lr_at
from moelab.train.parallel import parallelize
from moelab.train.run_dir import logged_val, prepare_run, run_model_file  # noqa: F401 (prepare_run: API)
from moelab.train.runlock import RunLock
from moelab.train.telemetry import (
    WidthGroups,
    balance_bias_range,
    max_violation,
    model_telemetry,
    router_entropy,
    routing_state_rms,
    width_group_load,
    window_load_stats,
)

log = logging.getLogger(__name__)

# Peak dense bf16 tensor throughput used for MFU, by GPU name fragment (FLOP/s).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "4090": 165e12}


@dataclass
class StopRequest:
    signal_name: str | None = None


class _SignalGuard:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the current step."""

    def __init__(self):
        self.stop = StopRequest()
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self.stop

    def _handle(self, signum, frame):
        if self.stop.signal_name is not None:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.stop.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(config: Config, run_dir: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train; return the final metrics record. Stops early (after saving) on SIGINT/SIGTERM.

    Rank 0 locks the run directory (runlock.py) once the checks that need no directory have passed,
    creating it then, and holds the lock until it returns; a run that fails before it starts leaves no
    directory it made."""
    lock = RunLock(run_dir)
    try:
        return _train(config, Path(run_dir), resume, progress, lock)
    except BaseException:
        lock.release(discard=(MODEL_FILE,))
        raise
    finally:
        lock.release()


def _train(config: Config, run_dir: Path, resume: bool, progress: bool, lock: RunLock) -> dict:
    tc, dc, mc = config.train, config.data, config.model
    if dc.seq_len > mc.max_seq_len:
        raise MoelabError(
            f"data.seq_len={dc.seq_len} is longer than model.max_seq_len={mc.max_seq_len} (the positions "
            f"the model has); lower data.seq_len or raise model.max_seq_len"
        )
    d = init_distributed(config)  # Dist() (nothing to reduce) without torchrun
    device = resolve_device(tc)
    torch.manual_seed(tc.seed)

    train_data = TokenDataset(dc.path, dc.train_split)
    tokenizer_file = Path(dc.path) / "tokenizer.json"
    if train_data.vocab_size > config.model.vocab_size:
        raise MoelabError(
            f"{dc.path} was tokenized with vocab {train_data.vocab_size} > model.vocab_size "
            f"{config.model.vocab_size}; set model.vocab_size >= {train_data.vocab_size}"
        )
    if train_data.eos_id != config.model.eos_token_id:
        raise MoelabError(
            f"{dc.path} separates documents with eos id {train_data.eos_id} but model.eos_token_id is "
            f"{config.model.eos_token_id}; pass --set model.eos_token_id={train_data.eos_id}"
        )
    per_rank = tc.batch_size // d.world_size  # init_distributed checked divisibility
    loader = PackedLoader(train_data, dc.seq_len, per_rank, tc.seed, rank=d.rank, world_size=d.world_size)
    val_loader = make_val_loader(config, train_data.metadata["splits"])

    origin = None  # the experiment file config.yaml names (None: a built-in architecture)
    if d.is_main:  # the ranks of one job share the directory: rank 0 alone locks it
        lock.acquire()
        if not resume and latest_checkpoint(run_dir) is not None:  # written since prepare_run looked
            raise MoelabError(
                f"{run_dir} already holds checkpoints; pass --resume to continue or --out NEW_DIR"
            )
        config, origin = run_model_file(config, run_dir, resume)
    model = build(config).to(device)
    step, tokens_seen, nonfinite_streak = 0, 0, 0
    state = None
    if resume:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise MoelabError(f"--resume: no checkpoint in {run_dir}/checkpoints")
        state = load_training_checkpoint(ckpt, model, device)  # the whole model, before any sharding
    model = parallelize(model, config, d)  # dispatcher, checkpointing, compile, data parallelism
    optimizer = build_optimizer(model, tc, device)  # so the optimizer is built after loading
    if state is not None:
        if (ckpt / TOKENIZER).is_file():
            train_data.check_tokenizer(load_tokenizer(ckpt / TOKENIZER).hash)
        try:
            optimizer.load_state_dict(shard_optimizer_state(state["optimizer"], optimizer, model, d))
        except ValueError as e:
            raise MoelabError(
                f"{ckpt}: optimizer state does not fit this config ({e}); keep train.no_decay"
            ) from None
        if tc.steps < state["step"]:
            raise MoelabError(
                f"--resume: train.steps={tc.steps} is below step {state['step']}, which {ckpt} has "
                f"reached; give train.steps >= {state['step']}"
            )
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        nonfinite_streak = state.get("nonfinite_streak", 0)
        log.info("resumed from %s at step %d", ckpt, step)
    # validation after the resumed checkpoint, when a kill came between the two (the final one included)
    val_due = (
        resume
        and val_loader is not None
        and (step == tc.steps or (tc.eval_every and step % tc.eval_every == 0))
    )
    val_due = val_due and not logged_val(run_dir / "metrics.jsonl", step)
    if d.is_main:  # only now: a resume with bad overrides changes nothing
        saved = (
            config
            if origin is None
            else dataclasses.replace(config, model=dataclasses.replace(config.model, arch=origin))
        )
        save_config(saved, run_dir / "config.yaml")
    loggers = Loggers(run_dir, config, resume_step=step if resume else None) if d.is_main else _Silent()
    counts = model.count_parameters()
    peak = next(
        (v for k, v in PEAK_FLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), 0
    )
    flops_per_token = (
        6 * counts["active"] + 12 * config.model.n_total_layers * config.model.d_model * dc.seq_len
    )

    def checkpoint(at_step: int) -> Path:
        """Rank 0 writes the whole model and optimizer state, gathered from every rank (a collective)."""
        weights = full_state_dict(model, d) if d.active else None
        state = {
            "step": at_step,
            "tokens_seen": tokens_seen,
            "optimizer": full_optimizer_state(optimizer, model, d),
            "loader": loader.state_dict(),  # the cursor counts every rank's windows
            "rng": rng_state(),
            "nonfinite_streak": nonfinite_streak,
        }
        path = run_dir / "checkpoints" / f"step-{at_step:07d}"
        if d.is_main:
            path = save_training_checkpoint(
                run_dir, at_step, model, config, state, tokenizer_file, tc.keep_last, weights
            )
        barrier(d)  # no rank moves on (or exits) before the checkpoint is complete
        return path

    width_groups = WidthGroups.of(model, device)  # None unless expert widths differ
    bar = _progress(tc.steps, step, progress and d.is_main)
    global_scope = config.moe.load_balance_scope == "global_batch"
    # global_batch over one micro-batch: f summed over the ranks as each micro-batch runs; over several
    # (grad_accum > 1): f of the whole step, from a no-grad routing pass over its micro-batches first
    balance = balance_count_reducer(d) if global_scope and d.active and tc.grad_accum == 1 else None
    whole_step = global_scope and tc.grad_accum > 1
    expert_group = d.ep_group if d.ep > 1 else False
    record: dict = {}
    window_counts = None  # (L, E) counts summed on device since the previous logged line

    def validate() -> None:
        # every rank evaluates the same batches (expert parallelism needs all of them); rank 0 logs
        val = evaluate(model, val_loader, tc.eval_batches, device, autocast_for(tc, device))
        model.train()
        loggers.log({"type": "val", "step": step, **val})
        if d.is_main:
            bar.write(f"step {step}: val loss {val['loss']:.4f} (ppl {val['perplexity']:.1f})")

    model.train()
    with contextlib.ExitStack() as cleanup, _SignalGuard() as stop:
        cleanup.callback(loggers.close)
        cleanup.callback(bar.close)
        if val_due:
            validate()
        while step < tc.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            coefs = loss_coefficients(config, step)  # the load-balance schedule at this step
            logging_step = (step + 1) % tc.log_every == 0 or step + 1 == tc.steps
            sums, step_counts, entropy, state_rms, n_tokens = None, None, 0.0, None, 0
            batches = [next(loader) for _ in range(tc.grad_accum)]
            if whole_step:
                balance = step_balance_counts(model, batches, tc, device, d)
            for batch in batches:
                input_ids = batch["input_ids"].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
                with autocast_for(tc, device), global_balance(balance):
                    out = model(input_ids, labels=labels)
                loss = weighted_loss(out.losses, coefs)
                (loss / tc.grad_accum).backward()
                terms = torch.stack([loss.detach(), *(v.detach().float() for v in out.losses.values())])
                sums = terms if sums is None else sums + terms
                c = out.expert_counts.detach()
                step_counts = c if step_counts is None else step_counts + c
                n_tokens += labels.numel()
                if logging_step:  # packed windows have no padding: every token is valid
                    entropy = entropy + router_entropy(out.routing, None) / tc.grad_accum
                    rms = routing_state_rms(out.routing)
                    if rms is not None:
                        state_rms = (
                            rms / tc.grad_accum if state_rms is None else state_rms + rms / tc.grad_accum
                        )
            if d.active:  # gradients: the mean over ranks; terms and counts: summed, with the stop flag
                average_gradients(model, d)
                flag = torch.tensor([1.0 if stop.signal_name else 0.0], device=sums.device)
                reduced = all_reduce_sum(torch.cat([sums, step_counts.float().flatten(), flag]), d)
                sums = reduced[: sums.numel()] / d.world_size
                step_counts = reduced[sums.numel() : -1].view(step_counts.shape)
                n_tokens *= d.world_size
            window_counts = step_counts.clone() if window_counts is None else window_counts + step_counts
            grad_norms = clip_grad_groups(model, tc.clip_experts, tc.clip_rest, expert_group)
            finite = torch.isfinite(sums).all() & torch.isfinite(grad_norms).all()
            # one host transfer for the scalars every step needs (loss, norms, finiteness)
            tail = [finite.float()[None], reduced[-1:]] if d.active else [finite.float()[None]]
            packed = torch.cat([sums / tc.grad_accum, grad_norms, *tail]).tolist()
            # stop after this step: in a job only by the reduced flag, so every rank stops at the same step
            # (a signal arriving after the flag was sent counts at the next step)
            stopping = packed.pop() > 0 if d.active else stop.signal_name is not None
            finite = packed[-1] == 1.0
            if finite:
                optimizer.step()
                model.update_balance_biases(step_counts)
                nonfinite_streak = 0
            else:
                nonfinite_streak += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens_seen += n_tokens
            dt = time.perf_counter() - t0
            if not finite:
                loggers.log(
                    {"type": "nonfinite", "step": step, "loss": packed[0], "streak": nonfinite_streak}
                )
                log.warning(
                    "step %d: non-finite loss or gradient; step skipped (%d in a row)", step, nonfinite_streak
                )
                if nonfinite_streak >= tc.max_nonfinite:
                    last = latest_checkpoint(run_dir)
                    raise MoelabError(
                        f"{nonfinite_streak} non-finite steps in a row at step {step}; stopped. Last good "
                        f"checkpoint: {last or 'none'}. Lower train.lr or check the data, then --resume"
                    )
            elif logging_step:
                names = ["loss", *out.losses.keys()]
                record = {"type": "train", "step": step, **dict(zip(names, packed[: len(names)]))}
                record.update(
                    lr=lr,
                    load_balance_coef=coefs["load_balance"],
                    grad_norm=packed[len(names)],
                    grad_norm_experts=packed[len(names) + 1],
                    grad_norm_rest=packed[len(names) + 2],
                    tokens=tokens_seen,
                    tokens_per_s=n_tokens / dt,
                    step_time_s=dt,
                )
                bias = balance_bias_range(model).to(step_counts.device)  # (L, 2)
                dead, load_pct = window_load_stats(window_counts)  # (L,), (L, P) over the window
                window_counts = None
                columns = [step_counts, max_violation(step_counts)[:, None], entropy[:, None], bias]
                columns += [dead[:, None], load_pct]
                if state_rms is not None:
                    columns.append(state_rms[:, None])
                table = torch.cat(columns, dim=1)  # (L, E + 5 + P [+ 1])
                extras = model_telemetry(model)  # {name: (n,)}
                if width_groups is not None:  # (L, G) load share per width group
                    extras = {"width_load": width_group_load(step_counts, width_groups).flatten(), **extras}
                flat = torch.cat([table.flatten(), *(v.to(table.device) for v in extras.values())])
                flat = flat.tolist()  # one more host transfer for all of it
                L, C, E, P = table.shape[0], table.shape[1], step_counts.shape[1], load_pct.shape[1]
                per_layer = [flat[i * C : (i + 1) * C] for i in range(L)]
                record["layers"] = {
                    "counts": [[int(c) for c in row[:E]] for row in per_layer],
                    "max_vio": [row[E] for row in per_layer],
                    "router_entropy": [row[E + 1] for row in per_layer],
                    "bias_range": [row[E + 2 : E + 4] for row in per_layer],
                    "dead_experts": [int(row[E + 4]) for row in per_layer],
                    "load_pct": [row[E + 5 : E + 5 + P] for row in per_layer],
                }
                if state_rms is not None:
                    record["layers"]["routing_state_rms"] = [row[E + 5 + P] for row in per_layer]
                at = L * C
                if width_groups is not None:
                    G = len(width_groups.widths)
                    shares = extras.pop("width_load")
                    record["layers"]["width_load"] = [flat[at + i * G : at + (i + 1) * G] for i in range(L)]
                    record["width_groups"] = {"widths": width_groups.widths, "experts": width_groups.experts}
                    at += shares.numel()
                for name, value in extras.items():
                    record.setdefault("model", {})[name] = flat[at : at + value.numel()]
                    at += value.numel()
                if device.type == "cuda":
                    record["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
                    if peak:
                        record["mfu"] = flops_per_token * n_tokens / dt / peak
                loggers.log(record)
            bar.update(1)
            bar.set_postfix(loss=f"{packed[0]:.3f}", tok_s=f"{n_tokens / dt:,.0f}", refresh=False)

            last_step = step == tc.steps
            # periodic checkpoints only of good states (not inside a non-finite streak)
            periodic = tc.save_every and step % tc.save_every == 0 and nonfinite_streak == 0
            if periodic or last_step or stopping:
                path = checkpoint(step)
                if stopping:  # the caller says where it saved and how to resume (cli.cmd_train)
                    stop.signal_name = stop.signal_name or "SIGTERM"  # signalled on another rank
                    return {"stopped": stop.signal_name, "step": step, "checkpoint": str(path)}
            # validation after the checkpoint, so a failing evaluation never costs the saved state
            if val_loader is not None and ((tc.eval_every and step % tc.eval_every == 0) or last_step):
                validate()
    return record


class _Silent:
    """The loggers of ranks other than 0."""

    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


@torch.no_grad()
def step_balance_counts(model, batches, tc, device, d):
    """moe.load_balance_scope=global_batch with grad_accum > 1: the load-balancing fractions f of the
    whole optimizer step. A no-grad forward of every micro-batch records the (L, E) assignment counts
    and token counts that `load_balance_loss` forms f from; they are summed over the micro-batches and
    (one all-reduce) the ranks. Returns a reducer that gives every micro-batch of the step these counts,
    so its loss is E · Σ_e f_step,e · P_e with its own P. Costs one extra forward per micro-batch."""
    seen = []

    def record(counts, n_tokens):
        seen.append((counts.detach().float(), n_tokens.detach().float()))
        return counts, n_tokens

    with autocast_for(tc, device), global_balance(record):
        for batch in batches:
            model(batch["input_ids"].to(device), labels=batch["labels"].to(device))
    counts = torch.stack([c for c, _ in seen]).sum(0)  # (L, E)
    n_tokens = torch.stack([n for _, n in seen]).sum()
    if d.active:
        counts, n_tokens = balance_count_reducer(d)(counts, n_tokens)
    return lambda _counts, _n_tokens: (counts, n_tokens)


def _progress(total: int, start: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=start, desc="train", unit="step", disable=not enabled, dynamic_ncols=True
    )
