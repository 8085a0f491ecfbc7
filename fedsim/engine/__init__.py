"""Engines that execute an experiment, keyed by ``runtime.engine``."""

from __future__ import annotations

from fedsim.engine.sequential import run_sequential

ENGINES = {"sequential": run_sequential}

__all__ = ["ENGINES", "run_sequential"]
