"""Build the project's own base model: a tiny Stable Diffusion pretrained on the general domain.

Stand-in for Stable Diffusion where its weights cannot be downloaded (tiny and demo profiles):
the autoencoder is trained on general-domain scenes, then the U-Net and CLIP text encoder are
trained from scratch on captioned scenes with the same loop that later fine-tunes on X-rays.
The result is a diffusers pipeline folder (safetensors) at `cfg.base_model_path`, built once.
The paper_smoke profile builds Stable Diffusion's own published architecture with random weights
(`base_architecture="sd-1.5"`, no pretraining): it proves the paper path's code, shapes and
memory offline, never image quality.

    python -m roentgen_lib.pretrain --profile demo      # what `make base` runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel

from roentgen_lib import config
from roentgen_lib.data.general import render_scene
from roentgen_lib.files import replace_dir, temporary_sibling, write_json_atomic
from roentgen_lib.models import Base, images_to_tensor, local_base, save_base
from roentgen_lib.progress import library_progress_bars
from roentgen_lib.text.tokenizer import CONTEXT_LENGTH, load_clip_tokenizer
from roentgen_lib.train import fused_adamw_available, list_source, train_model

# Tiny SD architectures (DESIGN.md): same block types as Stable Diffusion, far fewer channels.
TINY_ARCHITECTURES = {
    "tiny": {"channels": (16, 32, 32), "groups": 8, "cross_attention": 32, "text_width": 32, "text_layers": 1},
    "demo": {"channels": (32, 64, 64), "groups": 16, "cross_attention": 64, "text_width": 64, "text_layers": 2},
}
# Stable Diffusion's published component configurations (its hub repositories' config.json files), where
# they differ from diffusers' defaults, which are SD 1.x's; its VAE is the same in 1.x and 2.x.
SD_UNETS = {"sd-1.5": {"cross_attention_dim": 768, "attention_head_dim": 8},
            "sd-2.1": {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True,
                       "upcast_attention": True}}
SD_TEXT_ENCODERS = {  # CLIP ViT-L/14's text tower (1.x), OpenCLIP ViT-H/14's (2.x)
    "sd-1.5": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "hidden_act": "quick_gelu", "projection_dim": 768},
    "sd-2.1": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23, "num_attention_heads": 16,
               "hidden_act": "gelu", "projection_dim": 512}}
SD_PREDICTION = {"sd-1.5": "epsilon", "sd-2.1": "v_prediction"}
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
          "up_block_types": ("UpDecoderBlock2D",) * 4, "latent_channels": 4}
ARCHITECTURES = (*TINY_ARCHITECTURES, *SD_UNETS)
# Stable Diffusion's noise schedule with 2.x's v-prediction target. On 16x16 latents the noisy
# latent alone predicts epsilon almost as well as with the prompt (true vs shuffled prompts: 0.3%
# loss gap after 600 fine-tuning steps), so an epsilon model never learns to read its prompt; the v
# target asks for the image itself at high noise, where only the prompt can say what to draw
# (gap 4.9%, cardiomegaly AUROC 0.36 -> 0.99 with the same steps).
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                "clip_sample": False, "steps_offset": 1}
SCALING_SCENES = 256  # whole scenes the latent scaling factor is measured on
# Bump when a change alters the base this module builds from the same settings (the scenes, the
# components, the autoencoder's or the training loop's arithmetic): cached bases are then rebuilt.
RECIPE_VERSION = 1
GENERAL_VALIDATION_PROMPTS = ("a large red circle on the left, on a plain white background|"
                              "a small blue square at the top, on a striped yellow background|"
                              "a large green triangle in the centre, on a gradient black background")


def build_components(architecture: str, image_size: int, seed: int) -> Base:
    """Fresh, randomly initialised SD components: a tiny stand-in ("tiny", "demo") or Stable Diffusion's own."""
    if architecture in SD_UNETS:
        return build_stable_diffusion(architecture, image_size, seed)
    arch = TINY_ARCHITECTURES[architecture]
    torch.manual_seed(seed)
    channels, groups = arch["channels"], arch["groups"]
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=channels, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * len(channels), up_block_types=("UpDecoderBlock2D",) * len(channels),
        norm_num_groups=groups, sample_size=image_size)
    # diffusers reads `attention_head_dim` as the number of heads (legacy naming): 2 heads of width
    # 16-32 sample 1.55x faster on CPU than 8 heads of width 4-8, with no loss in alignment measured.
    unet = UNet2DConditionModel(
        sample_size=image_size // 2 ** (len(channels) - 1), in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=channels, norm_num_groups=groups, cross_attention_dim=arch["cross_attention"],
        attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    text_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=arch["text_width"], intermediate_size=2 * arch["text_width"],
        num_hidden_layers=arch["text_layers"], num_attention_heads=2, max_position_embeddings=CONTEXT_LENGTH,
        projection_dim=arch["cross_attention"], bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return Base(vae=vae, unet=unet, text_encoder=CLIPTextModel(text_config), tokenizer=load_clip_tokenizer(),
                noise_scheduler=DDPMScheduler(**SD_SCHEDULER))


def build_stable_diffusion(version: str, image_size: int, seed: int) -> Base:
    """Stable Diffusion 1.5's or 2.1's published architecture ("sd-1.5", "sd-2.1") with random weights."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(sample_size=image_size // 8, **SD_UNETS[version])
    text = CLIPTextConfig(vocab_size=49408, max_position_embeddings=CONTEXT_LENGTH, bos_token_id=49406,
                          eos_token_id=49407, pad_token_id=49407, **SD_TEXT_ENCODERS[version])
    return Base(vae=AutoencoderKL(sample_size=image_size, **SD_VAE), unet=unet, text_encoder=CLIPTextModel(text),
                tokenizer=load_clip_tokenizer(),
                noise_scheduler=DDPMScheduler(**{**SD_SCHEDULER, "prediction_type": SD_PREDICTION[version]}))


def pretrain_vae(vae: AutoencoderKL, size: int, steps: int, batch_size: int, seed: int,
                 progress: bool = True, learning_rate: float = 1e-3, crop: int | None = None) -> list[float]:
    """Train the autoencoder on general-domain scenes (no X-rays): L1 + small KL. Returns losses.

    With `crop`, each step sees a random `crop` x `crop` patch of every scene: the autoencoder is
    convolutional but for one self-attention on its latents, so it learns the same local detail at a
    fraction of the cost per image (Stable Diffusion's was trained on 256 px crops too) and takes many
    more updates in the same time.
    Afterwards the latent scaling factor is set on `SCALING_SCENES` whole scenes so scaled latents
    have unit variance, as Stable Diffusion's 0.18215 does for its VAE.
    """
    params = list(vae.parameters())
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, fused=fused_adamw_available(params))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps, eta_min=learning_rate / 10)
    rng = np.random.default_rng([seed, 1])
    losses = []
    vae.train()
    for _ in tqdm(range(steps), desc="pretrain autoencoder", disable=not progress):
        batch = images_to_tensor([render_scene(rng, size)[0] for _ in range(batch_size)], size)
        if crop is not None and crop < size:
            batch = random_crops(batch, crop, rng)
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = (reconstruction - batch).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    vae.eval()
    with torch.no_grad():
        batch = images_to_tensor([render_scene(rng, size)[0] for _ in range(SCALING_SCENES)], size)
        std = vae.encode(batch).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    return losses


def random_crops(batch: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """One random `crop` x `crop` patch of each image in a (N, C, H, W) batch."""
    corners = rng.integers(0, np.array(batch.shape[-2:]) - crop + 1, size=(len(batch), 2))
    return torch.stack([image[:, y : y + crop, x : x + crop] for image, (y, x) in zip(batch, corners)])


def general_scenes(count: int, size: int, seed: int) -> tuple[list, list[str]]:
    """`count` captioned general-domain scenes (images, captions), determined by `seed`."""
    rng = np.random.default_rng([seed, 2])
    scenes = [render_scene(rng, size) for _ in range(count)]
    return [s[0] for s in scenes], [s[1] for s in scenes]


def pretraining_config(cfg: config.Config) -> config.Config:
    """The fine-tuning config turned into from-scratch training of U-Net and text encoder."""
    return dataclasses.replace(cfg, train_unet=True, train_text_encoder=True, method="full",
                               max_steps=cfg.base_steps, batch_size=cfg.base_batch_size, learning_rate=1e-3, lr_scheduler="cosine",
                               validation_every=cfg.base_steps, checkpoint_every=cfg.base_steps,
                               validation_prompts=GENERAL_VALIDATION_PROMPTS, resume=False, text_encoder=None,
                               zero_terminal_snr=False, timestep_bias=1.0)


def recipe(cfg: config.Config) -> dict:
    """What determines the project's base: `RECIPE_VERSION` and the settings it is built with.

    A cached base whose recipe differs is rebuilt, so a stale base never stands in for the one this
    code would build; a refactor or a comment leaves it alone.
    """
    settings = ("profile", "base_architecture", "image_size", "seed", "base_images", "base_vae_steps", "base_vae_batch_size",
                "base_vae_crop", "base_steps", "base_batch_size")
    return {"version": RECIPE_VERSION, **{k: getattr(cfg, k) for k in settings}}


def base_exists(cfg: config.Config) -> bool:
    """True when the base at `cfg.base_model_path` is usable: any given base, or our own built by this recipe."""
    folder = Path(cfg.base_model_path)
    if not (folder / "model_index.json").is_file():
        return False
    if cfg.base_model is not None:
        return True
    built = folder / "base.json"
    return built.is_file() and json.loads(built.read_text()).get("recipe") == recipe(cfg)


def build_base(cfg: config.Config, force: bool = False) -> Path:
    """The local folder of the base `cfg` fine-tunes: a given `base_model` (fetched when it is a hub id),
    or the project's own, pretrained and saved unless it exists with this recipe (or `force`)."""
    if cfg.base_model is not None:  # a given base, a folder or a hub id, is used as it is
        return Path(local_base(cfg.base_model_path))
    target = Path(cfg.base_model_path)
    if base_exists(cfg) and not force:
        return target
    start = time.perf_counter()
    work = temporary_sibling(target)
    try:
        base = build_components(cfg.base_architecture, cfg.image_size, cfg.seed)
        vae_losses = pretrain_vae(base.vae, cfg.image_size, cfg.base_vae_steps, cfg.base_vae_batch_size, cfg.seed,
                                  cfg.progress, crop=cfg.base_vae_crop) if cfg.base_vae_steps else []
        with library_progress_bars(cfg.progress):
            save_base(base, work / "initial")
        built = work / "initial"
        if cfg.base_steps:
            images, captions = general_scenes(cfg.base_images + 64, cfg.image_size, cfg.seed)
            result = train_model(pretraining_config(cfg), list_source(images[:-64], captions[:-64]),
                                 list_source(images[-64:], captions[-64:]), base_path=str(built), run_dir=work / "run")
            built = result.output_dir
            shutil.copy(result.log, built / "pretraining_log.csv")
        write_json_atomic(built / "base.json", {
            "recipe": recipe(cfg), "vae_final_l1": float(np.mean(vae_losses[-10:])) if vae_losses else None,
            "seconds": round(time.perf_counter() - start, 1)})
        replace_dir(built, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (`make base`)."""
    parser = argparse.ArgumentParser(prog="python -m roentgen_lib.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="demo", choices=config.PROFILE_NAMES[:2])
    parser.add_argument("--force", action="store_true", help="rebuild even if the base exists")
    args = parser.parse_args(argv)
    print(build_base(config.resolve(args.profile), force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
