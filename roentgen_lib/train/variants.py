"""Launching runs: one run over `num_processes` processes (GPUs), and 03's component variants side by side."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from roentgen_lib.config import VARIANTS, Config
from roentgen_lib.models import compute_device, training_precision
from roentgen_lib.parallel import run_jobs
from roentgen_lib.train.loop import TrainResult, finetune
from roentgen_lib.train.resume import logged_step


def launch(cfg: Config) -> TrainResult:
    """Fine-tune one run: in this process, or data-parallel over `cfg.num_processes` processes through
    `accelerate launch` (one per GPU; gloo processes on a CPU), as a notebook or the runner asks for."""
    if cfg.num_processes == 1:
        return finetune(cfg)
    with tempfile.TemporaryDirectory() as folder:
        settings = Path(folder) / "config.json"
        settings.write_text(json.dumps(cfg.to_dict()))
        env = {**os.environ, **({} if torch.cuda.is_available() else {"ACCELERATE_USE_CPU": "1"})}
        subprocess.run(launch_command(cfg, settings), check=True, env=env)
    return read_result(cfg.run_path)


def launch_command(cfg: Config, settings: Path) -> list[str]:
    """`accelerate launch -m roentgen_lib.train --config settings` over `cfg.num_processes` processes.

    The torchrun launcher (`--multi_gpu`) serves GPUs and, with ACCELERATE_USE_CPU=1, CPU processes too;
    accelerate's own CPU launcher needs mpirun.
    """
    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(cfg.num_processes),
            "--num_machines", "1", "--mixed_precision", training_precision(cfg.mixed_precision, compute_device()), "--dynamo_backend", "no",
            "--main_process_port", str(port), "-m", "roentgen_lib.train", "--config", str(settings)]


def read_result(run_dir: Path) -> TrainResult:
    """The result a finished run recorded in its run.json."""
    record = json.loads((run_dir / "run.json").read_text())
    return TrainResult(**{field.name: Path(record[field.name]) if field.type == "Path" else record[field.name]
                          for field in dataclasses.fields(TrainResult) if field.name in record})


def variant_configs(cfg: Config) -> dict[str, Config]:
    """One full fine-tuning config per component variant named in `cfg.full_variants`.

    Runs are named after their variant (`full_unet`, `full_te`, `full_unet_te`); a `run_name` prefixes
    those names (`seed1_full_unet`, ...), so a sweep does not collide with the default runs. The
    text-encoder-only run takes `text_encoder_max_steps` when the profile sets it.
    """
    configs = {}
    for name in cfg.variant_names:
        steps = cfg.text_encoder_max_steps if VARIANTS[name] == (False, True) and cfg.text_encoder_max_steps else cfg.max_steps
        variant = dataclasses.replace(cfg, method="full", train_unet=VARIANTS[name][0],
                                      train_text_encoder=VARIANTS[name][1], run_name=None, max_steps=steps)
        if cfg.run_name:
            variant = dataclasses.replace(variant, run_name=f"{cfg.run_name}_{variant.run_path.name}")
        configs[name] = variant
    return configs

def train_runs(configs: dict[str, Config], processes: int = 1) -> dict[str, TrainResult]:
    """Fine-tune several runs, `processes` at a time, each in its own process (and on its own GPU where
    there are several; see `parallel`). Runs spread over several processes themselves go one at a time.

    The runs training the most (steps x components) start first. Each run's progress bar follows the
    steps its log records. Results come back in the order of `configs`.
    """
    if any(cfg.num_processes > 1 for cfg in configs.values()):
        processes = 1
    bars = {name: tqdm(total=cfg.max_steps, desc=f"train {cfg.run_path.name}", disable=not cfg.progress)
            for name, cfg in configs.items()}
    jobs = {name: (dataclasses.replace(cfg, progress=False),) for name, cfg in configs.items()}
    started = time.time()
    try:
        return run_jobs(launch, jobs, processes, cost={name: training_cost(cfg) for name, cfg in configs.items()},
                        follow=functools.partial(follow_logs, configs, bars, started), fresh=True)
    finally:
        for bar in bars.values():
            bar.close()

def training_cost(cfg: Config) -> int:
    """What a run costs, roughly: its steps times the components it trains."""
    return cfg.max_steps * (cfg.train_unet + cfg.train_text_encoder)

def follow_logs(configs: dict[str, Config], bars: dict[str, tqdm], since: float) -> None:
    """Move each run's progress bar to the last step its log, once rewritten after `since`, records.

    A log older than `since` is the previous run's: a run started afresh (resume=False) or resumed
    from an earlier checkpoint rewrites it first, and until then the bar would show that run's steps.
    """
    for name, cfg in configs.items():
        bars[name].update(logged_step(cfg.run_path, since) - bars[name].n)
