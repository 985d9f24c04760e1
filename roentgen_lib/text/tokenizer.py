"""Stable Diffusion's CLIP tokenizer, built offline from the BPE vocabulary open-clip-torch ships.

Stable Diffusion tokenises prompts with OpenAI CLIP's byte-level BPE: 49,408 tokens (256 byte
tokens, their end-of-word forms, 48,894 merges, start and end markers) and a 77-token context, of
which 75 carry text. Hub weights cannot be fetched here, so we assemble the same vocabulary the
way CLIP does and hand it to `transformers.CLIPTokenizer`; tests check the ids against open_clip.
"""

from __future__ import annotations

import gzip
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import pandas as pd
from transformers import CLIPTokenizer, PreTrainedTokenizerBase
from transformers.convert_slow_tokenizer import bytes_to_unicode

from roentgen_lib.config import shipped_file

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's token-to-id map and merge list, in CLIP's own order, from the shipped BPE file."""
    lines = gzip.open(shipped_file("open_clip", BPE_FILE)).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_tokens = list(bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens]
    tokens += ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


@lru_cache(maxsize=1)
def load_clip_tokenizer() -> CLIPTokenizer:
    """Stable Diffusion 1.x's tokenizer (pads with <|endoftext|>, 77 tokens), built offline."""
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)


def token_lengths(prompts: Iterable[str]) -> np.ndarray:
    """Tokens per prompt including start and end markers, before any truncation."""
    tokenizer = load_clip_tokenizer()
    ids = tokenizer(list(prompts), add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    return np.array([len(i) for i in ids])


def truncated_part(prompt: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """The text a tokenizer's context drops from a prompt ("" when it fits); default: CLIP's 77 tokens."""
    tokenizer = tokenizer or load_clip_tokenizer()
    keep = tokenizer.model_max_length - len(tokenizer("", verbose=False)["input_ids"])  # room left by start/end markers
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return tokenizer.decode(ids[keep:]) if len(ids) > keep else ""


def length_summary(lengths: np.ndarray) -> pd.DataFrame:
    """Prompt length statistics and how many prompts the 77-token context truncates."""
    truncated = int((lengths > CONTEXT_LENGTH).sum())
    summary = {"prompts": len(lengths), "median tokens": float(np.median(lengths)),
               "95th percentile": float(np.percentile(lengths, 95)), "max tokens": int(lengths.max()),
               "truncated (> 77)": truncated, "truncated share": round(truncated / max(len(lengths), 1), 4)}
    return pd.DataFrame({"value": pd.Series(summary, dtype=object)})
