"""Stable Diffusion components: load a base (any SD 1.x/2.x diffusers folder or hub id), or build
the tiny SD-architecture stand-ins used offline, and pretrain their autoencoder.

`load_base(path)` returns a `Base` (VAE, U-Net, text encoder, tokenizer, noise scheduler) read
with safetensors only. `text_encoder=` swaps in any local Hugging Face text model, projected to
the U-Net's cross-attention width: the paper's domain-specific text encoder experiment.

Usage::

    base = load_base("data/demo/base_model")                  # the project's pretrained base
    base = load_base("stable-diffusion-v1-5/stable-diffusion-v1-5")  # hub (network; paper profile)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import snapshot_download
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, CLIPTextModel, PreTrainedTokenizerBase

from roentgen_lib.text.tokenizer import CONTEXT_LENGTH

PROJECTION_FILE = "text_projection.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
# What a base is read from on the hub: the pipeline's configs, tokenizer and safetensors weights; never a
# pickle, the safety checker, or the fp16 / non-EMA variants a repository may also hold.
HUB_BASE_FILES = ("model_index.json", "scheduler/*.json", "tokenizer/*", "text_encoder/config.json", "unet/config.json",
                  "vae/config.json", "text_encoder/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                  "vae/diffusion_pytorch_model.safetensors")
VAE_BATCH_SIZE = 16
VAE_BATCH_PIXELS = VAE_BATCH_SIZE * 64 * 64  # larger images go in smaller batches, so activations keep their size


def vae_batch_size(size: int) -> int:
    """Images per VAE pass at `size` px: 16 up to 64 px, down to 1 at 256 px and above (512 px activations of 16
    images would take over 10 GB)."""
    return max(1, min(VAE_BATCH_SIZE, VAE_BATCH_PIXELS // (size * size)))


def compute_device() -> torch.device:
    """Where every stage runs: this process's GPU when there is one (its own under `accelerate launch`),
    else the CPU. On a GPU, matrix products and convolutions may use TF32, as training does."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # The first PartialState fixes the process group: it must see ACCELERATE_USE_CPU as the Accelerator would,
    # or CPU processes under `accelerate launch` would each take themselves for the only one.
    device = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU")).device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def training_precision(mixed_precision: str, device: torch.device) -> str:
    """Accelerate's mixed precision for training: the profile's on an accelerator; "no" on the CPU, where
    bfloat16 autocast without hardware support is emulated and slower than float32 (as in `inference_dtype`)."""
    return "no" if device.type == "cpu" else mixed_precision


def inference_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype models sample and score in: the profile's `mixed_precision` on a GPU; float32 on the CPU,
    where nothing changes."""
    if device.type == "cpu":
        return torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


class WeightsError(ValueError):
    """Weights that cannot or must not be loaded; the message names the file or folder and why."""


@dataclass
class Base:
    """The parts of a Stable Diffusion pipeline that training and sampling use."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: nn.Module
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler

    def pipeline(self) -> StableDiffusionPipeline:
        """A StableDiffusionPipeline over these components (no safety checker: radiographs)."""
        return StableDiffusionPipeline(vae=self.vae, unet=self.unet, text_encoder=self.text_encoder,
                                       tokenizer=self.tokenizer, scheduler=self.noise_scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)


