"""The training loop: fine-tune a Stable Diffusion base on encoded pairs, U-Net, text encoder or both,
full or LoRA (see the package docstring).

Batches come through a DataLoader (workers and prefetch with `loader_workers`) from the pairs' shards
on disk (`latents`); a micro-batch depends only on its micro-step, so a resumed run reads exactly
the data it would have.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from roentgen_lib.checkpoints import write_checkpoint
from roentgen_lib.config import Config
from roentgen_lib.data.dataset import load as load_dataset
from roentgen_lib.data.dataset import read_manifest
from roentgen_lib.files import replace_dir, temporary_sibling, write_file_atomic, write_json_atomic
from roentgen_lib.models import (Base, ProjectedTextEncoder, compute_device, load_base, sample_grid, save_base,
                                 training_precision, weights_fingerprint)
from roentgen_lib.progress import library_progress_bars
from roentgen_lib.text.labels import OBSERVATIONS
from roentgen_lib.train.latents import CACHE_FOLDER, Batch, PairSource, Pairs, dataset_source, encode_pairs
from roentgen_lib.train.loss import CAPTION_DROPOUT, diffusion_loss, validation_loss, zero_terminal_snr_schedule, step_generator
from roentgen_lib.train.resume import (RunLog, inputs_fingerprint, reason_to_set_aside, recorded_seconds_per_step, restore,
                                       set_aside, trained_state)



FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps")  # where torch has AdamW's fused kernel
# Images per VAE pass when encoding or decoding many (latent caches, reconstructions). On 2 CPU cores
# the demo VAE's 64 x 64 activations stay in the caches at 16: per image, encoding takes 3.1 ms and
# encoding + decoding 10.5 ms, against 4.9 and 20.1 ms in batches of 64. Batches of 8-32 give the same
# outputs; a last, smaller batch may round differently.

PEAK_RESET = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class TrainResult:
    """Where a run's outputs are and how it went."""

    run_dir: Path
    output_dir: Path  # pipeline/ (full) or lora/ (LoRA)
    log: Path  # tidy CSV: step, split, metric, value
    steps: int
    seconds_per_step: float
    images_per_second: float
    peak_memory_mb: float
    trainable_parameters: int = 0  # what the optimizer (and an EMA) hold state for

def add_lora(model: torch.nn.Module, rank: int, alpha: int, targets: str) -> None:
    """Freeze `model` and attach trainable LoRA adapters (peft) to the named modules."""
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                 target_modules=[t.strip() for t in targets.split(",")]))

def trained_models(base: Base, cfg: Config) -> dict[str, torch.nn.Module]:
    """Set which weights train (per target and method) and return the trained models by name."""
    base.vae.requires_grad_(False)
    chosen = {}
    for name, model, on, targets in (("unet", base.unet, cfg.train_unet, cfg.unet_lora_targets),
                                     ("text_encoder", base.text_encoder, cfg.train_text_encoder, cfg.text_lora_targets)):
        if not on:
            model.requires_grad_(False)
        elif cfg.method == "lora":
            torch.manual_seed(cfg.seed)  # adapter initialisation draws from the global generator
            add_lora(model, cfg.lora_rank, cfg.lora_alpha, targets)
        else:
            model.requires_grad_(True)
        if on:
            chosen[name] = model
    return chosen

