"""Reliability: offline profiles never touch the network; unwritable outputs stop before work starts."""

import dataclasses
import socket

import pytest

from roentgen_lib import config, files, sample, train
from roentgen_lib.data import dataset


def refuse_network(monkeypatch) -> list:
    """Make every socket connection and name lookup fail loudly, recording the attempt."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted in an offline profile")

    for target, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"), (socket, "create_connection"),
                         (socket, "getaddrinfo")):
        monkeypatch.setattr(target, name, refuse)
    return attempts


def test_offline_profile_builds_trains_and_samples_without_network(tiny_world, tmp_path, monkeypatch):
    attempts = refuse_network(monkeypatch)
    dataset.build_dataset(dataclasses.replace(tiny_world, output_dir=str(tmp_path / "dataset")))
    cfg = dataclasses.replace(tiny_world, run_name="offline", resume=False, max_steps=2, validation_every=2,
                              checkpoint_every=2, models_dir=str(tmp_path / "models"))
    train.finetune(cfg)
    model = sample.load_model(cfg, "offline")
    images = sample.generate(model, ["large left pleural effusion."], [0], sample.SamplingSettings(steps=2, batch_size=1))
    assert images.shape[0] == 1 and attempts == []


def test_unwritable_output_is_refused_before_work_starts(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(files.OutputError, match="cannot write to .*a_file"):
        dataset.build_dataset(config.resolve("tiny", output_dir=str(blocker / "dataset")))
    assert blocker.read_text() == "not a folder"


def test_training_killed_by_sigkill_resumes_to_the_same_weights(tiny_world, tmp_path):
    """SIGKILL (no Python cleanup) at whatever step the process has reached after its first checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import torch
    from safetensors.torch import load_file

    settings = {"max_steps": 30, "checkpoint_every": 5, "validation_every": 30, "train_text_encoder": True,
                "models_dir": str(tmp_path / "models")}
    straight = train.finetune(dataclasses.replace(tiny_world, run_name="sigkill_straight", resume=False, **settings))
    run_dir = tmp_path / "models" / "sigkill_resumed"
    overrides = {"output_dir": tiny_world.output_dir, "base_model": tiny_world.base_model, "run_name": run_dir.name,
                 **settings}
    command = [sys.executable, "-m", "roentgen_lib.train", "--profile", "tiny",
               *[a for k, v in overrides.items() for a in ("-p", f"{k}={v}")]]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(run_dir.glob("checkpoint-*")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL and not (run_dir / "pipeline").exists(), "killed before the end"
    resumed = train.finetune(dataclasses.replace(tiny_world, run_name=run_dir.name, resume=True, **settings))
    for file in sorted(straight.output_dir.rglob("*.safetensors")):
        a, b = load_file(file), load_file(resumed.output_dir / file.relative_to(straight.output_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file.name


def kill_when(process, ready, timeout: float = 120) -> None:
    """SIGKILL `process` as soon as `ready()` holds (it must still be running then)."""
    import os
    import signal
    import time

    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the process ended before it could be killed"


def test_dataset_build_killed_midway_resumes_to_the_same_dataset(tmp_path):
    """01's build killed after its first shards: the rerun builds only the rest, and the bytes match a straight build."""
    import subprocess
    import sys

    straight = dataset.build_dataset(config.resolve("tiny", output_dir=str(tmp_path / "straight")), shard_rows=2)
    target = tmp_path / "resumed"
    code = ("from roentgen_lib import config; from roentgen_lib.data import dataset; "
            f"dataset.build_dataset(config.resolve('tiny', output_dir={str(target)!r}), shard_rows=2)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / ".resumed.parts"
    kill_when(process, lambda: len(list(parts.glob("train-*"))) >= 2)
    assert not target.exists(), "killed before the dataset was complete"
    resumed = dataset.build_dataset(config.resolve("tiny", output_dir=str(target)), shard_rows=2)
    assert resumed.reused_shards >= 2 and resumed.fingerprint == straight.fingerprint
    assert not parts.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_encoding_killed_midway_resumes_from_its_finished_shards(tiny_world, tmp_path, monkeypatch):
    """Latents of 160 scenes in shards of 16, SIGKILLed after two shards: the rerun encodes only the rest."""
    import subprocess
    import sys

    import numpy as np
    import torch

    from roentgen_lib import models, pretrain
    from roentgen_lib.train import latents

    folder = tmp_path / "shards"
    code = ("from roentgen_lib import models, pretrain; from roentgen_lib.train import latents; latents.SHARD_ROWS = 16; "
            f"base = models.load_base({tiny_world.base_model_path!r}); "
            "scenes = pretrain.general_scenes(160, 32, seed=0); "
            f"latents.encode_pairs(base, latents.list_source(*scenes), 32, False, {str(folder)!r}, progress=False)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: len(list(folder.glob("latents-*/shard-*.npy"))) >= 2)
    finished = len(list(folder.glob("latents-*/shard-*.npy")))
    assert 2 <= finished < 10, "killed mid-way"
    monkeypatch.setattr(latents, "SHARD_ROWS", 16)
    encoded = []
    real = latents.encode_images
    monkeypatch.setattr(latents, "encode_images", lambda vae, images, size: encoded.append(len(images)) or real(vae, images, size))
    base, scenes = models.load_base(tiny_world.base_model_path), pretrain.general_scenes(160, 32, seed=0)
    resumed = latents.encode_pairs(base, latents.list_source(*scenes), 32, False, folder, progress=False)
    assert len(encoded) == 10 - finished
    straight = latents.encode_images(base.vae, scenes[0], 32)
    assert torch.equal(resumed.batch(np.arange(160)).mean, straight[0])


def test_a_full_disk_is_reported_before_work_starts(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))  # 1 MB free
    cfg = config.resolve("tiny", output_dir=str(tmp_path / "dataset"), n_images=2000)
    with pytest.raises(files.OutputError, match=r"the dataset of 2000 images needs about 4 MB in .*only 1 MB are free"):
        dataset.build_dataset(cfg)
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing half-written


def test_disk_full_mid_write_leaves_the_previous_dataset_whole(tiny_cfg, monkeypatch):
    import datasets as hf_datasets
    import errno

    first = dataset.build_dataset(tiny_cfg)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_datasets.DatasetDict, "save_to_disk", full)
    with pytest.raises(OSError, match="No space left"):
        dataset.build_dataset(tiny_cfg)
    assert dataset.read_manifest(first.path)["fingerprint"] == first.fingerprint
    assert dataset.load(tiny_cfg)["train"].num_rows == first.dataset["train"].num_rows
    assert not [p for p in first.path.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_kill_during_checkpoint_writing_keeps_the_previous_one(tmp_path):
    """SIGKILL while checkpoint-2 (400 MB) is being written: checkpoint-1 stays the latest, whole and loadable."""
    import subprocess
    import sys

    import torch

    from roentgen_lib import checkpoints

    code = ("import torch; from roentgen_lib import checkpoints as c; from pathlib import Path; "
            f"run = Path({str(tmp_path)!r}); "
            "c.write_checkpoint(run, 1, {'models': {'w': torch.arange(4.0)}}, keep=2); "
            "c.write_checkpoint(run, 2, {'models': {'w': torch.zeros(100_000_000)}}, keep=2)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(process, lambda: any(p.name.startswith(".checkpoint-2.tmp-") for p in tmp_path.iterdir()))
    latest = checkpoints.latest_checkpoint(tmp_path)
    assert latest is not None and latest.name == "checkpoint-1"
    step, states = checkpoints.read_checkpoint(latest)
    assert step == 1 and torch.equal(states["models"]["w"], torch.arange(4.0))


def test_synthetic_generation_killed_midway_resumes_to_the_same_dataset(tiny_world, tmp_path):
    """04's generation SIGKILLed after two batches: the rerun draws only the rest, image for image the same."""
    import subprocess
    import sys

    import numpy as np

    from roentgen_lib.sample import synthetic

    prompts = ["large left pleural effusion.", "no acute cardiopulmonary process.", "moderate cardiomegaly.",
               "small right pneumothorax.", "mild pulmonary edema."]
    settings = sample.SamplingSettings(steps=2, batch_size=1)
    model = sample.load_model(tiny_world, "base")
    straight = synthetic.generate_dataset(model, synthetic.list_prompts(prompts), tmp_path / "straight", settings, 2, 0,
                                          progress=False)
    target = tmp_path / "resumed"
    code = ("from roentgen_lib import config, sample; from roentgen_lib.sample import synthetic; "
            f"cfg = config.resolve('tiny', output_dir={tiny_world.output_dir!r}, base_model={tiny_world.base_model!r}); "
            f"synthetic.generate_dataset(sample.load_model(cfg, 'base'), synthetic.list_prompts({prompts!r}), "
            f"{str(target)!r}, sample.SamplingSettings(steps=2, batch_size=1), 2, 0, progress=False)")
    process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / ".resumed.parts"
    kill_when(process, lambda: len(list(parts.glob("batch-*.safetensors"))) >= 2)
    assert not target.exists()
    resumed = synthetic.generate_dataset(model, synthetic.list_prompts(prompts), target, settings, 2, 0, progress=False)
    assert synthetic.read_manifest(target)["last_run"]["images_drawn"] < len(straight)  # only the missing batches
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(straight["image"], resumed["image"]))
