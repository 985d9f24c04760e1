"""Image/prompt pairs as a diffusion model reads them: VAE latents, token ids and (for a frozen text
encoder) its states, encoded once into shards on disk and read back memory-mapped.

Fine-tuning (02, 03), the demo base's pretraining and evaluation's forgetting measure all read pairs
from here, so nothing holds a split in memory: images are decoded one shard at a time while
encoding, and each shard (`SHARD_ROWS` rows, stored in the profile's `latent_dtype`) is written
atomically as a .npy file. A shard set is named by what it holds (the encoder's weights, the pairs,
the image size and dtype), so later runs and notebooks reuse it. Under `accelerate launch`, process k
encodes shards k, k + n, ...; an encoding killed mid-way keeps its finished shards.

Usage::

    pairs = encode_pairs(base, dataset_source(split, key), 64, cache_text=True, folder=cache, dtype="float32")
    batch = pairs.batch(np.array([3, 1, 4]))      # latent mean and std, token ids, text states
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm import tqdm

from roentgen_lib.files import write_file_atomic
from roentgen_lib.models import Base, images_to_tensor, vae_batch_size, weights_fingerprint

# Rows per shard: a multiple of every encoding batch (VAE_BATCH_SIZE, TEXT_BATCH_SIZE), so cutting the
# pairs into shards never changes which rows are encoded together, nor their float rounding.
SHARD_ROWS = 1024
TEXT_BATCH_SIZE = 256
CACHE_FOLDER = ".latent_cache"  # where a stage keeps its shard sets: under the models folder, or the evaluation folder


@dataclass(frozen=True)
class PairSource:
    """Image/prompt pairs to encode, read one slice (start, stop) at a time."""

    key: str  # names the pairs' content: a dataset's fingerprint and split, or a digest of images and prompts
    count: int
    images: Callable[[int, int], list[Image.Image]]
    prompts: Callable[[int, int], list[str]]


def dataset_source(split, key: str) -> PairSource:
    """The pairs of a Hugging Face dataset split (columns image, prompt), decoded slice by slice."""
    return PairSource(key, len(split), lambda a, b: list(split.select(range(a, b))["image"]),
                      lambda a, b: list(split.select(range(a, b))["prompt"]))


def list_source(images: list[Image.Image], prompts: list[str]) -> PairSource:
    """Pairs already in memory (the base's general-domain scenes), named by a digest of their content."""
    digest = hashlib.sha256()
    for image, prompt in zip(images, prompts):
        digest.update(f"{image.mode}{image.size}{prompt}".encode())
        digest.update(image.tobytes())
    return PairSource(digest.hexdigest(), len(images), lambda a, b: images[a:b], lambda a, b: prompts[a:b])


class ShardedArray:
    """Rows stored in .npy shards of `SHARD_ROWS` rows, memory-mapped on first read in each process."""

    def __init__(self, files: list[Path], count: int) -> None:
        self.files, self.count = files, count
        self._maps: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:  # a DataLoader worker maps the files itself, rather than receiving copies
        return {"files": self.files, "count": self.count, "_maps": None}

    def rows(self, index: np.ndarray) -> torch.Tensor:
        """The rows at `index`, in that order, as one tensor (in the stored dtype)."""
        if self._maps is None:
            self._maps = [np.load(f, mmap_mode="r") for f in self.files]
        shards, offsets = np.divmod(np.asarray(index), SHARD_ROWS)
        return torch.from_numpy(np.stack([self._maps[s][o] for s, o in zip(shards, offsets)]))


def encode_shards(folder: Path, count: int, encode: Callable[[int, int], np.ndarray], progress: bool,
                  desc: str) -> ShardedArray:
    """Write `encode(start, stop)` for every shard of `count` rows not yet in `folder`; return them all.

    Each process encodes its share (shards k, k + n, ... under `accelerate launch`), then waits for the others.
    """
    state = PartialState()
    files = [folder / f"shard-{k:05d}.npy" for k in range(math.ceil(count / SHARD_ROWS))]
    mine = [k for k, f in enumerate(files) if k % state.num_processes == state.process_index and not f.is_file()]
    for k in tqdm(mine, desc=desc, unit="shard", disable=not progress or not mine):
        array = encode(k * SHARD_ROWS, min((k + 1) * SHARD_ROWS, count))
        write_file_atomic(files[k], lambda path: save_npy(path, array))
    state.wait_for_everyone()
    return ShardedArray(files, count)


def save_npy(path: Path, array: np.ndarray) -> None:
    """`array` as a .npy file at `path` exactly (np.save would add a suffix to a temporary name)."""
    with open(path, "wb") as handle:
        np.save(handle, array)


@dataclass
class Batch:
    """Rows of `Pairs`: the latent distribution, token ids and, for a frozen text encoder, its states."""

    mean: torch.Tensor
    std: torch.Tensor
    ids: torch.Tensor
    states: torch.Tensor | None


@dataclass
class Pairs:
    """Encoded pairs on disk, and the empty prompt shown in place of a caption that is dropped."""

    latents: ShardedArray  # (2, C, h, w) per row: the VAE distribution's mean and std
    input_ids: ShardedArray  # (context,) per row
    text_states: ShardedArray | None  # (context, width) per row, when the text encoder is frozen
    empty_ids: torch.Tensor  # (1, context)
    empty_state: torch.Tensor | None  # (1, context, width)
    key: str  # what the pairs hold: encoders, pairs, size and dtype

    def __len__(self) -> int:
        return len(self.latents)

    def batch(self, index: np.ndarray, text_index: np.ndarray | None = None) -> Batch:
        """Rows `index`; with `text_index`, each row's text taken from another row (shuffled captions)."""
        text_index = index if text_index is None else text_index
        latents = self.latents.rows(index).float()
        states = self.text_states.rows(text_index).float() if self.text_states is not None else None
        return Batch(latents[:, 0], latents[:, 1], self.input_ids.rows(text_index).long(), states)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's context (77 for CLIP)."""
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


@torch.no_grad()
def encode_text(text_encoder, input_ids: torch.Tensor, batch_size: int = TEXT_BATCH_SIZE) -> torch.Tensor:
    """Text-encoder hidden states for token ids, in batches."""
    device = next(text_encoder.parameters()).device
    return torch.cat([text_encoder(input_ids[i : i + batch_size].to(device))[0].cpu()
                      for i in range(0, len(input_ids), batch_size)])


@torch.no_grad()
def encode_images(vae, images: list[Image.Image], size: int, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE's latent distribution for each image (`vae_batch_size` at a time)."""
    device, batch_size = next(vae.parameters()).device, batch_size or vae_batch_size(size)
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(images_to_tensor(images[i : i + batch_size], size).to(device=device, dtype=vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    # The encoder hands back channels-last views; a contiguous copy makes freshly encoded and stored
    # latents the same tensors (memory format changes the U-Net's float rounding, so the results).
    return torch.cat(means).contiguous(), torch.cat(stds).contiguous()


def shard_key(*parts: str) -> str:
    return hashlib.sha256(":".join(parts).encode()).hexdigest()[:32]


def encode_pairs(base: Base, source: PairSource, size: int, cache_text: bool, folder: Path, dtype: str = "float32",
                 progress: bool = True) -> Pairs:
    """Encode `source` with the base's VAE (and its text encoder when `cache_text`) into shards under `folder`."""
    latent_key = shard_key(weights_fingerprint(base.vae), source.key, str(size), dtype)
    latents = encode_shards(Path(folder) / f"latents-{latent_key}", source.count,
                            lambda a, b: np.stack(encode_images(base.vae, source.images(a, b), size), axis=1).astype(dtype),
                            progress, "encode latents")
    token_key = shard_key(base.tokenizer.name_or_path, str(len(base.tokenizer)), str(base.tokenizer.model_max_length),
                          source.key)
    ids = encode_shards(Path(folder) / f"tokens-{token_key}", source.count,
                        lambda a, b: tokenize(base.tokenizer, source.prompts(a, b)).numpy().astype(np.int32),
                        progress, "tokenize")
    empty_ids = tokenize(base.tokenizer, [""])
    key = shard_key(latent_key, token_key)
    if not cache_text:
        return Pairs(latents, ids, None, empty_ids, None, key)
    text_key = shard_key(weights_fingerprint(base.text_encoder), token_key, dtype)
    empty_file = Path(folder) / f"text-{text_key}-empty.npy"
    last = math.ceil(source.count / SHARD_ROWS) - 1

    def states(start: int, stop: int) -> np.ndarray:
        rows = ids.rows(np.arange(start, stop)).long()
        if start // SHARD_ROWS != last:
            return encode_text(base.text_encoder, rows).numpy().astype(dtype)
        # the empty prompt is encoded as the last row of the last batch, and saved before that shard
        both = encode_text(base.text_encoder, torch.cat([rows, empty_ids])).numpy().astype(dtype)
        write_file_atomic(empty_file, lambda path: save_npy(path, both[-1:]))
        return both[:-1]

    text = encode_shards(Path(folder) / f"text-{text_key}", source.count, states, progress, "encode text")
    return Pairs(latents, ids, text, empty_ids, torch.from_numpy(np.load(empty_file)).float(), shard_key(key, text_key))
