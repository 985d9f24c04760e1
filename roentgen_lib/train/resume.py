"""Resuming a run: checkpoints it may continue, runs it must set aside, and its log.

A checkpoint records the run's settings and what it started from (the base's weights and the encoded
pairs); a run resumes from it only when both match and it was made for the same `max_steps`,
otherwise the old run folder is moved aside and training starts afresh. Resumed on the CPU, a run
ends with the same bits as an uninterrupted one.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import torch

from roentgen_lib.checkpoints import latest_checkpoint, load_state, read_checkpoint
from roentgen_lib.config import EVALUATION_FIELDS, SAMPLING_FIELDS, Config
from roentgen_lib.files import write_file_atomic
from roentgen_lib.train.latents import Pairs


def trained_state(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """The trained tensors of each model (all weights for full fine-tuning, adapters for LoRA)."""
    return {name: {k: p.detach() for k, p in m.named_parameters() if p.requires_grad} for name, m in models.items()}

# Fields that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_CHANGES = {"max_steps", "lora_max_steps", "text_encoder_max_steps", "worker_processes", "resume", "progress",
                     "data_workers", "loader_workers", "validation_every", "checkpoint_every", "checkpoints_total_limit",
                     "validation_prompts", "figures_dir", "run_name", "models_dir", "output_dir", "base_model", "base_dir",
                     "full_variants", *SAMPLING_FIELDS, *EVALUATION_FIELDS}

def check_same_run(saved: dict, cfg: Config, folder: Path) -> None:
    """Refuse to resume a checkpoint made with different training settings."""
    current = cfg.to_dict()
    changed = sorted(k for k, v in saved.items() if k not in RESUMABLE_CHANGES and current.get(k) != v)
    if changed:
        raise ValueError(f"{folder} was written with different {', '.join(changed)}; use another run_name "
                         "or resume=False to start over")


def inputs_fingerprint(base_weights: str, pairs: Pairs) -> str:
    """What a run starts from: the base's weights and the encoded training pairs (see `latents.Pairs.key`)."""
    return hashlib.sha256(f"{base_weights}:{pairs.key}".encode()).hexdigest()


def reason_to_set_aside(run_dir: Path, inputs: str, max_steps: int, resume: bool) -> str | None:
    """Why this run must not continue the checkpoints in `run_dir` (None when it may, or there are none).

    They start from another base or dataset (say, a base rebuilt by changed code), or were made for
    another `max_steps`, over which their learning-rate schedule runs: resuming either would not end
    where an uninterrupted run does. With `resume=False` they would outrank this run's checkpoints
    (the newest steps are kept) and be what a later resume continues from.
    """
    folder = latest_checkpoint(run_dir)
    if folder is None:
        return None
    if not resume:
        return "has checkpoints and resume=False"
    saved = load_state(folder, "inputs") if (folder / "inputs.json").is_file() else None
    planned = load_state(folder, "run").get("max_steps") if (folder / "run.json").is_file() else max_steps
    if saved != inputs:
        return "was trained from a different base model or dataset"
    if planned != max_steps:
        return f"was trained for max_steps={planned}, not {max_steps} (its learning-rate schedule spans them)"
    return None

def set_aside(run_dir: Path, reason: str) -> None:
    """Rename a run folder to `<name>.stale-N` (the first free N) and warn why: kept, never deleted."""
    n = 1
    while run_dir.with_name(f"{run_dir.name}.stale-{n}").exists():
        n += 1
    aside = run_dir.with_name(f"{run_dir.name}.stale-{n}")
    os.replace(run_dir, aside)
    warnings.warn(f"{run_dir} {reason}; moved it to {aside.name} and starting this run afresh", stacklevel=2)

def restore(run_dir: Path, models, optimizer, lr_scheduler, ema, cfg: Config) -> int:
    """Load the latest checkpoint of a run into the training objects; return its step (0 if none)."""
    folder = latest_checkpoint(run_dir)
    if folder is None:
        return 0
    step, states = read_checkpoint(folder)
    if "run" not in states:
        raise ValueError(f"{folder} records no run settings (written by an older version); use resume=False")
    check_same_run(states["run"], cfg, folder)
    for name, model in models.items():
        model.load_state_dict(states["models"][name], strict=False)
        # saved weights that are no trained parameter of this model (this includes load_state_dict's "unexpected")
        foreign = sorted(set(states["models"][name]) - {k for k, _ in model.named_parameters()})
        if foreign:
            raise ValueError(f"{folder}: weights for {name} do not fit this model (e.g. {', '.join(foreign[:3])})")
    optimizer.load_state_dict(states["optimizer"])
    lr_scheduler.load_state_dict(states["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(states["ema"])
    return step

class RunLog:
    """A tidy CSV (step, split, metric, value) that survives resumption without duplicate rows."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        rows = []
        if path.exists() and resume_step:
            with path.open() as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        write_file_atomic(path, functools.partial(self.write_rows, rows=rows))  # a crash keeps the old log whole

    @staticmethod
    def write_rows(path: Path, rows: list[dict]) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "split", "metric", "value"])
            writer.writeheader()
            writer.writerows(rows)

    def add(self, step: int, split: str, **metrics: float) -> None:
        with self.path.open("a", newline="") as handle:
            writer = csv.writer(handle)
            for metric, value in metrics.items():
                writer.writerow([step, split, metric, f"{value:.6g}"])

def recorded_seconds_per_step(run_dir: Path) -> float:
    """Seconds per step the finished run recorded (a rerun of a finished run trains no step itself)."""
    record = run_dir / "run.json"
    return float(json.loads(record.read_text()).get("seconds_per_step", math.nan)) if record.is_file() else math.nan

def logged_step(run_dir: Path, since: float = 0.0) -> int:
    """The last step a run's `log.csv` records (0 when it has none yet, or none written after `since`)."""
    try:
        if (run_dir / "log.csv").stat().st_mtime < since:
            return 0
        with (run_dir / "log.csv").open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256))
            lines = handle.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return 0
    rows = [line.split(",") for line in lines[1:]]  # the first line may be cut; a last one still being written
    steps = [int(row[0]) for row in rows if len(row) == 4 and row[0].isdigit() and row[3]]
    return steps[-1] if steps else 0