def batch_indices(rows: np.ndarray, batch_size: int, micro_step: int, world: int, rank: int, seed: int) -> np.ndarray:
    """Indices of one micro-batch: a seeded permutation per epoch of `rows`, split across processes.

    `rows` lists the pairs one epoch shows (`np.arange(n)`: each once; see `epoch_rows`). Depends only
    on the micro-step counter, so a resumed run reads exactly the data it would have.
    """
    global_batch = batch_size * world
    per_epoch = max(len(rows) // global_batch, 1)
    epoch, position = divmod(micro_step, per_epoch)
    order = rows[np.random.default_rng([seed, epoch]).permutation(len(rows))]
    chunk = order[position * global_batch : (position + 1) * global_batch]
    return chunk[rank * batch_size : (rank + 1) * batch_size]

def epoch_rows(n: int, labels: dict[str, list], repeats: dict[str, int]) -> np.ndarray:
    """The pairs one epoch shows: each of `n` once, then those `labels` mark positive for each finding in
    `repeats` (times - 1) more times (a pair positive for two of them gains both).

    As kohya's `num_repeats`, chosen by finding instead of by folder: a finding the model learns last
    (the demo's small pneumothorax) is seen more often in the same number of steps.
    """
    missing = sorted(set(repeats) - set(labels))
    if missing:
        raise ValueError(f"repeat_findings names {', '.join(map(repr, missing))}, which the dataset does not label; "
                         f"its findings: {', '.join(labels)}")
    positives = {name: np.flatnonzero(np.asarray(labels[name], dtype=float) == 1) for name in repeats}
    extra = [positives[name] for name, times in repeats.items() for _ in range(times - 1)]
    return np.concatenate([np.arange(n), *extra]).astype(np.int64)

class MicroBatches(Dataset):
    """Micro-batch k of a run (a `Batch` of the pairs' rows), for a DataLoader to prefetch."""

    def __init__(self, pairs: Pairs, rows: np.ndarray, cfg: Config, world: int, rank: int) -> None:
        self.pairs, self.rows, self.cfg, self.world, self.rank = pairs, rows, cfg, world, rank

    def __len__(self) -> int:
        return self.cfg.max_steps * self.cfg.gradient_accumulation

    def __getitem__(self, micro_step: int) -> Batch:
        return self.pairs.batch(batch_indices(self.rows, self.cfg.batch_size, micro_step, self.world, self.rank,
                                              self.cfg.seed))


def micro_batches(pairs: Pairs, rows: np.ndarray, cfg: Config, world: int, rank: int, first: int) -> DataLoader:
    """The run's micro-batches from micro-step `first` on, loaded by `cfg.loader_workers` processes (0: this one)."""
    workers = cfg.loader_workers
    return DataLoader(MicroBatches(pairs, rows, cfg, world, rank), batch_size=None,
                      sampler=range(first, cfg.max_steps * cfg.gradient_accumulation), num_workers=workers,
                      prefetch_factor=2 if workers else None, persistent_workers=False)


def optimizer_groups(params: list[torch.nn.Parameter], encoder: torch.nn.Module | None, cfg: Config) -> list[dict]:
    """The trained `params` as optimizer groups: one, or two with `text_encoder_learning_rate`.

    The second holds those of the trained text `encoder`'s own weights (a domain encoder's, without its
    new projection, which starts from random weights and learns at `learning_rate` like the U-Net).
    """
    if cfg.text_encoder_learning_rate is None or encoder is None:
        return [{"params": params}]
    own = {id(p) for p in (encoder.encoder if isinstance(encoder, ProjectedTextEncoder) else encoder).parameters()}
    groups = [{"params": [p for p in params if id(p) not in own]},
              {"params": [p for p in params if id(p) in own], "lr": cfg.text_encoder_learning_rate}]
    return [group for group in groups if group["params"]]

def fused_adamw_available(params: list[torch.nn.Parameter]) -> bool:
    """True when every parameter sits where torch has AdamW's fused kernel (one pass over all weights)."""
    return all(p.device.type in FUSED_ADAMW_DEVICES for p in params)

def make_optimizer(groups: list[dict], cfg: Config) -> torch.optim.Optimizer:
    """AdamW over `optimizer_groups`, or bitsandbytes' 8-bit AdamW when asked for (clear error when it is not installed)."""
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("use_8bit_adam=True needs bitsandbytes: pip install bitsandbytes") from error
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, weight_decay=1e-2)
    # The fused kernel updates every tensor in one pass: 33 -> 6 ms per step for U-Net + text encoder
    # on 2 CPU cores (the for-loop default touches each of 4.7 M parameters ~10 times).
    params = [p for group in groups for p in group["params"]]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=1e-2, fused=fused_adamw_available(params))

