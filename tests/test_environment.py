"""The environment is pinned the same way everywhere, and nothing private is tracked."""

import re
import subprocess
import tomllib

from roentgen_lib.config import PROJECT_ROOT


def test_environment_yml_pins_match_pyproject():
    pyproject = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = re.findall(r"^\s+- ([A-Za-z0-9_.-]+==[^\s]+)\s*$", (PROJECT_ROOT / "environment.yml").read_text(), re.M)
    assert sorted(conda) == sorted(pyproject)
    assert all("==" in d for d in pyproject), "every dependency is pinned"


def test_no_tracked_images_or_weights_outside_figures():
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True, text=True).stdout.split()
    private = re.compile(r"\.(png|jpe?g|dcm|safetensors|ckpt|bin|pt|pth|arrow|parquet)$", re.I)
    offending = [f for f in tracked if private.search(f) and not f.startswith("figures/")]
    assert not offending


def test_the_library_never_unpickles():
    """Weights and states are read with safetensors and JSON only: no pickle-based loader anywhere in the library."""
    unpickling = re.compile(r"\b(torch\.load|pickle\.loads?|joblib\.load|np\.load\([^)]*allow_pickle\s*=\s*True)")
    offending = [f"{path.name}:{n}" for path in sorted((PROJECT_ROOT / "roentgen_lib").rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if unpickling.search(line)]
    assert not offending
