"""Build the project's own base model: a tiny Stable Diffusion pretrained on the general domain.

Stand-in for Stable Diffusion where its weights cannot be downloaded (tiny and demo profiles):
the autoencoder is trained on general-domain scenes, then the U-Net and CLIP text encoder are
trained from scratch on captioned scenes with the same loop that later fine-tunes on X-rays.
The result is a diffusers pipeline folder (safetensors) at `cfg.base_model_path`, built once.

    python -m roentgen_lib.pretrain --profile demo      # what `make base` runs
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from roentgen_lib import config
from roentgen_lib.data.general import render_scene
from roentgen_lib.files import replace_dir, temporary_sibling, write_json_atomic
from roentgen_lib.models import build_components, pretrain_vae
from roentgen_lib.progress import library_progress_bars
from roentgen_lib.train import train_model

GENERAL_VALIDATION_PROMPTS = ("a large red circle on the left, on a plain white background|"
                              "a small blue square at the top, on a striped yellow background|"
                              "a large green triangle in the centre, on a gradient black background")


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


def recipe_code() -> list[str]:
    """The source code on the path to the base's weights: the general domain, the components, the loop.

    Only this code counts, so editing, say, validation grids or sampling does not rebuild the base.
    """
    from roentgen_lib import models, train
    from roentgen_lib.data import general

    functions = (models.build_components, models.pretrain_vae, models.fused_adamw_available, models.random_crops, models.images_to_tensor,
                 models.save_base, train.cache_pairs, train.encode_images, train.tokenize, train.encode_text,
                 train.trained_models, train.batch_indices,
                 train.diffusion_loss, train.draw_timesteps, train.optimizer_groups, train.make_optimizer, train.step_generator, train.run_training,
                 general_scenes, pretraining_config, build_base)
    constants = repr((models.ARCHITECTURES, models.SD_SCHEDULER, models.SCALING_SCENES, models.VAE_BATCH_SIZE,
                       train.CAPTION_DROPOUT))
    return [inspect.getsource(general), constants, *(inspect.getsource(f) for f in functions)]


def recipe(cfg: config.Config) -> dict:
    """What determines the project's base: the settings used and a hash of the code that builds it.

    A cached base whose recipe differs (code or settings changed) is rebuilt, so a stale base never
    silently stands in for the one this code would build.
    """
    digest = hashlib.sha256("\n".join(recipe_code()).encode())
    settings = ("profile", "image_size", "seed", "base_images", "base_vae_steps", "base_vae_batch_size", "base_vae_crop",
                "base_steps", "base_batch_size")
    return {"code": digest.hexdigest(), **{k: getattr(cfg, k) for k in settings}}


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
    """Pretrain and save the project's base for `cfg.profile` unless it exists with this recipe (or `force`)."""
    target = Path(cfg.base_model_path)
    if base_exists(cfg) and not force:
        return target
    if cfg.base_model is not None:
        raise config.ConfigError(f"base_model={cfg.base_model!r} is not built here; only the project's "
                                 "own base (base_model=None) can be pretrained locally")
    start = time.perf_counter()
    work = temporary_sibling(target)
    try:
        base = build_components(cfg.profile, cfg.image_size, cfg.seed)
        vae_losses = pretrain_vae(base.vae, cfg.image_size, cfg.base_vae_steps, cfg.base_vae_batch_size, cfg.seed,
                                  cfg.progress, crop=cfg.base_vae_crop)
        with library_progress_bars(cfg.progress):
            base.pipeline().save_pretrained(work / "initial", safe_serialization=True)
        images, captions = general_scenes(cfg.base_images + 64, cfg.image_size, cfg.seed)
        result = train_model(pretraining_config(cfg), (images[:-64], captions[:-64]), (images[-64:], captions[-64:]),
                             base_path=str(work / "initial"), run_dir=work / "run")
        shutil.copy(result.log, result.output_dir / "pretraining_log.csv")
        write_json_atomic(result.output_dir / "base.json", {
            "recipe": recipe(cfg), "vae_final_l1": float(np.mean(vae_losses[-10:])),
            "seconds": round(time.perf_counter() - start, 1)})
        replace_dir(result.output_dir, target)
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
