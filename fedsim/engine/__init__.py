"""Engines that execute an experiment, keyed by ``runtime.engine``.

``sequential`` runs in this process; ``ray`` lives in the top-level ``actors`` package, so that ``fedsim``
itself never imports Ray. Each is imported only when chosen: the sequential engine holds a model (peft,
transformers, bitsandbytes), which the Ray engine's driver never loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fedsim.config import ExperimentConfig


def _run_sequential(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    from fedsim.engine.sequential import run_sequential

    return run_sequential(cfg, run_dir, resume)


def _run_ray(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    from actors.runtime import run_ray

    return run_ray(cfg, run_dir, resume)


# engine(cfg, run_dir, resume=False) -> summary
ENGINES: dict[str, Callable[..., dict[str, Any]]] = {
    "sequential": _run_sequential,
    "ray": _run_ray,
}


def __getattr__(name: str) -> Any:
    """``from fedsim.engine import run_sequential``, importing the sequential engine on first use."""
    if name == "run_sequential":
        from fedsim.engine.sequential import run_sequential

        return run_sequential
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ENGINES", "run_sequential"]
