"""Resumable training checkpoints written with safetensors only, atomically.

A checkpoint folder `checkpoint-<step>` holds everything needed to continue exactly: trained
weights, optimizer and learning-rate scheduler state, EMA shadow weights, and the random number
generator states of every process. Tensors go to `.safetensors`, everything else to JSON; nothing is
pickled, so loading a checkpoint cannot execute code. The folder is written under a temporary name
and renamed when complete: a crash mid-write leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from roentgen_lib.files import check_free_space, temporary_sibling, write_json_atomic

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def split_tensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Replace every tensor in a nested dict/list by a reference string; return (skeleton, tensors)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {str(k): walk(v, f"{path}.{k}") for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        return node

    return walk(tree, prefix), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `split_tensors` (dict keys that were ints come back as ints, as torch expects)."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        return {int(k) if k.lstrip("-").isdigit() else k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def save_state(folder: Path, name: str, skeleton: Any, tensors: dict[str, torch.Tensor]) -> None:
    """One state tree, split by `split_tensors`, as <name>.json (structure) + <name>.safetensors (tensors)."""
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(folder: Path, name: str) -> Any:
    """Read back a state tree written by `save_state`."""
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return join_tensors(json.loads((folder / f"{name}.json").read_text()), tensors)


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run as (step, folder), oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT.match(p.name)) and p.is_dir()]
    return sorted(found)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def write_checkpoint(run_dir: Path, step: int, states: dict[str, Any], keep: int) -> Path:
    """Write states atomically as checkpoint-<step>; keep the newest `keep` checkpoints."""
    target = run_dir / f"checkpoint-{step}"
    split = {name: split_tensors(state, name) for name, state in states.items()}  # once: it copies GPU tensors to host
    needed = sum(t.numel() * t.element_size() for _, tensors in split.values() for t in tensors.values())
    check_free_space(run_dir, needed, f"checkpoint-{step}")
    work = temporary_sibling(target)
    try:
        for name, (skeleton, tensors) in split.items():
            save_state(work, name, skeleton, tensors)
        write_json_atomic(work / "checkpoint.json", {"step": step, "states": sorted(states)})
        if target.exists():
            shutil.rmtree(target)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return target


def read_checkpoint(folder: Path) -> tuple[int, dict[str, Any]]:
    """(step, states) of a checkpoint folder."""
    info = json.loads((folder / "checkpoint.json").read_text())
    return info["step"], {name: load_state(folder, name) for name in info["states"]}
