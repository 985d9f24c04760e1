"""Fine-tune a Stable Diffusion base on image/prompt pairs: U-Net, text encoder or both, full or LoRA.

One loop serves every combination and every profile. What users of diffusers' and kohya's training
scripts expect is here: accelerate (one process, or many through `accelerate launch`), mixed
precision, gradient accumulation and checkpointing, EMA, Min-SNR weighting, noise offset, warm-up
schedules, 8-bit Adam (bitsandbytes), gradient clipping, caption dropout for classifier-free guidance.
VAE latents are cached once (and text-encoder outputs too when the text encoder is frozen), so each
step runs only what it trains. Checkpoints (see `checkpoints`) resume to the same bits on CPU.

Usage::

    cfg = config.resolve("demo", method="lora", train_text_encoder=True)
    result = finetune(cfg)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import math
import os
import resource
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from roentgen_lib.checkpoints import latest_checkpoint, load_state, read_checkpoint, write_checkpoint
from roentgen_lib.config import EVALUATION_FIELDS, SAMPLING_FIELDS, VARIANTS, Config
from roentgen_lib.data.dataset import load as load_dataset
from roentgen_lib.files import replace_dir, temporary_sibling, write_file_atomic, write_json_atomic
from roentgen_lib.models import (VAE_BATCH_SIZE, Base, ProjectedTextEncoder, images_to_tensor, load_base, sample_grid,
                                 save_base, weights_fingerprint)
from roentgen_lib.parallel import run_jobs
from roentgen_lib.progress import library_progress_bars
from roentgen_lib.text.labels import OBSERVATIONS

CAPTION_DROPOUT = 0.1  # share of prompts replaced by "" so classifier-free guidance works
VALIDATION_SEED = 12345
LATENT_CACHE = ".latent_cache"  # folder under models_dir holding VAE latents shared by the runs
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps")  # where torch has AdamW's fused kernel
# Images per VAE pass when encoding or decoding many (latent caches, reconstructions). On 2 CPU cores
# the demo VAE's 64 x 64 activations stay in the caches at 16: per image, encoding takes 3.1 ms and
# encoding + decoding 10.5 ms, against 4.9 and 20.1 ms in batches of 64. Batches of 8-32 give the same
# outputs; a last, smaller batch may round differently.


@dataclass
class Pairs:
    """Image/prompt pairs after caching: latent distribution and token ids (or text states)."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    input_ids: torch.Tensor
    text_states: torch.Tensor | None = None  # cached when the text encoder is frozen

    def __len__(self) -> int:
        return len(self.latent_mean)


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


def load_pairs(cfg: Config, split: str) -> tuple[list[Image.Image], list[str]]:
    """Images and prompts of one split of the dataset 01_data_prep built for `cfg`."""
    return split_pairs(load_dataset(cfg)[split])


