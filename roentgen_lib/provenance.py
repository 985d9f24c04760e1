"""Where a result came from: git commit, package versions, machine. Read by figures and the runner."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess

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
    """Python version, platform and CPU count."""
    import os

    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count() or 0}
