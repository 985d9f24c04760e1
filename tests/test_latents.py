"""Encoded pairs: latents, token ids and frozen text states in shards on disk, read memory-mapped."""

import numpy as np
import pytest
import torch

from roentgen_lib import models, pretrain
from roentgen_lib.train import latents


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 16 rows, and text encoded 16 at a time, so a few dozen pairs span several shards."""
    monkeypatch.setattr(latents, "SHARD_ROWS", 16)
    monkeypatch.setattr(latents, "TEXT_BATCH_SIZE", 16)


def test_pairs_are_encoded_once_into_shards_and_read_back_exactly(tiny_world, tmp_path, small_shards, monkeypatch):
    base = models.load_base(tiny_world.base_model_path)
    images, prompts = pretrain.general_scenes(40, 32, seed=0)
    pairs = latents.encode_pairs(base, latents.list_source(images, prompts), 32, True, tmp_path, progress=False)
    assert len(pairs) == 40 and len(list((tmp_path).glob("latents-*/shard-*.npy"))) == 3
    index = np.array([39, 0, 17, 16, 5])
    batch = pairs.batch(index)
    mean, std = latents.encode_images(base.vae, images, 32)
    ids = latents.tokenize(base.tokenizer, [*prompts, ""])
    states = latents.encode_text(base.text_encoder, ids, batch_size=16)
    assert torch.equal(batch.mean, mean[index]) and torch.equal(batch.std, std[index])
    assert torch.equal(batch.ids, ids[index]) and torch.equal(batch.states, states[index])
    assert torch.equal(pairs.empty_ids, ids[-1:]) and torch.equal(pairs.empty_state, states[-1:])
    assert isinstance(pairs.latents._maps[0], np.memmap), "read from disk, not held in memory"
    monkeypatch.setattr(latents, "encode_images", lambda *a, **k: pytest.fail("encoded again despite the shards"))
    again = latents.encode_pairs(base, latents.list_source(images, prompts), 32, True, tmp_path, progress=False)
    assert again.key == pairs.key and torch.equal(again.batch(index).mean, batch.mean)
    reversed_text = index[::-1].copy()
    shuffled = pairs.batch(index, text_index=reversed_text)
    assert torch.equal(shuffled.states, states[reversed_text]) and torch.equal(shuffled.mean, mean[index])


def test_other_pairs_or_another_dtype_get_their_own_shards(tiny_world, tmp_path, small_shards):
    base = models.load_base(tiny_world.base_model_path)
    images, prompts = pretrain.general_scenes(20, 32, seed=0)
    first = latents.encode_pairs(base, latents.list_source(images, prompts), 32, False, tmp_path, progress=False)
    fewer = latents.encode_pairs(base, latents.list_source(images[:-1], prompts[:-1]), 32, False, tmp_path, progress=False)
    half = latents.encode_pairs(base, latents.list_source(images, prompts), 32, False, tmp_path, "float16", progress=False)
    assert len({first.key, fewer.key, half.key}) == 3 and len(list(tmp_path.glob("latents-*"))) == 3
    assert half.latents.rows(np.array([0])).dtype == torch.float16 and first.text_states is None
    assert torch.allclose(half.batch(np.arange(20)).mean, first.batch(np.arange(20)).mean, atol=2e-3)
