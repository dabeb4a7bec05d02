"""Where metrics go: RUN_DIR/metrics.jsonl always; TensorBoard and W&B when enabled in the config."""

from __future__ import annotations

import json
import logging
import os
import uuid
from pathlib import Path

from moelab.errors import MoelabError
from moelab.io import atomic_file

log = logging.getLogger(__name__)


class MetricsFile:
    """Append-only JSON lines. On resume, lines after the resumed step are dropped (they were not saved)."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            with atomic_file(path) as fh:
                fh.writelines(line + "\n" for line in _records_up_to(path, resume_step))
        elif resume_step is None and path.exists():
            path.unlink()
        self.fh = open(path, "a")  # noqa: SIM115 (held open for the whole run, closed by close())

    def write(self, record: dict) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def _records_up_to(path: Path, step: int) -> list[str]:
    """Lines of metrics.jsonl with step <= `step`; a torn last line (a killed run) is dropped."""
    kept = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.warning("%s:%d is not JSON (a run killed mid-write?); dropped", path, number)
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    return kept


def _scalars(record: dict, prefix: str = ""):
    """Flatten numeric leaves: lists become name/index."""
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or key in ("step", "type"):
            continue
        if isinstance(value, int | float):
            yield name, value
        elif isinstance(value, dict):
            yield from _scalars(value, f"{name}/")
        elif isinstance(value, list) and value and isinstance(value[0], int | float) and len(value) <= 64:
            for i, v in enumerate(value):
                yield f"{name}/{i}", v


class Loggers:
    """Fan a record out to metrics.jsonl, TensorBoard and W&B."""

    def __init__(self, run_dir: Path, config, resume_step: int | None = None):
        self.metrics = MetricsFile(run_dir / "metrics.jsonl", resume_step)
        self.tb = self.wandb = None
        tc = config.train
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MoelabError(
                    "train.tensorboard=true needs tensorboard: pip install 'moelab[logging]'"
                ) from None
            # on resume, events after the resumed step are dropped, as in metrics.jsonl
            purge = None if resume_step is None else resume_step + 1
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        if tc.wandb:
            try:
                import wandb
            except ImportError:
                raise MoelabError("train.wandb=true needs wandb: pip install 'moelab[logging]'") from None
            from moelab.config import to_dict

            os.environ.setdefault("WANDB_DIR", str(run_dir))
            id_file = run_dir / "wandb_id"  # one W&B run per run directory, reused only by --resume
            if resume_step is None or not id_file.is_file():
                id_file.write_text(uuid.uuid4().hex[:16] + "\n")
            self.wandb = wandb.init(
                project=tc.wandb_project,
                name=run_dir.name,
                config=to_dict(config),
                resume="allow",
                id=id_file.read_text().strip(),
            )

    def log(self, record: dict) -> None:
        self.metrics.write(record)
        step, kind = record.get("step", 0), record.get("type", "train")
        if self.tb is not None:
            for name, value in _scalars(record):
                self.tb.add_scalar(f"{kind}/{name}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in _scalars(record)}, step=step)

    def close(self) -> None:
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
