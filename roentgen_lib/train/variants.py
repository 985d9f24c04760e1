"""03's component variants: one full fine-tune per variant, trained side by side in worker processes."""

from __future__ import annotations

import dataclasses
import functools
import time

from tqdm import tqdm

from roentgen_lib.config import VARIANTS, Config
from roentgen_lib.parallel import run_jobs
from roentgen_lib.train.loop import TrainResult, finetune
from roentgen_lib.train.resume import logged_step


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
    """Fine-tune several runs, `processes` at a time, each in its own process (see `parallel`).

    The runs training the most (steps x components) start first. Each run's progress bar follows the
    steps its log records. Results come back in the order of `configs`.
    """
    bars = {name: tqdm(total=cfg.max_steps, desc=f"train {cfg.run_path.name}", disable=not cfg.progress)
            for name, cfg in configs.items()}
    jobs = {name: (dataclasses.replace(cfg, progress=False),) for name, cfg in configs.items()}
    started = time.time()
    try:
        return run_jobs(finetune, jobs, processes, cost={name: training_cost(cfg) for name, cfg in configs.items()},
                        follow=functools.partial(follow_logs, configs, bars, started))
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