def trained_parameters(models: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters that receive gradients, in a fixed order."""
    return [p for m in models.values() for p in m.parameters() if p.requires_grad]

def save_outputs(base: Base, models: dict[str, torch.nn.Module], cfg: Config, run_dir: Path) -> Path:
    """Final weights: a diffusers pipeline folder (full) or a LoRA adapter folder, written atomically.

    Both carry the noise schedule of the run (it differs from the base's with `zero_terminal_snr`).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _collate_lora_metadata

    target = run_dir / ("pipeline" if cfg.method == "full" else "lora")
    work = temporary_sibling(target)
    try:
        if cfg.method == "full":
            save_base(base, work)
        else:
            # peft's own key format: diffusers' old format (convert_state_dict_to_diffusers) renames only
            # attention adapters, and a file mixing both formats loads without them
            layers = {f"{name}_lora_layers": get_peft_model_state_dict(m, save_embedding_layers=False)
                      for name, m in models.items()}
            StableDiffusionPipeline.save_lora_weights(work, safe_serialization=True, **layers,
                                                      **sorted_sets(_collate_lora_metadata(models)))
            base.noise_scheduler.save_pretrained(work / "scheduler")  # the schedule the adapters learnt
        replace_dir(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target

def sorted_sets(metadata: dict[str, dict]) -> dict[str, dict]:
    """Adapter configs with their sets (peft's target modules) as sorted lists.

    diffusers writes a set in its iteration order, which follows Python's per-process string hashing:
    the same adapters would be saved as files with different bytes from one run to the next.
    """
    return {key: {name: sorted(value) if isinstance(value, set) else value for name, value in config.items()}
            for key, config in metadata.items()}

def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak memory afresh, so it does not report what its process held before (a notebook kernel
    that drew images, a worker that trained another run): on Linux, writing 5 to clear_refs resets VmHWM."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif PEAK_RESET.exists():
        try:
            PEAK_RESET.write_text("5")
        except OSError:  # not permitted: the peak then covers the whole process
            pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since `reset_peak_memory`: CUDA allocations on a GPU, resident set size (VmHWM) on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        return next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM")) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def train_model(cfg: Config, train_data: PairSource, val_data: PairSource, base_path: str | None = None,
                run_dir: Path | None = None, rows: np.ndarray | None = None) -> TrainResult:
    """Fine-tune `cfg.base_model_path` (or `base_path`) on image/prompt pairs; see the package docstring.

    `rows`: the training pairs one epoch shows, repeats included (`epoch_rows`); None: each pair once.

    Resumes from the run's latest checkpoint when `cfg.resume` and one exists. Multi-process runs
    (`accelerate launch`) split each global batch across processes; only the main process writes.
    """
    with library_progress_bars(cfg.progress):
        return run_training(cfg, train_data, val_data, base_path, run_dir, rows)

def run_training(cfg: Config, train_data: PairSource, val_data: PairSource, base_path: str | None,
                 run_dir: Path | None, rows: np.ndarray | None = None) -> TrainResult:
    """The training loop behind `train_model`."""
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation,
                              mixed_precision=training_precision(cfg.mixed_precision, compute_device()))
    main, rank, world, device = (accelerator.is_main_process, accelerator.process_index,
                                 accelerator.num_processes, accelerator.device)
    reset_peak_memory(device)
    run_dir = run_dir or cfg.run_path
    base = load_base(base_path or cfg.base_model_path, cfg.text_encoder, seed=cfg.seed)
    base_weights = weights_fingerprint(base.vae, base.unet, base.text_encoder)
    if cfg.zero_terminal_snr:
        base.noise_scheduler = zero_terminal_snr_schedule(base.noise_scheduler)
    models = trained_models(base, cfg)
    for model in (base.vae, base.unet, base.text_encoder):
        model.to(device)
    if cfg.gradient_checkpointing:
        base.unet.enable_gradient_checkpointing()
        if "text_encoder" in models:
            base.text_encoder.activation_checkpointing_enable()  # transformers 5 renamed gradient_checkpointing_enable
    frozen_text = "text_encoder" not in models
    cache_dir = cfg.models_path / CACHE_FOLDER
    train = encode_pairs(base, train_data, cfg.image_size, frozen_text, cache_dir, cfg.latent_dtype, cfg.progress and main)
    val = encode_pairs(base, val_data, cfg.image_size, frozen_text, cache_dir, cfg.latent_dtype, progress=False)
    rows = np.arange(len(train)) if rows is None else rows
    inputs = inputs_fingerprint(base_weights, train)
    if main and (reason := reason_to_set_aside(run_dir, inputs, cfg.max_steps, cfg.resume)):
        set_aside(run_dir, reason)
    accelerator.wait_for_everyone()
    params = trained_parameters(models)
    optimizer = make_optimizer(optimizer_groups(params, models.get("text_encoder"), cfg), cfg)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=cfg.max_steps)
    # foreach: one pass over all weights (9.5 -> 5.5 ms per step on CPU); on a GPU it would allocate a
    # temporary as large as every trained weight, so GPUs keep the per-tensor loop.
    ema = EMAModel(params, decay=cfg.ema_decay, foreach=device.type == "cpu") if cfg.ema_decay else None
    start = restore(run_dir, models, optimizer, lr_scheduler, ema, cfg) if cfg.resume else 0
    prepared = accelerator.prepare(*models.values())
    wrapped = dict(zip(models, prepared if len(models) > 1 else (prepared,)))
    optimizer = accelerator.prepare(optimizer)
    run_dir.mkdir(parents=True, exist_ok=True)
    log = RunLog(run_dir / "log.csv", start) if main else None
    for model in models.values():
        model.train()
    bar = tqdm(total=cfg.max_steps, initial=start, desc=f"train {run_dir.name}", disable=not (cfg.progress and main))
    images_per_step = cfg.batch_size * cfg.gradient_accumulation * world
    train_seconds = 0.0
    batches = iter(micro_batches(train, rows, cfg, world, rank, first=start * cfg.gradient_accumulation))
    for step in range(start + 1, cfg.max_steps + 1):
        tick = time.perf_counter()
        losses = []
        for micro in range(cfg.gradient_accumulation):
            micro_step = (step - 1) * cfg.gradient_accumulation + micro
            with accelerator.accumulate(*wrapped.values()):
                loss = diffusion_loss(base, wrapped.get("unet", base.unet), wrapped.get("text_encoder", base.text_encoder),
                                      train, next(batches), cfg, step_generator(cfg.seed, rank, micro_step), device,
                                      CAPTION_DROPOUT)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        lr_scheduler.step()
        if ema is not None:
            ema.step(params)
        train_seconds += time.perf_counter() - tick
        step_loss = accelerator.gather(torch.stack(losses).mean()[None]).mean().item()
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{images_per_step * (step - start) / train_seconds:.0f}")
        if main:
            log.add(step, "train", loss=step_loss, lr=lr_scheduler.get_last_lr()[0])
        if step % cfg.validation_every == 0 or step == cfg.max_steps:
            validate(base, models, val, cfg, device, run_dir, step, log if main else None)
        if step % cfg.checkpoint_every == 0 and main:
            states = {"run": cfg.to_dict(), "inputs": inputs, "models": trained_state(models), "optimizer": optimizer.state_dict(),
                      "lr_scheduler": lr_scheduler.state_dict(), **({"ema": ema.state_dict()} if ema else {})}
            write_checkpoint(run_dir, step, states, cfg.checkpoints_total_limit)
        accelerator.wait_for_everyone()
    bar.close()
    if ema is not None:
        ema.copy_to(params)
    steps_run = cfg.max_steps - start
    seconds_per_step = train_seconds / steps_run if steps_run else recorded_seconds_per_step(run_dir)
    output = save_outputs(base, models, cfg, run_dir) if main else run_dir
    result = TrainResult(run_dir=run_dir, output_dir=output, log=run_dir / "log.csv", steps=cfg.max_steps,
                         seconds_per_step=seconds_per_step, images_per_second=images_per_step / seconds_per_step,
                         peak_memory_mb=peak_memory_mb(device), trainable_parameters=sum(p.numel() for p in params))
    if main:
        write_json_atomic(run_dir / "run.json", {"config": cfg.to_dict(), "base_model": base_path or cfg.base_model_path,
                                                 "processes": world, **{k: str(v) if isinstance(v, Path) else v
                                                                        for k, v in result.__dict__.items()}})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result