class ProjectedTextEncoder(nn.Module):
    """Any Hugging Face text model with a linear projection to the U-Net's cross-attention width."""

    def __init__(self, encoder: nn.Module, width: int, seed: int = 0, pad_token_id: int | None = None) -> None:
        """`pad_token_id`: the id its tokenizer pads with (a model config's may differ: CLIP's say 1)."""
        super().__init__()
        self.encoder = encoder
        self.pad_token_id = pad_token_id
        with torch.random.fork_rng(devices=[]):  # a new projection starts from the same weights for a seed
            torch.manual_seed(seed)
            self.projection = nn.Linear(encoder.config.hidden_size, width)

    @property
    def dtype(self) -> torch.dtype:
        return self.projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    @property
    def config(self):
        """The wrapped encoder's config (pipelines read flags such as use_attention_mask from it)."""
        return self.encoder.config

    def activation_checkpointing_enable(self, **kwargs: object) -> None:
        """Checkpoint the wrapped encoder's layers (training calls this on a trained text encoder)."""
        self.encoder.activation_checkpointing_enable(**kwargs)

    def save(self, folder: Path) -> None:
        """Encoder as a Hugging Face folder plus the projection as safetensors."""
        self.encoder.save_pretrained(folder, safe_serialization=True)
        save_file(self.projection.state_dict(), str(folder / PROJECTION_FILE))

    @classmethod
    def load(cls, folder: Path, width: int, seed: int = 0, pad_token_id: int | None = None) -> "ProjectedTextEncoder":
        """Read back what `save` wrote (or wrap a plain text model with a new projection seeded by `seed`)."""
        encoder = cls(AutoModel.from_pretrained(folder, use_safetensors=True), width, seed, pad_token_id)
        if (Path(folder) / PROJECTION_FILE).is_file():
            encoder.projection.load_state_dict(load_file(str(Path(folder) / PROJECTION_FILE)))
        return encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        """Projected hidden states of every token; padding is masked out when no mask is given.

        Pipelines and our training loop pass token ids only. CLIP's causal attention never lets a
        token see the padding after it, but a bidirectional encoder (BERT and kin) would read it.
        """
        if attention_mask is None and self.pad_token_id is not None:
            attention_mask = (input_ids != self.pad_token_id).long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return (self.projection(hidden),)


def is_hub_id(name_or_path: str) -> bool:
    """True for a hub id ("org/name"), False for a local folder (absolute, or one that exists)."""
    return not (Path(name_or_path).is_absolute() or Path(name_or_path).exists())


def local_base(name_or_path: str) -> str:
    """The local diffusers folder of a base: a folder as given, or a hub id's snapshot in the Hugging Face cache.

    A hub id is fetched once into the usual cache (`HF_HOME`), safetensors only (`HUB_BASE_FILES`), and
    read from there afterwards, offline too. When it is neither cached nor reachable, the error names the
    id and how to point `base_model` at a local copy, before any work starts.
    """
    if not is_hub_id(name_or_path):
        return name_or_path
    try:
        folder = snapshot_download(name_or_path, allow_patterns=list(HUB_BASE_FILES))
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        reason = str(error).strip().splitlines()[0]
        raise WeightsError(
            f"base_model={name_or_path!r} is a hub id that is neither in the Hugging Face cache nor reachable "
            f"({reason}). Download it where the hub can be reached (`hf download {name_or_path}` fills the same "
            "cache; logged in if the model is gated), or point base_model at a local diffusers folder: "
            "-p base_model=/path/to/stable-diffusion-v1-5") from error
    missing = [f for f in ("model_index.json", *HUB_BASE_FILES[-3:]) if not (Path(folder) / f).is_file()]
    if missing:
        raise WeightsError(f"hub base {name_or_path!r} has no {', '.join(missing)}: this project loads safetensors "
                           "only; convert the weights where you trust them and point base_model at that folder")
    return folder


