"""Engines that execute an experiment, keyed by ``runtime.engine``.

``sequential`` runs in this process; ``ray`` lives in the top-level ``actors`` package and is imported only
when chosen, so that ``fedsim`` itself never imports Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fedsim.config import ExperimentConfig
from fedsim.engine.sequential import run_sequential


def _run_ray(cfg: ExperimentConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    from actors.runtime import run_ray

    return run_ray(cfg, run_dir, resume)


# engine(cfg, run_dir, resume=False) -> summary
ENGINES: dict[str, Callable[..., dict[str, Any]]] = {
    "sequential": run_sequential,
    "ray": _run_ray,
}

__all__ = ["ENGINES", "run_sequential"]