def split_pairs(part) -> tuple[list[Image.Image], list[str]]:
    """Images and prompts of a loaded dataset split."""
    return list(part["image"]), list(part["prompt"])


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's context (77 for CLIP)."""
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(text_encoder, input_ids: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Text-encoder hidden states for token ids, in batches."""
    device = next(text_encoder.parameters()).device
    return torch.cat([text_encoder(input_ids[i : i + batch_size].to(device))[0].cpu()
                      for i in range(0, len(input_ids), batch_size)])


@torch.no_grad()
def cache_pairs(base: Base, images: list[Image.Image], prompts: list[str], size: int,
                cache_text: bool, batch_size: int = VAE_BATCH_SIZE, progress: bool = True,
                cache_dir: Path | None = None) -> Pairs:
    """Encode every image once with the frozen VAE (and prompts, if the text encoder is frozen).

    With `cache_dir`, latents are kept in a file named by the VAE's weights and the images' bytes,
    so the runs of one notebook (and of later ones) encode each dataset once.
    """
    cache = latent_cache_file(base.vae, images, size, cache_dir) if cache_dir is not None else None
    if cache is not None and cache.is_file():
        saved = load_file(str(cache))
        means, stds = saved["mean"], saved["std"]
    else:
        means, stds = encode_images(base.vae, images, size, batch_size, progress)
        if cache is not None:
            write_file_atomic(cache, lambda path: save_file({"mean": means, "std": stds}, str(path)))
    ids = tokenize(base.tokenizer, [*prompts, ""])
    pairs = Pairs(means, stds, ids)
    if cache_text:
        pairs.text_states = encode_text(base.text_encoder, ids)
    return pairs


@torch.no_grad()
def encode_images(vae, images: list[Image.Image], size: int, batch_size: int, progress: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE's latent distribution for each image."""
    device = next(vae.parameters()).device
    means, stds = [], []
    for i in tqdm(range(0, len(images), batch_size), desc="cache latents", disable=not progress):
        dist = vae.encode(images_to_tensor(images[i : i + batch_size], size).to(device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    # The encoder hands back channels-last views; a contiguous copy makes freshly encoded and cached
    # latents the same tensors (memory format changes the U-Net's float rounding, so the results).
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def latent_cache_file(vae, images: list[Image.Image], size: int, cache_dir: Path) -> Path:
    """The cache file of these images' latents under this VAE (a digest of weights, size and pixels)."""
    digest = hashlib.sha256(f"{weights_fingerprint(vae)}:{size}".encode())
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return Path(cache_dir) / f"latents-{digest.hexdigest()[:32]}.safetensors"


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


def diffusion_loss(base: Base, unet, text_encoder, pairs: Pairs, idx: np.ndarray, cfg: Config,
                   generator: torch.Generator, device: torch.device, dropout: float) -> torch.Tensor:
    """Denoising loss of one micro-batch (epsilon or v target, optional Min-SNR weights)."""
    n = len(idx)
    index = torch.from_numpy(idx)
    noise_draw = torch.randn(pairs.latent_mean[index].shape, generator=generator)
    latents = (pairs.latent_mean[index] + pairs.latent_std[index] * noise_draw) * base.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn((n, latents.shape[1], 1, 1), generator=generator)
    scheduler = base.noise_scheduler
    timesteps = draw_timesteps(n, scheduler.config.num_train_timesteps, cfg, generator)
    dropped = torch.rand(n, generator=generator) < dropout
    text_index = torch.where(dropped, torch.tensor(len(pairs.input_ids) - 1), index)  # last row is ""
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if pairs.text_states is not None:
        states = pairs.text_states[text_index].to(device)
    else:
        states = text_encoder(pairs.input_ids[text_index].to(device))[0]
    prediction = unet(noisy, timesteps, states).sample
    epsilon = scheduler.config.prediction_type == "epsilon"
    target = noise if epsilon else scheduler.get_velocity(latents, noise, timesteps)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma:
        snr = compute_snr(scheduler, timesteps)
        weights = torch.clamp(snr, max=cfg.snr_gamma) / (snr if epsilon else snr + 1)
        per_sample = per_sample * weights
    return per_sample.mean()


def draw_timesteps(n: int, total: int, cfg: Config, generator: torch.Generator) -> torch.Tensor:
    """`n` training timesteps: uniform, or with those from `timestep_bias_start` on `timestep_bias` times as likely.

    Favouring high noise teaches what only the prompt can decide there, such as the side of a finding.
    """
    if cfg.timestep_bias == 1.0:
        return torch.randint(0, total, (n,), generator=generator)
    weights = torch.ones(total)
    weights[min(cfg.timestep_bias_start, total):] = cfg.timestep_bias
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def zero_terminal_snr_schedule(scheduler: DDPMScheduler) -> DDPMScheduler:
    """The same schedule rescaled to zero SNR at its last step, sampled from there (trailing spacing).

    Stable Diffusion's schedule leaves a trace of the image at its noisiest step, so a sampler
    starting from pure noise reads a layout from the noise; with zero terminal SNR only the prompt
    can decide it (Lin et al. 2024). Needs v-prediction: epsilon is undefined at zero SNR.
    """
    if scheduler.config.prediction_type != "v_prediction":
        raise ValueError(f"zero_terminal_snr needs a v-prediction base; this one predicts {scheduler.config.prediction_type!r}")
    return DDPMScheduler.from_config(scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing")


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


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """The noise/timestep generator of one micro-step, re-seeded from (seed, rank, micro-step).

    No random state carries from step to step, so a resumed run draws exactly the same noise
    as an uninterrupted one without saving generator states.
    """
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0]))


@torch.no_grad()
def validation_loss(base: Base, pairs: Pairs, cfg: Config, device: torch.device, limit: int = 64) -> float:
    """Mean denoising loss on held-out pairs with fixed noise, so values compare across steps."""
    losses = []
    for start in range(0, min(limit, len(pairs)), cfg.batch_size):
        idx = np.arange(start, min(start + cfg.batch_size, limit, len(pairs)))
        generator = step_generator(VALIDATION_SEED, 0, start)
        losses.append(diffusion_loss(base, base.unet, base.text_encoder, pairs, idx, cfg, generator, device, 0.0).item())
    return float(np.mean(losses)) if losses else float("nan")


def trained_parameters(models: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    """The parameters that receive gradients, in a fixed order."""
    return [p for m in models.values() for p in m.parameters() if p.requires_grad]


def trained_state(models: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """The trained tensors of each model (all weights for full fine-tuning, adapters for LoRA)."""
    return {name: {k: p.detach() for k, p in m.named_parameters() if p.requires_grad} for name, m in models.items()}


# Fields that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_CHANGES = {"max_steps", "lora_max_steps", "text_encoder_max_steps", "worker_processes", "resume", "progress",
                     "data_workers", "validation_every", "checkpoint_every", "checkpoints_total_limit",
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
    """What a run starts from: the base's weights and the cached training data (latents and token ids)."""
    digest = hashlib.sha256(base_weights.encode())
    for tensor in (pairs.latent_mean, pairs.latent_std, pairs.input_ids):
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_model(cfg: Config, train_data: tuple[list, list[str]], val_data: tuple[list, list[str]],
                base_path: str | None = None, run_dir: Path | None = None, rows: np.ndarray | None = None) -> TrainResult:
    """Fine-tune `cfg.base_model_path` (or `base_path`) on (images, prompts); see the module docstring.

    `rows`: the training pairs one epoch shows, repeats included (`epoch_rows`); None: each pair once.

    Resumes from the run's latest checkpoint when `cfg.resume` and one exists. Multi-process runs
    (`accelerate launch`) split each global batch across processes; only the main process writes.
    """
    with library_progress_bars(cfg.progress):
        return run_training(cfg, train_data, val_data, base_path, run_dir, rows)


def run_training(cfg: Config, train_data: tuple[list, list[str]], val_data: tuple[list, list[str]],
                 base_path: str | None, run_dir: Path | None, rows: np.ndarray | None = None) -> TrainResult:
    """The training loop behind `train_model`."""
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation,
                              mixed_precision=cfg.mixed_precision)
    main, rank, world, device = (accelerator.is_main_process, accelerator.process_index,
                                 accelerator.num_processes, accelerator.device)
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
    cache_dir = cfg.models_path / LATENT_CACHE
    train = cache_pairs(base, *train_data, cfg.image_size, frozen_text, progress=cfg.progress and main, cache_dir=cache_dir)
    val = cache_pairs(base, *val_data, cfg.image_size, frozen_text, progress=False, cache_dir=cache_dir)
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
    for step in range(start + 1, cfg.max_steps + 1):
        tick = time.perf_counter()
        losses = []
        for micro in range(cfg.gradient_accumulation):
            micro_step = (step - 1) * cfg.gradient_accumulation + micro
            idx = batch_indices(rows, cfg.batch_size, micro_step, world, rank, cfg.seed)
            with accelerator.accumulate(*wrapped.values()):
                loss = diffusion_loss(base, wrapped.get("unet", base.unet), wrapped.get("text_encoder", base.text_encoder),
                                      train, idx, cfg, step_generator(cfg.seed, rank, micro_step), device, CAPTION_DROPOUT)
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
                         peak_memory_mb=peak_memory_mb(device))
    if main:
        write_json_atomic(run_dir / "run.json", {"config": cfg.to_dict(), "base_model": base_path or cfg.base_model_path,
                                                 "processes": world, **{k: str(v) if isinstance(v, Path) else v
                                                                        for k, v in result.__dict__.items()}})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def recorded_seconds_per_step(run_dir: Path) -> float:
    """Seconds per step the finished run recorded (a rerun of a finished run trains no step itself)."""
    record = run_dir / "run.json"
    return float(json.loads(record.read_text()).get("seconds_per_step", math.nan)) if record.is_file() else math.nan


def validate(base: Base, models, val: Pairs, cfg: Config, device, run_dir: Path, step: int, log: RunLog | None) -> None:
    """Validation loss on held-out pairs and a grid of the validation prompts (main process logs)."""
    for model in models.values():
        model.eval()
    loss = validation_loss(base, val, cfg, device)
    if log is not None:
        log.add(step, "validation", loss=loss)
        pipe = base.pipeline()
        pipe.set_progress_bar_config(disable=True)
        grid = np.concatenate(list(sample_grid(pipe, cfg.prompts_for_validation, cfg.seed)), axis=1)
        write_file_atomic(run_dir / "validation" / f"step-{step:06d}.png",
                          lambda path: Image.fromarray(grid).save(path, format="PNG"))
    for model in models.values():
        model.train()


def finetune(cfg: Config) -> TrainResult:
    """Fine-tune on the dataset 01_data_prep wrote (train split; validation split held out)."""
    train_split = load_dataset(cfg)["train"]
    return train_model(cfg, split_pairs(train_split), load_pairs(cfg, "validation"),
                       rows=training_rows(cfg, train_split))


def training_rows(cfg: Config, part) -> np.ndarray:
    """The pairs of the train split `part` one epoch shows under `cfg.repeat_findings` (each once when it is empty)."""
    repeats = cfg.finding_repeats_per_epoch
    labels = {name: part[name] for name in OBSERVATIONS if name in part.column_names}
    return epoch_rows(len(part), labels, repeats)


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


def main(argv: list[str] | None = None) -> int:
    """`python -m roentgen_lib.train --profile tiny -p method=lora` (also under `accelerate launch`)."""
    import argparse

    from roentgen_lib import config

    parser = argparse.ArgumentParser(prog="python -m roentgen_lib.train", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="demo", choices=config.PROFILE_NAMES)
    parser.add_argument("-p", dest="params", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    result = finetune(config.resolve(args.profile, **config.parse_overrides(args.params)))
    if PartialState().is_main_process:  # under `accelerate launch`, only the main process saves the outputs
        print(f"saved {result.output_dir} ({result.images_per_second:.0f} images/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
