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
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm
from transformers import AutoModel, AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from roentgen_lib.data.general import render_scene
from roentgen_lib.text.tokenizer import CONTEXT_LENGTH, load_clip_tokenizer

# Tiny SD architectures (DESIGN.md): same block types as Stable Diffusion, far fewer channels.
ARCHITECTURES = {
    "tiny": {"channels": (16, 32, 32), "groups": 8, "cross_attention": 32, "text_width": 32, "text_layers": 1},
    "demo": {"channels": (32, 64, 64), "groups": 16, "cross_attention": 64, "text_width": 64, "text_layers": 2},
}
PROJECTION_FILE = "text_projection.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
FUSED_ADAMW_DEVICES = ("cpu", "cuda", "mps")  # where torch has AdamW's fused kernel
SCALING_SCENES = 256  # whole scenes the latent scaling factor is measured on
# Images per VAE pass when encoding or decoding many (latent caches, reconstructions). On 2 CPU cores
# the demo VAE's 64 x 64 activations stay in the caches at 16: per image, encoding takes 3.1 ms and
# encoding + decoding 10.5 ms, against 4.9 and 20.1 ms in batches of 64. Batches of 8-32 give the same
# outputs; a last, smaller batch may round differently.
VAE_BATCH_SIZE = 16
# Stable Diffusion's noise schedule with 2.x's v-prediction target. On 16x16 latents the noisy
# latent alone predicts epsilon almost as well as with the prompt (true vs shuffled prompts: 0.3%
# loss gap after 600 fine-tuning steps), so an epsilon model never learns to read its prompt; the v
# target asks for the image itself at high noise, where only the prompt can say what to draw
# (gap 4.9%, cardiomegaly AUROC 0.36 -> 0.99 with the same steps).
SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                "clip_sample": False, "steps_offset": 1}


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


def load_base(name_or_path: str, text_encoder: str | None = None, seed: int = 0) -> Base:
    """Load a Stable Diffusion 1.x/2.x base from a local diffusers folder or a hub id (safetensors only).

    With `text_encoder`, the CLIP text encoder and tokenizer are replaced by the given local text
    model and its tokenizer, projected to the U-Net's cross-attention width (projection untrained,
    initialised from `seed`, so a rerun starts from the same weights and can resume).
    """
    if Path(name_or_path).is_absolute() and not (Path(name_or_path) / "model_index.json").is_file():
        raise FileNotFoundError(f"base_model={name_or_path!r} is not a diffusers pipeline folder "
                                "(no model_index.json); build the project's base with `make base`")
    for folder in local_weight_folders(name_or_path, text_encoder):
        refuse_pickled(folder)
    load = {"use_safetensors": True}
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **load)
    saved_projection = Path(name_or_path, "text_encoder", PROJECTION_FILE).is_file()
    text_source = text_encoder or (str(Path(name_or_path, "text_encoder")) if saved_projection else None)
    if text_source:
        tokenizer = AutoTokenizer.from_pretrained(text_source)
        encoder = ProjectedTextEncoder.load(text_source, unet.config.cross_attention_dim, seed, tokenizer.pad_token_id)
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


def build_components(profile: str, image_size: int, seed: int) -> Base:
    """Fresh, randomly initialised tiny SD components for `profile` ("tiny" or "demo")."""
    arch = ARCHITECTURES["tiny" if profile == "tiny" else "demo"]
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


def images_to_tensor(images: list, size: int) -> torch.Tensor:
    """PIL images (any mode) to a float tensor (N, 3, size, size) in [-1, 1], as SD expects."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size)), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


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


def fused_adamw_available(params: list[nn.Parameter]) -> bool:
    """True when every parameter sits where torch has AdamW's fused kernel (one pass over all weights)."""
    return all(p.device.type in FUSED_ADAMW_DEVICES for p in params)


def random_crops(batch: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """One random `crop` x `crop` patch of each image in a (N, C, H, W) batch."""
    corners = rng.integers(0, np.array(batch.shape[-2:]) - crop + 1, size=(len(batch), 2))
    return torch.stack([image[:, y : y + crop, x : x + crop] for image, (y, x) in zip(batch, corners)])


def load_pipeline(base_path: str, finetuned: Path | None = None, lora_scale: float = 1.0) -> StableDiffusionPipeline:
    """A sampling pipeline: the base, a fine-tuned pipeline folder, or the base with a LoRA folder.

    `finetuned` is what training wrote: `<run>/pipeline` (full) or `<run>/lora` (adapters, with the
    noise schedule they were trained on).
    """
    source = str(finetuned) if finetuned is not None and (finetuned / "model_index.json").is_file() else base_path
    pipe = load_base(source).pipeline()
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
    return pipe


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


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: list, size: int, batch_size: int = VAE_BATCH_SIZE,
                progress: bool = False) -> np.ndarray:
    """Encode and decode images with the VAE (latent means); uint8 (N, size, size) grayscale."""
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="encode and decode", disable=not progress):
        batch = images_to_tensor(images[i : i + batch_size], size)
        decoded = vae.decode(vae.encode(batch).latent_dist.mean).sample.clamp(-1, 1)
        out.append(((decoded.mean(dim=1) + 1) * 127.5).round().to(torch.uint8).numpy())
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
