"""Safe writing: atomic files and folders, content fingerprints. Shared by every stage.

A crash mid-write must never leave a file or folder that looks complete, so everything is written
beside its destination under a temporary name and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` via a temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        json.dump(data, tmp, indent=2, sort_keys=True, default=str)
        tmp.write("\n")
    os.chmod(tmp.name, 0o644)  # mkstemp makes files private; manifests are meant to be read
    os.replace(tmp.name, path)


def write_file_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(temporary_path)`, then rename the result to `path` (never a half-written `path`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        write(Path(name))
        os.chmod(name, 0o644)  # mkstemp makes files private; outputs are meant to be read
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)


class OutputError(OSError):
    """An output folder cannot be created or written; raised before any work is done."""


def ensure_writable(folder: Path) -> Path:
    """Create `folder` if needed and prove it takes a file, or raise OutputError naming it and why.

    Called before long work starts, so an unwritable or impossible output path costs seconds, not a run.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise OutputError(f"cannot write to {folder}: {error.strerror or error}; choose another output folder "
                          "or free the path") from error
    return folder


def check_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Raise OutputError before writing `what` (about `needed_bytes`) where less space is free.

    A full disk found before the work costs seconds; found mid-write it costs the work (atomic
    writes still leave no corrupt output behind).
    """
    free = shutil.disk_usage(ensure_writable(folder)).free
    if free < needed_bytes:
        raise OutputError(f"{what} needs about {needed_bytes / 2**20:,.0f} MB in {folder}, but only "
                          f"{free / 2**20:,.0f} MB are free; free some space or choose another output folder")


def temporary_sibling(path: Path) -> Path:
    """A fresh, empty folder next to `path` (same file system, so a rename is atomic)."""
    ensure_writable(path.parent)
    return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))


def plan_folder(out: Path, fingerprint: str, what: str) -> Path:
    """`.<name>.parts` beside `out`: where finished pieces of one plan wait for a rerun after a crash.

    `fingerprint` names what the pieces are made from; a folder left by another plan is discarded
    (with a warning naming `what`), so pieces of different inputs are never mixed.
    """
    parts = out.parent / f".{out.name}.parts"
    plan_file = parts / "plan.json"
    if parts.exists() and (not plan_file.is_file() or json.loads(plan_file.read_text()).get("fingerprint") != fingerprint):
        warnings.warn(f"discarding {what} in {parts}: they were made from other inputs or settings", stacklevel=3)
        shutil.rmtree(parts)
    ensure_writable(parts)
    write_json_atomic(plan_file, {"fingerprint": fingerprint})
    return parts


def replace_dir(source: Path, destination: Path) -> None:
    """Move a finished folder into place, replacing any previous one only once the new one is whole."""
    if destination.exists():
        old = destination.with_name(f".{destination.name}.old-{os.getpid()}")
        os.replace(destination, old)
        os.replace(source, destination)
        shutil.rmtree(old)
    else:
        os.replace(source, destination)


def fingerprint_dir(path: Path, pattern: str = "**/*") -> str:
    """SHA-256 over the relative names and bytes of the files under `path` matching `pattern`."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.glob(pattern) if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()
