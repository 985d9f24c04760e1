"""Stable Diffusion's denoising objective on encoded pairs: what fine-tuning minimises and evaluation's
forgetting measure reports (a model's loss on general-domain scenes).

Every random draw of a micro-batch (latent sample, noise, timesteps, dropped captions) comes from a
generator seeded by (seed, rank, micro-step), so a resumed run draws exactly what an uninterrupted
one would, and a validation loss is measured on the same noise at every step.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from roentgen_lib.config import Config
from roentgen_lib.models import Base
from roentgen_lib.train.latents import Batch, Pairs

CAPTION_DROPOUT = 0.1  # share of prompts replaced by "" so classifier-free guidance works
VALIDATION_SEED = 12345


def diffusion_loss(base: Base, unet, text_encoder, pairs: Pairs, batch: Batch, cfg: Config,
                   generator: torch.Generator, device: torch.device, dropout: float) -> torch.Tensor:
    """Denoising loss of one micro-batch of `pairs` (epsilon or v target, optional Min-SNR weights)."""
    n = len(batch.mean)
    noise_draw = torch.randn(batch.mean.shape, generator=generator)
    latents = (batch.mean + batch.std * noise_draw) * base.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=generator)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn((n, latents.shape[1], 1, 1), generator=generator)
    scheduler = base.noise_scheduler
    timesteps = draw_timesteps(n, scheduler.config.num_train_timesteps, cfg, generator)
    dropped = torch.rand(n, generator=generator) < dropout
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if batch.states is not None:
        states = torch.where(dropped[:, None, None], pairs.empty_state, batch.states).to(device)
    else:
        states = text_encoder(torch.where(dropped[:, None], pairs.empty_ids, batch.ids).to(device))[0]
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


def step_generator(seed: int, rank: int, micro_step: int) -> torch.Generator:
    """The noise/timestep generator of one micro-step, re-seeded from (seed, rank, micro-step).

    No random state carries from step to step, so a resumed run draws exactly the same noise
    as an uninterrupted one without saving generator states.
    """
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, micro_step]).generate_state(1)[0]))


@torch.no_grad()
def validation_loss(base: Base, pairs: Pairs, cfg: Config, device: torch.device, limit: int = 64,
                    text_order: np.ndarray | None = None) -> float:
    """Mean denoising loss on held-out pairs with fixed noise, so values compare across steps.

    `text_order`: row k is shown the text of row `text_order[k]` (shuffled captions); None: its own.
    """
    losses = []
    for start in range(0, min(limit, len(pairs)), cfg.batch_size):
        index = np.arange(start, min(start + cfg.batch_size, limit, len(pairs)))
        batch = pairs.batch(index, None if text_order is None else text_order[index])
        generator = step_generator(VALIDATION_SEED, 0, start)
        losses.append(diffusion_loss(base, base.unet, base.text_encoder, pairs, batch, cfg, generator, device, 0.0).item())
    return float(np.mean(losses)) if losses else float("nan")