def validate(base: Base, models, val: Pairs, cfg: Config, device, run_dir: Path, step: int, log: RunLog | None) -> None:
    """Validation loss on held-out pairs and a grid of the validation prompts, if any (main process logs)."""
    for model in models.values():
        model.eval()
    loss = validation_loss(base, val, cfg, device)
    if log is not None:
        log.add(step, "validation", loss=loss)
    if log is not None and cfg.validation_images and cfg.prompts_for_validation:
        pipe = base.pipeline()
        pipe.set_progress_bar_config(disable=True)
        grid = np.concatenate(list(sample_grid(pipe, cfg.prompts_for_validation, cfg.seed)), axis=1)
        write_file_atomic(run_dir / "validation" / f"step-{step:06d}.png",
                          lambda path: Image.fromarray(grid).save(path, format="PNG"))
    for model in models.values():
        model.train()

def finetune(cfg: Config) -> TrainResult:
    """Fine-tune on the dataset 01_data_prep wrote (train split; validation split held out)."""
    data, key = load_dataset(cfg), read_manifest(cfg.dataset_path)["fingerprint"]
    return train_model(cfg, dataset_source(data["train"], f"{key}:train"),
                       dataset_source(data["validation"], f"{key}:validation"), rows=training_rows(cfg, data["train"]))


def training_rows(cfg: Config, part) -> np.ndarray:
    """The pairs of the train split `part` one epoch shows under `cfg.repeat_findings` (each once when it is empty)."""
    repeats = cfg.finding_repeats_per_epoch
    labels = {name: part[name] for name in OBSERVATIONS if name in part.column_names}
    return epoch_rows(len(part), labels, repeats)

def main(argv: list[str] | None = None) -> int:
    """`python -m roentgen_lib.train --profile tiny -p method=lora` (also under `accelerate launch`)."""
    import argparse

    from roentgen_lib import config

    parser = argparse.ArgumentParser(prog="python -m roentgen_lib.train", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="demo", choices=config.PROFILE_NAMES)
    parser.add_argument("-p", dest="params", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--config", type=Path, default=None, help="a whole config as JSON (what `train.launch` passes)")
    args = parser.parse_args(argv)
    if args.config is not None:
        cfg = config.Config(**json.loads(args.config.read_text()))
    else:
        cfg = config.resolve(args.profile, **config.parse_overrides(args.params))
    result = finetune(cfg)
    if PartialState().is_main_process:  # under `accelerate launch`, only the main process saves the outputs
        print(f"saved {result.output_dir} ({result.images_per_second:.0f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
