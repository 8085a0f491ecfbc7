"""A run directory: resolved config, per-round metrics, summary and adapter, all crash-safe.

``metrics.jsonl`` is appended one flushed, fsynced line per round, so a crash leaves every finished round
readable; every other file is written to a temporary name, fsynced and renamed into place, and the folder
is fsynced after the rename, so that a power loss cannot undo it either.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


STAGED = "~"  # atomic_dir(target)'s staging and set-aside folders are named .<target>~<random>[.old]


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (files created, renamed or deleted in it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: Path) -> None:
    """``fsync_path`` every file and folder under ``folder``, deepest first, ``folder`` last."""
    for root, _, names in os.walk(folder, topdown=False):
        for name in names:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def make_dirs(path: Path) -> None:
    """``mkdir -p`` whose new folders survive a power loss: the parent of each one created is fsynced."""
    if not path.is_dir():
        make_dirs(path.parent)
        path.mkdir(exist_ok=True)
        fsync_path(path.parent)


def _write_synced(fd: int, data: bytes, path: Path) -> None:
    """Write all of ``data`` to ``fd`` and fsync it; an error (a full disk, say) names ``path``, the file the
    user will look for (os.write's own error names no file)."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror} (writing {len(data)} bytes)", str(path)) from err


def write_file(path: Path, data: bytes) -> None:
    """Create (or truncate) ``path`` with ``data``, fsynced: for files in a folder that is renamed into place
    as a whole (``atomic_dir``)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        _write_synced(fd, data, path)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``, durably."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path`` and fsync the folder."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        try:
            _write_synced(fd, data, path)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def staged_dirs(target: Path) -> list[Path]:
    """The staging and set-aside folders of ``atomic_dir(target)`` on disk: one in use, or those a crash left."""
    prefix = f".{target.name}{STAGED}"
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir()
                  if p.name.startswith(prefix) and STAGED not in p.name[len(prefix):] and p.is_dir())


def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)
    fsync_path(dst.parent)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it replaces ``target`` so that a crash or power loss
    at any moment leaves one of them whole on disk: the staging folder is fsynced, ``target`` renamed aside,
    the staging folder renamed in, the parent fsynced after each rename, and only then is the old one
    deleted, with any folders that earlier crashes left (``staged_dirs``)."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}{STAGED}"))
    aside = staging.with_name(staging.name + ".old")
    try:
        yield staging
        sync_tree(staging)
        fsync_path(target.parent)  # the staging folder's own entry: a finished one must outlive a power loss
        if target.exists():
            _replace(target, aside)
        _replace(staging, target)
    except BaseException:
        if aside.exists() and not target.exists():  # failed between the two renames: the old one goes back
            os.replace(aside, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for leftover in staged_dirs(target):
        shutil.rmtree(leftover)


# Libraries whose versions change a run's numbers (kernels, tokenizers, quantization), recorded in its summary.
RECORDED_LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "bitsandbytes", "datasets", "numpy", "ray",
                      "dp-accounting")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a run's results depend on (None: not installed)."""
    versions = {}
    for name in RECORDED_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def default_run_dir(name: str) -> Path:
    return Path("runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunWriter:
    """Writes a run directory. ``resume_round``: continue a run from its checkpoint of that round, dropping
    the metrics lines of later rounds (they are run again)."""

    def __init__(self, run_dir: str | Path, resume_round: int | None = None):
        self.dir = Path(run_dir)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.adapter_dir = self.dir / "adapter"
        if (self.dir / "summary.json").exists():
            raise FileExistsError(f"output.dir {str(self.dir)!r} already holds a finished run; choose another "
                                  "output.dir")
        if resume_round is None:
            if self.metrics_path.exists():
                raise FileExistsError(f"output.dir {str(self.dir)!r} already holds a run; choose another "
                                      "output.dir, or continue it with fedsim run --resume")
            make_dirs(self.dir)
        else:
            kept = [r for r in read_metrics(self.dir) if r["round"] <= resume_round]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.dir / "config.yaml", yaml_text)

    def log_round(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            _write_synced(fd, line, self.metrics_path)
        finally:
            os.close(fd)

    def write_adapter(self, files: dict[str, bytes]) -> None:
        """Write the adapter's files into ``adapter/`` through a staging folder renamed into place."""
        with atomic_dir(self.adapter_dir) as staging:
            for name, content in files.items():
                (staging / name).write_bytes(content)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rounds a run has logged so far (also while it runs, or after it crashed: a last line cut short
    by the crash is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
    return records
