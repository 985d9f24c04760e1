"""Where a result came from: git commit, package versions, machine. Read by figures and the runner."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path

from roentgen_lib.config import PROJECT_ROOT

KEY_PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "peft", "accelerate", "datasets",
                "safetensors", "torchxrayvision", "open-clip-torch", "numpy", "pandas", "scikit-learn",
                "papermill", "nbval", "roentgen_lib")


# Environment variables that choose the CPU libraries' vector kernels, and with them float rounding.
KERNEL_PATH_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                         "OMP_NUM_THREADS")

# Folders the runs write and git tracks: a run's own outputs are not a change to what made them.
RUN_OUTPUTS = ("figures", "papermill_runs")


def git_state(root: Path = PROJECT_ROOT) -> dict[str, str | bool | None]:
    """Commit sha and whether anything but `RUN_OUTPUTS` has uncommitted changes (None outside a checkout).

    A run rewrites the committed figures as it goes, so counting them would mark every sidecar after
    the first as made from a modified tree; "dirty" says whether the code or data behind it was.
    """
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--", ".", *(f":(exclude){folder}" for folder in RUN_OUTPUTS))
    return {"sha": sha, "dirty": bool(status) if status is not None else None}


def package_versions(names: tuple[str, ...] = KEY_PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None when absent)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine() -> dict[str, str | int | dict]:
    """Python version, platform, CPU model and count, and the kernel path torch takes on it: timings, and
    float rounding, differ between CPU models, vector kernels and thread counts."""
    import os

    import torch

    pinned = {name: os.environ[name] for name in KERNEL_PATH_VARIABLES if name in os.environ}
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
            "cpus": os.cpu_count() or 0, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(), "kernel_path_variables": pinned}


def cpu_model() -> str:
    """The CPU's model name (Linux: from /proc/cpuinfo), or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
