"""Profiles and validated run configuration: the first stage every other stage reads.

A profile (`tiny`, `demo`, `paper`) is a complete `Config`; a notebook's `parameters` cell names a
profile and may override any field. `resolve("demo", n_images=500)` returns the validated config or
raises `ConfigError` naming the parameter and what is allowed, before any work starts.

Usage::

    from roentgen_lib import config
    cfg = config.resolve("tiny", seed=1)
    cfg.dataset_path  # absolute Path under the project root
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import pandas as pd

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROFILE_NAMES = ("tiny", "demo", "paper", "paper_smoke")
Architecture = Literal["tiny", "demo", "sd-1.5", "sd-2.1"]
DataSource = Literal["phantom", "mimic"]
FineTuneMethod = Literal["full", "lora"]
LrSchedule = Literal["constant", "constant_with_warmup", "linear", "cosine"]
MixedPrecision = Literal["no", "fp16", "bf16"]
StoredFloat = Literal["float32", "float16"]
Scheduler = Literal["dpmsolver++", "ddim", "euler", "euler_ancestral", "pndm"]
# Fields read only by sampling: changing them never changes what training produces.
SAMPLING_FIELDS = ("sample_model", "scheduler", "sampling_steps", "guidance_scale", "negative_prompt", "lora_scale",
                   "images_per_prompt", "sample_batch_size", "synthetic_dir", "synthetic_prompts",
                   "synthetic_split_prompts", "guidance_sweep", "steps_sweep", "edit_strength")
# Fields read only by evaluation (05): changing them never changes what training produces.
EVALUATION_FIELDS = ("eval_models", "eval_prompts", "xrv_weights", "inception_weights", "classifier_epochs", "judge_blur",
                     "downstream_seeds", "downstream_images_per_prompt", "eval_references", "eval_real_images", "evaluation_dir")
# Which components a full fine-tune adapts: (train_unet, train_text_encoder).
VARIANTS = {"unet": (True, False), "text_encoder": (False, True), "both": (True, True)}


class ConfigError(ValueError):
    """A parameter has a wrong name, type or value; the message names it and what is allowed."""


@dataclass(frozen=True)
class Config:
    """Everything a stage needs to run; one instance per profile, overridable field by field."""

    profile: str
    data_source: DataSource = "phantom"  # where image/report pairs come from
    mimic_root: str | None = None  # MIMIC-CXR-JPG root (files/, metadata and split csv.gz)
    mimic_reports_root: str | None = None  # MIMIC-CXR report tree; None: same as mimic_root
    output_dir: str | None = None  # dataset folder; None: data/<profile>/cxr_dataset
    figures_dir: str | None = None  # where stage figures go; None: per profile (see below)
    n_images: int | None = None  # image/report pairs to build; None: all available
    composed_reports: int = 0  # phantom world: reports composed from finding specs added to IU-Xray's (one patient each)
    finding_repeats: int = 1  # phantom world: each report with a positive finding is drawn this many times
    image_size: int = 64  # square side in pixels of every stored image
    seed: int = 0  # seeds every random choice of every stage
    val_fraction: float = 0.1  # share of patients in the validation split (phantom world)
    test_fraction: float = 0.1  # share of patients in the test split (phantom world)
    progress: bool = True  # show progress bars (off in the tiny profile: nbval compares stderr)
    data_workers: int = 0  # processes building the dataset's images (01); 0: one per CPU core
    # --- base model (notebooks 02-03) ---
    base_model: str | None = None  # diffusers folder or hub id; None: the project's base, built locally
    base_dir: str | None = None  # where the project's base is built and cached; None: data/<profile>/base_model
    text_encoder: str | None = None  # local Hugging Face text model replacing CLIP (domain encoder)
    base_architecture: Architecture = "demo"  # of the project's base: a tiny stand-in, or SD's own with random weights
    base_images: int = 4000  # general-domain scenes the project's base is pretrained on
    base_vae_steps: int = 300  # autoencoder pretraining steps of the project's base
    base_vae_batch_size: int = 32  # scenes per autoencoder pretraining step of the project's base
    base_vae_crop: int | None = None  # autoencoder pretrained on random square patches of this side; None: whole scenes
    base_steps: int = 800  # U-Net + text encoder pretraining steps of the project's base
    base_batch_size: int = 32  # images per U-Net + text-encoder pretraining step of the project's base
    # --- fine-tuning ---
    run_name: str | None = None  # folder under models_dir; None: named after method and targets
    models_dir: str | None = None  # where runs are saved; None: data/<profile>/models
    train_unet: bool = True  # adapt the U-Net
    train_text_encoder: bool = False  # adapt the text encoder
    method: FineTuneMethod = "full"  # full fine-tuning or LoRA adapters
    lora_rank: int = 8  # LoRA rank (method="lora")
    lora_alpha: int = 8  # LoRA scaling numerator (method="lora")
    unet_lora_targets: str = "to_q,to_k,to_v,to_out.0"  # U-Net modules that get adapters
    text_lora_targets: str = "q_proj,k_proj,v_proj,out_proj"  # text-encoder modules that get adapters
    learning_rate: float = 1e-3  # peak learning rate
    # peak rate of the text encoder's own weights (kohya's text_encoder_lr: a pretrained encoder is tuned
    # gently while the U-Net and a domain encoder's new projection learn at learning_rate); None: learning_rate
    text_encoder_learning_rate: float | None = None
    lr_scheduler: LrSchedule = "cosine"  # learning-rate schedule after warm-up
    lr_warmup_steps: int = 50  # linear warm-up steps
    batch_size: int = 32  # images per optimizer step per process (before accumulation)
    gradient_accumulation: int = 1  # micro-batches per optimizer step
    max_steps: int = 600  # optimizer steps
    # "Pneumothorax=2": each training pair labelled with a pneumothorax is shown twice per epoch (kohya's
    # num_repeats, chosen by finding instead of by folder); "" shows every pair once
    repeat_findings: str = ""
    lora_max_steps: int | None = None  # steps of a LoRA fine-tune when max_steps is not set; None: max_steps
    text_encoder_max_steps: int | None = None  # steps of 03's text-encoder-only run when max_steps is not set; None: max_steps
    mixed_precision: MixedPrecision = "no"  # "fp16"/"bf16" on GPUs that support them
    latent_dtype: StoredFloat = "float32"  # how encoded latents and text states are stored on disk (paper: float16)
    loader_workers: int = 0  # processes that prefetch training batches; 0: the training process reads them
    gradient_checkpointing: bool = False  # trade compute for memory (paper profile)
    ema_decay: float = 0.999  # EMA of trained weights; 0 turns it off
    snr_gamma: float = 0.0  # Min-SNR loss weighting gamma; 0 turns it off (5 is common)
    noise_offset: float = 0.0  # offset noise strength; 0 turns it off
    zero_terminal_snr: bool = False  # rescale the noise schedule to zero SNR at its end, sampled with trailing steps
    timestep_bias: float = 1.0  # timesteps >= timestep_bias_start are drawn this many times as often; 1: uniform
    timestep_bias_start: int = 800  # first timestep that timestep_bias favours (of 1000)
    max_grad_norm: float = 1.0  # gradient clipping
    use_8bit_adam: bool = False  # bitsandbytes 8-bit AdamW (GPU, when installed)
    checkpoint_every: int = 200  # steps between resumable checkpoints
    checkpoints_total_limit: int = 2  # checkpoints kept (oldest removed first)
    validation_every: int = 200  # steps between validation loss and sample grids
    validation_prompts: str = (
        "large left pleural effusion|large right pneumothorax|moderate cardiomegaly|"
        "no acute cardiopulmonary process"
    )  # "|"-separated prompts rendered at each validation
    validation_images: bool = True  # draw the validation prompts at each validation (off: the loss only)
    resume: bool = True  # continue from the latest checkpoint of the run if there is one
    full_variants: str = "unet,text_encoder,both"  # components 03_finetune_full adapts, one run each
    # Independent jobs run at once (03's runs; 05's models and classifiers), each in its own process with
    # an equal share of the CPU threads: on a CPU, small models train faster side by side (see `parallel`).
    worker_processes: int = 1
    # Processes (one per GPU) that one training run, a synthetic dataset and a model's evaluation images are
    # split over by rank: training through `accelerate launch`, sampling through worker processes.
    num_processes: int = 1
    # --- sampling (04_sampling) ---
    sample_model: str = "full_unet_te"  # run folder under models_dir to sample from, or "base"
    scheduler: Scheduler = "dpmsolver++"  # sampling scheduler
    sampling_steps: int = 20  # denoising steps per image
    guidance_scale: float = 4.0  # classifier-free guidance; 1 turns it off
    negative_prompt: str = ""  # what to steer away from ("" none)
    lora_scale: float = 1.0  # strength of LoRA adapters when sampling a LoRA run (0 = the base)
    images_per_prompt: int = 4  # synthetic images per prompt (4, as RoentGen's diversity evaluation)
    sample_batch_size: int = 16  # images per sampler call (16 was fastest on 2 CPU cores, make bench-sample)
    synthetic_dir: str | None = None  # synthetic dataset folder; None: data/<profile>/synthetic
    synthetic_prompts: str = "test,specs"  # comma list of sources: a split name, "specs", or a .csv path
    synthetic_split_prompts: int | None = None  # at most this many prompts from each split source (seeded); None: all
    guidance_sweep: str = "1,2,4,8"  # guidance scales compared in 04
    steps_sweep: str = "5,10,20,40"  # step counts compared in 04
    edit_strength: float = 0.7  # image-to-image strength of counterfactual edits (0 keeps, 1 redraws)
    # at most this many prompts of each fixed set (validation prompts, finding specs, report-language and
    # held-out phrasings, edit cases); None: all. The paper smoke draws one of each at 512 px on a CPU.
    prompt_set_size: int | None = None
    # --- evaluation (05_evaluation) ---
    eval_models: str = "all"  # comma list of models scored ("base" or run folder names), or "all"
    eval_prompts: int = 48  # test-split report prompts drawn per model for fidelity and diversity
    xrv_weights: str | None = None  # local safetensors of torchxrayvision's DenseNet-121 (FID-XRV); None: unavailable
    inception_weights: str | None = None  # local safetensors of FID's Inception-v3 (torch-fidelity's); None: unavailable
    classifier_epochs: int = 12  # epochs of each finding-classifier training (judge and downstream)
    forgetting_scenes: int = 256  # general-domain scenes each model's denoising loss is measured on (05)
    # The judge scores images decoded by an autoencoder that smooths fine texture; trained on sharp images
    # only, it reads that smoothing as "no finding". Blurring half its training batches (Gaussian, sigma up
    # to this many pixels, one sigma per batch) makes it read findings, not sharpness. 0 turns it off.
    judge_blur: float = 1.5
    downstream_seeds: str = "0,1,2"  # classifier seeds of the downstream experiment (mean and spread)
    downstream_images_per_prompt: int = 16  # synthetic images per spec prompt added to the real training set
    eval_references: int = 8  # phantom world: rendered test images per spec prompt (4x as many train the judge)
    # at most this many images of each real split are held for evaluation (a seeded sample): the judge's
    # training set, the memorization search and the real reference rows; None: the whole split
    eval_real_images: int | None = None
    evaluation_dir: str | None = None  # evaluation images and tables; None: data/<profile>/evaluation

    def __post_init__(self) -> None:
        check_types(self)
        check_values(self)

    @property
    def dataset_path(self) -> Path:
        """Absolute folder of the dataset 01_data_prep writes and later stages read."""
        return project_path(self.output_dir or f"data/{self.profile}/cxr_dataset")

    @property
    def figures_path(self) -> Path:
        """Absolute folder for figures: `figures/` for demo, ignored `data/<profile>/figures` otherwise.

        Tiny runs are throwaway and paper runs derive from credentialed data, so neither writes
        into the tracked `figures/` folder unless asked to.
        """
        default = "figures" if self.profile == "demo" else f"data/{self.profile}/figures"
        return project_path(self.figures_dir or default)

    @property
    def base_model_path(self) -> str:
        """The base model: a local folder (absolute) or a hub id, as given; else the project's base."""
        if self.base_model is None:
            return str(project_path(self.base_dir or f"data/{self.profile}/base_model"))
        local = project_path(self.base_model)
        return str(local) if local.exists() or self.base_model.startswith((".", "/", "~")) else self.base_model

    @property
    def run_path(self) -> Path:
        """Folder of this fine-tuning run: checkpoints, logs, validation grids, final weights."""
        targets = "_".join(t for t, on in (("unet", self.train_unet), ("te", self.train_text_encoder)) if on)
        name = self.run_name or f"{self.method}_{targets}"
        return self.models_path / name

    @property
    def prompts_for_validation(self) -> list[str]:
        """The validation prompts as a list (at most `prompt_set_size` of them)."""
        return self.limit([p.strip() for p in self.validation_prompts.split("|") if p.strip()])

    def limit(self, prompt_set: Sequence) -> Sequence:
        """The first `prompt_set_size` items (or rows) of a fixed prompt set (finding specs, edit cases, ...); all by default."""
        return prompt_set if self.prompt_set_size is None else prompt_set[: self.prompt_set_size]

    @property
    def variant_names(self) -> list[str]:
        """The components 03_finetune_full adapts, in order."""
        return [v.strip() for v in self.full_variants.split(",") if v.strip()]

    @property
    def finding_repeats_per_epoch(self) -> dict[str, int]:
        """`repeat_findings` as {finding: times}."""
        return repeat_counts(self.repeat_findings)

    @property
    def synthetic_path(self) -> Path:
        """Absolute folder of the synthetic dataset 04_sampling writes and 05_evaluation reads."""
        return project_path(self.synthetic_dir or f"data/{self.profile}/synthetic")

    @property
    def evaluation_path(self) -> Path:
        """Absolute folder of what 05_evaluation draws and measures."""
        return project_path(self.evaluation_dir or f"data/{self.profile}/evaluation")

    @property
    def models_path(self) -> Path:
        """Folder holding one sub-folder per fine-tuning run."""
        return project_path(self.models_dir or f"data/{self.profile}/models")

    @property
    def mimic_path(self) -> Path | None:
        """The MIMIC-CXR-JPG folder, absolute (relative paths are taken from the project root); None if unset."""
        return project_path(self.mimic_root) if self.mimic_root else None

    @property
    def reports_root(self) -> Path | None:
        """The MIMIC report tree (absolute), defaulting to the image tree."""
        return project_path(self.mimic_reports_root) if self.mimic_reports_root else self.mimic_path

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields, for manifests and display."""
        return dataclasses.asdict(self)


def resolve(profile: str = "demo", **overrides: Any) -> Config:
    """Return the profile's config with every non-None override applied and validated.

    None means "keep the profile's value", so a notebook's parameters cell can default every
    override to None and papermill only injects what the user sets.
    """
    if profile not in PROFILES:
        raise ConfigError(f"profile={profile!r} is not a profile; allowed: {', '.join(PROFILE_NAMES)}")
    check_names(overrides)
    chosen = {name: value for name, value in overrides.items() if value is not None}
    cfg = dataclasses.replace(PROFILES[profile], **chosen)
    if "max_steps" in chosen:  # a step count the user sets applies to every run
        cfg = dataclasses.replace(cfg, **{name: None for name in RUN_STEP_FIELDS if name not in chosen})
    if cfg.method == "lora" and cfg.lora_max_steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=cfg.lora_max_steps)
    check_conflicts(cfg, set(chosen))
    check_paths(cfg)
    return cfg


def parse_overrides(pairs: Sequence[str]) -> dict[str, object]:
    """`key=value` strings to a dict; values are Python literals when they parse, else strings."""
    overrides: dict[str, object] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-p {pair!r}: expected key=value")
        try:
            overrides[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            overrides[key.strip()] = raw
    return overrides


def parameter_names() -> tuple[str, ...]:
    """Names a notebook may override (every field but `profile`)."""
    return tuple(f.name for f in fields(Config) if f.name != "profile")


def check_names(overrides: dict[str, Any]) -> None:
    """Refuse unknown parameter names, suggesting the closest known one."""
    allowed = parameter_names()
    for name in overrides:
        if name not in allowed:
            raise ConfigError(f"unknown parameter {name!r}{did_you_mean(name, allowed)}; allowed: {', '.join(allowed)}")


def did_you_mean(name: str, choices) -> str:
    """" (did you mean 'x'?)" for the closest of `choices`, or "" when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_types(cfg: Config) -> None:
    """Check every field against its annotation (int is not bool; int is accepted for float)."""
    hints = typing.get_type_hints(Config)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if not matches_type(value, hints[f.name]):
            raise ConfigError(
                f"parameter {f.name!r} must be {describe_type(hints[f.name])}, got {value!r}"
            )


