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


def git_state() -> dict[str, str | bool | None]:
    """Commit sha and whether the work tree has uncommitted changes (None outside a checkout)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain")
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


def machine() -> dict[str, str | int]:
    """Python version, platform, CPU model and count: timings, and float rounding, differ between CPU models."""
    import os

    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu_model(),
            "cpus": os.cpu_count() or 0}


def cpu_model() -> str:
    """The CPU's model name (Linux: from /proc/cpuinfo), or what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
