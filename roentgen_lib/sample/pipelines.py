"""Load a base or a fine-tuned model and draw from it: text-to-image with seeded, fixed batches.

Every image is drawn from its own seeded generator, so a (model, prompt, seed, settings) tuple names
one image. Bad input (an empty prompt, an unknown scheduler, a missing run folder) raises
`SamplingError` naming the problem before diffusers is called; a prompt longer than the text
encoder's context warns and shows the part that is dropped. Models load onto the accelerator when
there is one, in the profile's mixed precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils import logging as diffusers_logging
from PIL import Image
from transformers.utils import logging as transformers_logging

from roentgen_lib.config import Config, did_you_mean, relative
from roentgen_lib.models import compute_device, generate_images, inference_dtype, load_pipeline, weights_fingerprint
from roentgen_lib.text.tokenizer import truncated_part

SCHEDULERS = {"dpmsolver++": DPMSolverMultistepScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
              "euler_ancestral": EulerAncestralDiscreteScheduler, "pndm": PNDMScheduler}
SCHEDULER_OPTIONS = {"pndm": {"skip_prk_steps": True}, "ddim": {"set_alpha_to_one": False}}  # as SD 1.x ships them
RUN_OUTPUTS = ("pipeline", "lora")  # what a fine-tuning run leaves: a full pipeline or LoRA adapters


class SamplingError(ValueError):
    """Bad input to a sampler; the message names what is wrong and what is allowed."""


@dataclass(frozen=True)
class SamplingSettings:
    """How images are drawn; together with the model, prompt and seed this names an image."""

    scheduler: str = "dpmsolver++"
    steps: int = 20
    guidance_scale: float = 4.0
    negative_prompt: str = ""
    batch_size: int = 64

    @classmethod
    def from_config(cls, cfg: Config) -> "SamplingSettings":
        return cls(cfg.scheduler, cfg.sampling_steps, cfg.guidance_scale, cfg.negative_prompt, cfg.sample_batch_size)

    def replace(self, **changes) -> "SamplingSettings":
        return dataclasses.replace(self, **changes)


@dataclass
class Model:
    """A loaded sampling pipeline and what identifies its weights."""

    name: str
    pipe: StableDiffusionPipeline
    fingerprint: str  # SHA-256 of every weight (and the LoRA scale): same fingerprint, same images
    source: str
    load_args: tuple | None = None  # `load_model(*load_args)` loads it again (in a worker process); None: built in memory


def available_models(cfg: Config) -> dict[str, Path]:
    """"base" and every finished fine-tuning run under the models folder, by run name.

    Hidden folders and runs set aside as `<run>.stale-N` (trained from another base or dataset) are
    not models of this world and are left out.
    """
    found = {"base": Path(cfg.base_model_path)}
    if cfg.models_path.is_dir():
        runs = (p for p in cfg.models_path.iterdir() if p.is_dir() and not p.name.startswith(".") and ".stale-" not in p.name)
        for run in sorted(runs):
            output = next((run / name for name in RUN_OUTPUTS if (run / name).is_dir()), None)
            if output is not None:
                found[run.name] = output
    return found


def model_fingerprint(pipe: StableDiffusionPipeline, lora_scale: float) -> str:
    """SHA-256 over every weight of U-Net, text encoder and VAE, plus the noise schedule and LoRA scale."""
    schedule = json.dumps(dict(pipe.scheduler.config), sort_keys=True, default=str)
    return weights_fingerprint(pipe.unet, pipe.text_encoder, pipe.vae, extra=f"lora_scale={lora_scale};{schedule}")


def load_model(cfg: Config, name: str = "base", lora_scale: float | None = None) -> Model:
    """The base (`"base"`) or a fine-tuning run by folder name; LoRA adapters at `lora_scale` (default cfg's).

    On the GPU when there is one, in the profile's mixed precision; on the CPU in float32.
    """
    models = available_models(cfg)
    if name not in models:
        raise SamplingError(f"no finished run {name!r} in {relative(cfg.models_path)}{did_you_mean(name, models)}; "
                            f"available: {', '.join(models)}. Fine-tuning runs are made by 02_finetune_lora and 03_finetune_full")
    base = Path(cfg.base_model_path)
    if base.is_absolute() and not (base / "model_index.json").is_file():
        raise SamplingError(f"no base model at {relative(base)} (no model_index.json): build the project's "
                            "base with `make base` (or run 02_finetune_lora), or set base_model")
    scale = cfg.lora_scale if lora_scale is None else lora_scale
    finetuned = None if name == "base" else models[name]
    device = compute_device()
    pipe = load_pipeline(cfg.base_model_path, finetuned, scale, device, inference_dtype(cfg.mixed_precision, device))
    is_lora = finetuned is not None and finetuned.name == "lora"
    return Model(name, pipe, model_fingerprint(pipe, scale if is_lora else 1.0), relative(models[name]), (cfg, name, scale))


def use_scheduler(pipe, name: str) -> None:
    """Switch the pipeline's sampler, keeping the model's noise schedule."""
    if name not in SCHEDULERS:
        raise SamplingError(f"unknown scheduler {name!r}{did_you_mean(name, SCHEDULERS)}; "
                            f"allowed: {', '.join(SCHEDULERS)}")
    if not isinstance(pipe.scheduler, SCHEDULERS[name]):
        pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config, **SCHEDULER_OPTIONS.get(name, {}))


def check_prompts(prompts: list[str], tokenizer) -> None:
    """Refuse empty prompts; warn once per call, showing what is dropped, when prompts exceed the context."""
    if isinstance(prompts, str):
        raise SamplingError("prompts must be a list of strings, got one string; wrap it: [prompt]")
    for k, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise SamplingError(f"prompt {k} is empty ({prompt!r}); describe the image, e.g. "
                                "'no acute cardiopulmonary process' (unconditional images: guidance_scale=1)")
    first_index: dict[str, int] = {}
    for k, prompt in enumerate(prompts):
        first_index.setdefault(prompt, k)  # each distinct prompt is tokenized once
    long = {k: part for prompt, k in first_index.items() if (part := truncated_part(prompt, tokenizer))}
    if long:
        shown = "; ".join(f"prompt {k}: {part!r}" for k, part in list(long.items())[:3])
        more = f" (and {len(long) - 3} more)" if len(long) > 3 else ""
        warnings.warn(f"{len(long)} prompt(s) longer than the text encoder's {tokenizer.model_max_length} tokens; "
                      f"these parts are ignored: {shown}{more}", stacklevel=4)


def check_seeds(prompts: list[str], seeds: list[int]) -> None:
    if len(seeds) != len(prompts):
        raise SamplingError(f"got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")


def run_pipeline(pipe, model: Model, prompts: list[str], seeds: list[int], settings: SamplingSettings,
                 progress: bool = False, **call_args) -> np.ndarray:
    """Checks, then one seeded image per prompt from `pipe` (a pipeline over the model's components)."""
    check_prompts(prompts, model.pipe.tokenizer)
    check_seeds(prompts, seeds)
    use_scheduler(pipe, settings.scheduler)
    with quiet_libraries():  # diffusers and transformers would repeat the truncation warning token by token
        return generate_images(pipe, list(prompts), list(seeds), settings.steps, settings.guidance_scale,
                               settings.negative_prompt, settings.batch_size, progress, **call_args)


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Only errors from diffusers' and transformers' loggers within the block."""
    loggers = (diffusers_logging, transformers_logging)
    levels = [lib.get_verbosity() for lib in loggers]
    for lib in loggers:
        lib.set_verbosity_error()
    try:
        yield
    finally:
        for lib, level in zip(loggers, levels):
            lib.set_verbosity(level)


def generate(model: Model, prompts: list[str], seeds: list[int], settings: SamplingSettings,
             progress: bool = False) -> np.ndarray:
    """Text-to-image: image k from prompts[k] with seeds[k]; uint8 (N, H, W, 3)."""
    return run_pipeline(model.pipe, model, prompts, seeds, settings, progress)


def pipeline_as(kind: type, pipe: StableDiffusionPipeline):
    """The same components in another Stable Diffusion pipeline class (image-to-image, inpainting)."""
    other = kind(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
                 scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    other.set_progress_bar_config(disable=True)
    return other


def compare_models(cfg: Config, names: list[str], prompts: list[str], seeds: list[int],
                   settings: SamplingSettings) -> dict[str, np.ndarray]:
    """The same prompts and seeds through each named model, loaded one at a time so that memory holds one
    model (five 512 px models in fp32 would take 21 GB): what fine-tuning changed, image for image."""
    return {name: generate(load_model(cfg, name), prompts, seeds, settings) for name in names}


def sweep(model: Model, prompts: list[str], seeds: list[int], settings: SamplingSettings, field: str,
          values: list) -> dict[str, np.ndarray]:
    """The same prompts and seeds at each value of one setting (e.g. "guidance_scale", "steps")."""
    return {f"{field} {v}": generate(model, prompts, seeds, settings.replace(**{field: v})) for v in values}


def model_table(cfg: Config) -> pd.DataFrame:
    """The models one can sample: name, kind (base / full pipeline / LoRA adapters) and folder."""
    kinds = {"pipeline": "full fine-tune", "lora": "LoRA adapters"}
    return pd.DataFrame([{"model": name, "kind": "base" if name == "base" else kinds[path.name], "folder": relative(path)}
                         for name, path in available_models(cfg).items()]).set_index("model")


def as_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    return (image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))).convert("RGB")



def grey(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W) from (H, W) or (H, W, 3) (radiographs are grey; RGB only carries the base's tint)."""
    image = np.asarray(image)
    return image if image.ndim == 2 else np.asarray(Image.fromarray(image).convert("L"))