def load_base(name_or_path: str, text_encoder: str | None = None, seed: int = 0,
              dtype: torch.dtype = torch.float32) -> Base:
    """Load a Stable Diffusion 1.x/2.x base in `dtype` from a local diffusers folder or a hub id (safetensors only).

    With `text_encoder`, the CLIP text encoder and tokenizer are replaced by the given local text
    model and its tokenizer, projected to the U-Net's cross-attention width (projection untrained,
    initialised from `seed`, so a rerun starts from the same weights and can resume).
    """
    name_or_path = local_base(name_or_path)
    if Path(name_or_path).is_absolute() and not (Path(name_or_path) / "model_index.json").is_file():
        raise FileNotFoundError(f"base_model={name_or_path!r} is not a diffusers pipeline folder "
                                "(no model_index.json); build the project's base with `make base`")
    for folder in local_weight_folders(name_or_path, text_encoder):
        refuse_pickled(folder)
    load = {"use_safetensors": True, "torch_dtype": dtype}
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **load)
    saved_projection = Path(name_or_path, "text_encoder", PROJECTION_FILE).is_file()
    text_source = text_encoder or (str(Path(name_or_path, "text_encoder")) if saved_projection else None)
    if text_source:
        tokenizer = AutoTokenizer.from_pretrained(text_source)
        encoder = ProjectedTextEncoder.load(text_source, unet.config.cross_attention_dim, seed,
                                            tokenizer.pad_token_id).to(dtype)
        # Stable Diffusion's 77-token context, as with CLIP: a BERT's 512 would widen every cross-attention
        # and text cache 6.6x and truncate reports differently from the CLIP runs it is compared with
        tokenizer.model_max_length = min(tokenizer.model_max_length, encoder.config.max_position_embeddings, CONTEXT_LENGTH)
    else:
        encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **load)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer")
    base = Base(vae=AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", **load), unet=unet,
                text_encoder=encoder, tokenizer=tokenizer,
                noise_scheduler=DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler"))
    check_compatible(base, name_or_path)
    return base


def local_weight_folders(name_or_path: str, text_encoder: str | None) -> list[Path]:
    """The local folders weights are read from: each component folder of the base, and a text-encoder override."""
    root = Path(name_or_path)
    folders = [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
    return folders + ([Path(text_encoder)] if text_encoder and Path(text_encoder).is_dir() else [])


def refuse_pickled(folder: Path) -> None:
    """Refuse a model folder whose weights exist only as pickles: unpickling a file can run code."""
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and not any(folder.glob("*.safetensors")):
        raise WeightsError(f"{folder / pickled[0]} is a pickled weight file and {folder} holds no .safetensors: "
                           "this project loads safetensors only, because unpickling a file can run code. Convert it "
                           "where you trust it (load, then save_pretrained(..., safe_serialization=True)) and use that")


def check_compatible(base: Base, source: str) -> None:
    """The components must fit each other: VAE latents into the U-Net, text states into its cross-attention."""
    latent, unet = base.vae.config.latent_channels, base.unet.config
    problems = []
    if unet.in_channels not in (latent, 2 * latent + 1) or unet.out_channels != latent:  # 2c+1: inpainting U-Nets
        problems.append(f"the VAE makes {latent}-channel latents but the U-Net takes {unet.in_channels} "
                        f"and predicts {unet.out_channels}")
    width = getattr(base.text_encoder.config, "hidden_size", unet.cross_attention_dim)
    if not isinstance(base.text_encoder, ProjectedTextEncoder) and width != unet.cross_attention_dim:
        problems.append(f"the text encoder is {width} wide but the U-Net's cross-attention expects {unet.cross_attention_dim}")
    if problems:
        raise WeightsError(f"{source}: components from different architectures ({'; '.join(problems)}); "
                           "was a folder of another model copied in?")


def weights_fingerprint(*modules: nn.Module, extra: str = "") -> str:
    """SHA-256 over every tensor (name and bytes) of the given modules, plus `extra`: same digest, same weights."""
    import hashlib

    digest = hashlib.sha256(extra.encode())
    for module in modules:
        for key, tensor in sorted(module.state_dict().items()):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_base(base: Base, folder: Path) -> None:
    """Save as a diffusers pipeline folder (safetensors); a projected text encoder is saved beside it.

    Folders with the standard CLIP encoder load with `StableDiffusionPipeline.from_pretrained`;
    those with a domain text encoder load with `load_base` (diffusers cannot know our projection).
    """
    if not isinstance(base.text_encoder, ProjectedTextEncoder):
        base.pipeline().save_pretrained(folder, safe_serialization=True)
        return
    for name in ("vae", "unet", "noise_scheduler"):
        getattr(base, name).save_pretrained(Path(folder) / ("scheduler" if name == "noise_scheduler" else name))
    base.text_encoder.save(Path(folder) / "text_encoder")
    base.tokenizer.save_pretrained(Path(folder) / "text_encoder")
    (Path(folder) / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "text_encoder": "projected"}\n')


def images_to_tensor(images: list, size: int) -> torch.Tensor:
    """PIL images (any mode) to a float tensor (N, 3, size, size) in [-1, 1], as SD expects."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def load_pipeline(base_path: str, finetuned: Path | None = None, lora_scale: float = 1.0,
                  device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """A sampling pipeline on `device` (default the CPU) in `dtype`: the base, a fine-tuned pipeline
    folder, or the base with a LoRA folder.

    `finetuned` is what training wrote: `<run>/pipeline` (full) or `<run>/lora` (adapters, with the
    noise schedule they were trained on).
    """
    source = str(finetuned) if finetuned is not None and (finetuned / "model_index.json").is_file() else base_path
    pipe = load_base(source, dtype=dtype).pipeline()
    if finetuned is not None and source == base_path:
        refuse_pickled(finetuned)
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # a U-Net-only adapter is not worth a warning per load
        try:
            pipe.load_lora_weights(str(finetuned), adapter_name="finetuned", use_safetensors=True)
        except (RuntimeError, ValueError) as error:
            detail = " ".join(str(error).split("\n")[:2])
            raise WeightsError(f"LoRA adapter {finetuned} does not fit the base {base_path}: {detail}") from error
        finally:
            diffusers_logging.set_verbosity(verbosity)
        pipe.set_adapters(["finetuned"], adapter_weights=[lora_scale])
        if (finetuned / "scheduler").is_dir():  # adapters trained on another schedule (zero_terminal_snr)
            pipe.scheduler = DDPMScheduler.from_pretrained(str(finetuned), subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or torch.device("cpu"))


@torch.no_grad()
def generate_images(pipe, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                    negative_prompt: str = "", batch_size: int = 64, progress: bool = False,
                    **call_args) -> np.ndarray:
    """Images for `prompts`, image k drawn from its own generator seeded `seeds[k]`, in fixed batches.

    Each image depends only on its prompt and seed (and the batch it falls in, to float rounding),
    so any image can be regenerated alone. `call_args` go to the pipeline (e.g. `image=`,
    `strength=` for image-to-image). Returns uint8 (N, H, W, 3).
    """
    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="sample", unit="batch", disable=not progress):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[chunk]]
        batch_args = {k: v[chunk] if isinstance(v, list) else v for k, v in call_args.items()}
        images = pipe(prompts[chunk], negative_prompt=[negative_prompt] * len(generators) if negative_prompt else None,
                      num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                      output_type="np", **batch_args).images
        out.append(np.round(images * 255).astype(np.uint8))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)


def sample_grid(pipe: StableDiffusionPipeline, prompts: list[str], seed: int, steps: int = 20,
                guidance: float = 4.0) -> np.ndarray:
    """One image per prompt, prompt k drawn with seed + k (DPM-Solver++), as a uint8 (N, H, W, 3) array."""
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return generate_images(pipe, prompts, [seed + k for k in range(len(prompts))], steps, guidance)


def preview_grid(base_path: str, finetuned: Path | None, prompts: list[str], seed: int, steps: int,
                 mixed_precision: str = "no") -> np.ndarray:
    """`sample_grid` of the base or a fine-tune on the accelerator when there is one (before/after figures)."""
    device = compute_device()
    pipe = load_pipeline(base_path, finetuned, device=device, dtype=inference_dtype(mixed_precision, device))
    return sample_grid(pipe, prompts, seed, steps)


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: list, size: int, batch_size: int | None = None,
                progress: bool = False) -> np.ndarray:
    """Encode and decode images with the VAE (latent means), `vae_batch_size` at a time by default; uint8
    (N, size, size) grayscale."""
    batch_size = batch_size or vae_batch_size(size)
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encode and decode", disable=not progress):
        batch = images_to_tensor(images[i : i + batch_size], size).to(device=vae.device, dtype=vae.dtype)
        decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample.float().clamp(-1, 1)
        out.append(((decoded.mean(dim=1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy())
    return np.concatenate(out)


def reconstruction_by_finding(vae: AutoencoderKL, split, size: int, findings: tuple[str, ...], limit: int = 512):
    """Mean absolute reconstruction error (grey levels) and PSNR of the VAE, per positive finding.

    The frozen VAE bounds what any fine-tune can draw: a finding it cannot reconstruct
    (say, a thin pleural line) cannot be generated either.
    """
    import pandas as pd

    part = split.select(range(min(limit, len(split))))
    originals = np.stack([np.asarray(im.convert("L").resize((size, size))) for im in part["image"]]).astype(float)
    difference = reconstruct(vae, list(part["image"]), size).astype(float) - originals
    errors, mse = np.abs(difference).mean(axis=(1, 2)), (difference**2).mean(axis=(1, 2))
    rows = {}
    for finding in findings:
        chosen = np.array([v == 1.0 for v in part[finding]])
        if chosen.any():
            rows[finding] = {"images": int(chosen.sum()), "MAE (grey levels)": round(errors[chosen].mean(), 2),
                             "PSNR (dB)": round(float(10 * np.log10(255**2 / mse[chosen].mean())), 2)}
    return pd.DataFrame(rows).T