def matches_type(value: Any, hint: Any) -> bool:
    """True when `value` fits the annotation `hint` (plain types, Optional/Union and Literal)."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(matches_type(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe_type(hint: Any) -> str:
    """Human wording of an annotation, e.g. "one of 'phantom', 'mimic'" or "int or None"."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(hint))
    return "None" if hint is type(None) else hint.__name__


def check_values(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express."""
    if cfg.profile not in PROFILE_NAMES:
        raise ConfigError(f"profile={cfg.profile!r} is not a profile; allowed: {', '.join(PROFILE_NAMES)}")
    if cfg.image_size < 16 or cfg.image_size % 8:
        raise ConfigError(f"parameter 'image_size' must be a multiple of 8 and >= 16, got {cfg.image_size}")
    for name in ("n_images", "synthetic_split_prompts", "prompt_set_size", "eval_real_images", *RUN_STEP_FIELDS):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise ConfigError(f"parameter {name!r} must be >= 1 or None (all), got {getattr(cfg, name)}")
    if cfg.base_vae_crop is not None and not (cfg.base_vae_crop % 8 == 0 and 8 <= cfg.base_vae_crop <= cfg.image_size):
        raise ConfigError(f"parameter 'base_vae_crop' must be None or a multiple of 8 between 8 and image_size "
                          f"({cfg.image_size}), got {cfg.base_vae_crop}")
    if cfg.seed < 0:
        raise ConfigError(f"parameter 'seed' must be >= 0, got {cfg.seed}")
    positive = ("base_images", "base_vae_batch_size", "lora_rank", "lora_alpha",
                "batch_size", "base_batch_size", "gradient_accumulation", "max_steps", "checkpoint_every",
                "checkpoints_total_limit", "validation_every", "worker_processes", "num_processes", "sampling_steps", "images_per_prompt",
                "sample_batch_size", "finding_repeats", "eval_prompts", "classifier_epochs",
                "downstream_images_per_prompt", "eval_references", "forgetting_scenes")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"parameter {name!r} must be >= 1, got {getattr(cfg, name)}")
    if cfg.text_encoder_learning_rate is not None and not cfg.text_encoder_learning_rate > 0:
        raise ConfigError(f"parameter 'text_encoder_learning_rate' must be > 0 or None, got {cfg.text_encoder_learning_rate}")
    for name in ("learning_rate", "max_grad_norm", "timestep_bias"):
        if not getattr(cfg, name) > 0:
            raise ConfigError(f"parameter {name!r} must be > 0, got {getattr(cfg, name)}")
    for name in ("snr_gamma", "noise_offset", "timestep_bias_start", "lr_warmup_steps", "lora_scale",
                 "composed_reports", "data_workers", "loader_workers", "judge_blur", "base_vae_steps", "base_steps"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"parameter {name!r} must be >= 0, got {getattr(cfg, name)}")
    if cfg.composed_reports and cfg.data_source != "phantom":
        raise ConfigError("parameter 'composed_reports' adds phantom images; it cannot be used with data_source="
                          f"{cfg.data_source!r} (set composed_reports=0)")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"parameter 'ema_decay' must be in [0, 1), got {cfg.ema_decay}")
    unknown = set(cfg.variant_names) - set(VARIANTS)
    if unknown or not cfg.variant_names:
        raise ConfigError(f"parameter 'full_variants' must list some of {', '.join(VARIANTS)}, got {cfg.full_variants!r}")
    if not (cfg.train_unet or cfg.train_text_encoder):
        raise ConfigError("parameters 'train_unet' and 'train_text_encoder' are both False: nothing to train")
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= getattr(cfg, name) < 0.5:
            raise ConfigError(f"parameter {name!r} must be in [0, 0.5), got {getattr(cfg, name)}")
    if cfg.guidance_scale < 1.0:
        raise ConfigError(f"parameter 'guidance_scale' must be >= 1 (1 turns guidance off), got {cfg.guidance_scale}")
    if not 0.0 < cfg.edit_strength <= 1.0:
        raise ConfigError(f"parameter 'edit_strength' must be in (0, 1], got {cfg.edit_strength}")
    check_sweep(cfg, "guidance_sweep", float, 1.0)
    check_sweep(cfg, "steps_sweep", int, 1)
    try:
        valid = min(repeat_counts(cfg.repeat_findings).values(), default=1) >= 1
    except ValueError:
        valid = False
    if not valid:
        raise ConfigError(f"parameter 'repeat_findings' must be a comma list of Finding=times with times >= 1, "
                          f"e.g. 'Pneumothorax=2', got {cfg.repeat_findings!r}")


def number_list(text: str, kind: type) -> list:
    """"1,2,4" to [1, 2, 4] (as `kind`); raises ValueError on anything else."""
    return [kind(part) for part in text.split(",") if part.strip()]


def repeat_counts(text: str) -> dict[str, int]:
    """"Pneumothorax=2,Edema=3" to {"Pneumothorax": 2, "Edema": 3}; raises ValueError on anything else."""
    counts = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, equals, times = part.partition("=")
        if not (equals and name.strip()):
            raise ValueError(f"{part!r} is not Finding=times")
        counts[name.strip()] = int(times)
    return counts


def check_sweep(cfg: Config, name: str, kind: type, minimum: float) -> None:
    """A sweep parameter must be a non-empty comma list of numbers >= minimum."""
    try:
        values = number_list(getattr(cfg, name), kind)
    except ValueError:
        values = []
    if not values or min(values) < minimum:
        raise ConfigError(f"parameter {name!r} must be a comma list of {kind.__name__}s >= {minimum:g}, "
                          f"got {getattr(cfg, name)!r}")


LORA_FIELDS = ("lora_rank", "lora_alpha", "unet_lora_targets", "text_lora_targets", "lora_max_steps")
# A profile's step counts for runs that converge sooner than the rest; max_steps set by the user overrides them.
RUN_STEP_FIELDS = ("lora_max_steps", "text_encoder_max_steps")


def check_conflicts(cfg: Config, chosen: set[str]) -> None:
    """Refuse settings the user chose that the rest of the config would silently ignore."""
    ignored = sorted(chosen.intersection(LORA_FIELDS)) if cfg.method != "lora" else []
    if ignored:
        raise ConfigError(f"parameter {ignored[0]!r} applies to LoRA only, but method={cfg.method!r}; "
                          "set method='lora' or drop it")
    if cfg.text_encoder is not None and cfg.method == "lora":
        raise ConfigError(f"parameter 'text_encoder' ({cfg.text_encoder!r}) needs method='full': a LoRA run saves its "
                          "adapters only, not the new text encoder's projection, so it could not be sampled again")
    if cfg.text_encoder is not None and cfg.run_name is None:
        raise ConfigError(f"parameter 'text_encoder' ({cfg.text_encoder!r}) needs a run_name: without one its runs take "
                          "the names of the CLIP runs (full_unet, ...), which would be set aside and scored no more")
    if "text_encoder_learning_rate" in chosen and not cfg.train_text_encoder:
        raise ConfigError("parameter 'text_encoder_learning_rate' applies to a trained text encoder, but "
                          "train_text_encoder=False; set it to True or drop the rate")
    if "text_encoder_max_steps" in chosen and cfg.method != "full":
        raise ConfigError(f"parameter 'text_encoder_max_steps' applies to full fine-tuning only, but method={cfg.method!r}")
    if "base_dir" in chosen and cfg.base_model is not None:
        raise ConfigError(f"parameter 'base_dir' names where the project's own base is built, but base_model="
                          f"{cfg.base_model!r} is given; drop one of them")
    for name in ("mimic_root", "mimic_reports_root"):
        if name in chosen and cfg.data_source != "mimic":
            raise ConfigError(f"parameter {name!r} is set but data_source={cfg.data_source!r}; set data_source='mimic' "
                              "to build from MIMIC-CXR, or drop it")


def check_paths(cfg: Config) -> None:
    """Local folders the config names must exist (a hub id for base_model is left to the hub)."""
    folders = {"mimic_root": cfg.mimic_root, "mimic_reports_root": cfg.mimic_reports_root, "text_encoder": cfg.text_encoder}
    if cfg.base_model is not None and cfg.base_model.startswith((".", "/", "~")):
        folders["base_model"] = cfg.base_model
    for name, value in folders.items():
        if value is not None and not project_path(value).is_dir():
            raise ConfigError(f"parameter {name!r}: folder {value!r} does not exist (relative paths are taken from "
                              f"{PROJECT_ROOT})")


def project_path(path: str | Path) -> Path:
    """Absolute path; relative paths are taken from the project root, not the notebook folder."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def shipped_file(package: str, relative: str) -> Path:
    """Path of a data file shipped inside an installed package, found without importing it.

    Importing torchxrayvision or open_clip pulls in torchvision/timm for seconds; their data files
    (IU-Xray reports, lung masks, the CLIP BPE vocabulary) are all we read from them here.
    """
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed; run `make setup`")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.exists():
        raise FileNotFoundError(f"{package} does not ship {relative!r} (looked at {path})")
    return path


PROFILES: dict[str, Config] = {
    "tiny": Config(profile="tiny", n_images=48, image_size=32, progress=False, data_workers=1, base_architecture="tiny",
                   base_images=64,
                   base_vae_steps=20, base_vae_batch_size=8, base_vae_crop=16, base_steps=20, base_batch_size=8,
                   batch_size=8, max_steps=12, lr_warmup_steps=2, zero_terminal_snr=True, timestep_bias=8.0,
                   worker_processes=2, checkpoint_every=6, validation_every=6, sampling_steps=4, images_per_prompt=2,
                   sample_batch_size=8, guidance_sweep="1,4", steps_sweep="2,4", eval_prompts=6, classifier_epochs=2,
                   downstream_seeds="0", downstream_images_per_prompt=1, eval_references=1),
    # demo: fine-tuned with zero terminal SNR and high-noise timesteps drawn 8x as often, which lets the
    # prompt decide the side of a finding (README, Evaluation: `make probe-position`); 1600 steps of 16:
    # the pneumothorax side needs that many updates (600 of 32, 800 of 32, 1200 of 16, 1600 of 12 miss it).
    # Learning rate 2e-3: at 1e-3 the U-Net + text encoder drew no pneumothorax without guidance, and with
    # it the side of those found was right in 0.52 / 0.96 / 0.55 at seeds 0-2; at 2e-3 in 1.00 / 1.00 /
    # 1.00 / 0.84 at seeds 0-3, effusions unchanged (README, Evaluation; 2400 steps at 1e-3: 1.00, seed 0).
    # The base: 400 U-Net steps of 32 (500 of 16 left it using its captions far less); its autoencoder
    # pretrained on 24 px patches (as good as 32 px patches in 2/3 of the time), 2400 steps of 16. After
    # 1200 it reconstructs X-rays worse (10.9 vs 8.0 grey levels) and fine-tunes on it draw them with a
    # colour cast: FID 43.1 vs 10.8, pneumothorax side 0.42 vs 0.71 (README, Fine-tuning).
    # Pairs with a pneumothorax shown 3x and with edema 2x per epoch (repeat_findings): the findings it
    # learnt last. Over training seeds 0-2 (8 images per report-language prompt): pneumothorax side 0.98 /
    # 0.79 / 0.92 and size 0.97 / 0.69 / 0.88 against 0.62 / 0.31 / 0.67 and 0.50 each without; edema
    # 0.97-0.99 against 0.87-0.95 (README, Evaluation: *Seen more often*).
    # Sampling: 10 steps (the same AUROC as 15). LoRA and the text encoder alone: 400 steps. The text
    # encoder's validation loss has levelled off by then (0.488 at 400, 0.485 at 800); LoRA's has not
    # (0.201, 0.189), but it drew no finding at 800 either. Downstream: 8 synthetic images per spec.
    # Three worker processes of one thread each (03, 05): two give 1.4x the throughput of one process
    # with two threads on 2 cores; a third gives the same throughput as two (6.05 vs 5.95 steps/s, 120
    # U-Net + text encoder steps each) and keeps both cores busy until 03's last two runs end (about 4%
    # faster than two workers, measured on hosts of different speed).
    # Chosen for `make reproduce` to take under 30 minutes (README, Profiles): about 34.8 min with LoRA
    # and text-encoder runs of 800 steps and VAE passes in batches of 64.
    "demo": Config(profile="demo", n_images=6000, composed_reports=8000, image_size=64, base_vae_steps=2400,
                   base_vae_batch_size=16, base_vae_crop=24, base_steps=400, learning_rate=2e-3, max_steps=1600,
                   lora_max_steps=400, text_encoder_max_steps=400, batch_size=16, zero_terminal_snr=True, timestep_bias=8.0,
                   repeat_findings="Pneumothorax=3,Edema=2",
                   checkpoint_every=400, validation_every=200, sampling_steps=10, eval_prompts=24,
                   synthetic_split_prompts=128, classifier_epochs=8, downstream_images_per_prompt=8,
                   worker_processes=3),
    "paper": Config(profile="paper", data_source="mimic", n_images=None, image_size=512,
                    base_model="stable-diffusion-v1-5/stable-diffusion-v1-5", learning_rate=1e-5,
                    lr_warmup_steps=500, batch_size=8, gradient_accumulation=32, max_steps=12500,
                    mixed_precision="bf16", gradient_checkpointing=True, ema_decay=0.9999, snr_gamma=5.0,
                    latent_dtype="float16", loader_workers=4,
                    checkpoint_every=1000, checkpoints_total_limit=3, validation_every=1000, sample_batch_size=8,
                    eval_prompts=2000, images_per_prompt=2, eval_real_images=5000),
}


# The paper profile's code path and settings at counts a 2-core CPU runs in under 40 minutes, on Stable
# Diffusion 1.5's published architecture with random weights (built locally: no download) and a
# MIMIC-CXR-format tree (`make smoke-paper` generates one; any other is given as mimic_root). It proves
# the paper path's code, shapes and memory at 512 px, never image quality; 05 scores the base, LoRA and the
# best full fine-tune. Its fine-tunes keep no EMA: with one, the U-Net + text encoder run would leave too
# little of a 24 GB machine's RAM (docs/paper_scale.md).
PROFILES["paper_smoke"] = dataclasses.replace(
    PROFILES["paper"], profile="paper_smoke", base_model=None, base_architecture="sd-1.5", base_vae_steps=0, base_steps=0,
    ema_decay=0.0, n_images=16, batch_size=1, gradient_accumulation=1, max_steps=2, lr_warmup_steps=0, checkpoint_every=2,
    checkpoints_total_limit=1, validation_every=2, validation_images=False, loader_workers=1, sampling_steps=2,
    images_per_prompt=1, sample_batch_size=2, synthetic_prompts="test", synthetic_split_prompts=1, guidance_sweep="1,4",
    steps_sweep="1,2", prompt_set_size=1, eval_prompts=2, classifier_epochs=2, downstream_seeds="0",
    downstream_images_per_prompt=1, forgetting_scenes=2, eval_models="base,lora_unet,full_unet_te")


def summary(cfg: Config, names: list[str]) -> "pd.DataFrame":
    """The named fields of a config as a one-column table (for a notebook to show what it runs with)."""
    import pandas as pd

    return pd.Series({"profile": cfg.profile, **{n: getattr(cfg, n) for n in names}}, dtype=object).to_frame("value")


def relative(path: Path) -> str:
    """A path relative to the project root when inside it (stable across clones), else absolute."""
    path = Path(path)
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)
