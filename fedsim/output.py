"""A run directory: resolved config, per-round metrics, summary and adapter, all crash-safe.

``metrics.jsonl`` is appended one flushed, fsynced line per round, so a crash leaves every finished round
readable; every other file is written to a temporary name and renamed into place.
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


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a staging folder beside ``target``; on success it replaces ``target`` in one rename."""
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# Libraries whose versions change a run's numbers (kernels, tokenizers, quantization), recorded in its summary.
RECORDED_LIBRARIES = ("torch", "transformers", "tokenizers", "peft", "bitsandbytes", "datasets", "numpy", "ray")


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
            self.dir.mkdir(parents=True, exist_ok=True)
        else:
            kept = [r for r in read_metrics(self.dir) if r["round"] <= resume_round]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def write_config(self, yaml_text: str) -> None:
        atomic_write_text(self.dir / "config.yaml", yaml_text)

    def log_round(self, record: dict[str, Any]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

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
