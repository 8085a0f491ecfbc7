"""Helpers shared by the scheduler modules: config errors, trace-file reading, counter-based uniforms."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.config import ConfigError

# ceil(K * 1.3) must be 13 for K = 10, not 14 (10 * 1.3 == 13.000000000000002).
_CEIL_SLACK = 1e-9


def fail(key: str, value: Any, expected: str) -> None:
    raise ConfigError(f"config key 'scheduler.{key}' has invalid value {value!r}: expected {expected}")


def ceil_count(fraction: float, k: int) -> int:
    """ceil(fraction * k), robust to floating-point error in the product."""
    return int(math.ceil(fraction * k - _CEIL_SLACK))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


class TraceError(ConfigError):
    """A trace file named by a scheduler config key cannot be used."""


def trace_error(key: str, path: str | Path, problem: str) -> TraceError:
    return TraceError(f"config key 'scheduler.{key}': trace file {str(path)!r} {problem}")


def _no_duplicates(key: str, path: str | Path):
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in pairs:
            if name in out:
                raise trace_error(key, path, f"lists client {name!r} twice")
            out[name] = value
        return out
    return hook


def read_bytes(key: str, path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise trace_error(key, path, f"could not be read: {err.strerror or err}") from None


def read_json(key: str, path: str | Path) -> Any:
    """The JSON value in ``path``; an object naming a key twice is an error, not a silent last-one-wins."""
    try:
        text = read_bytes(key, path).decode()
    except UnicodeDecodeError as err:
        raise trace_error(key, path, f"is not valid JSON: {err}") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(key, path))
    except json.JSONDecodeError as err:
        raise trace_error(key, path, f"is not valid JSON: {err}") from None


def load_client_json(key: str, path: str | Path, num_clients: int) -> dict[int, Any]:
    """Read a JSON object keyed by client id ("0".."N-1") into {client: value}, with errors naming ``key``."""
    loaded = read_json(key, path)
    if not isinstance(loaded, dict):
        raise trace_error(key, path, f"must hold a JSON object keyed by client id, not a {type(loaded).__name__}")
    out: dict[int, Any] = {}
    for name, value in loaded.items():
        try:
            client = int(name)
        except ValueError:
            client = -1
        if not 0 <= client < num_clients or name.strip() != name:
            raise trace_error(key, path, f"names unknown client {name!r}: expected an id in 0..{num_clients - 1}")
        out[client] = value
    return out


_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def hashed_uniforms(key: int, ids: np.ndarray) -> np.ndarray:
    """A uniform in [0, 1) for each id, a pure function of (key, id): SplitMix64 at state key + id * gamma.

    Counter-based, so asking about one client costs O(1) and the answer does not depend on who else was
    asked or in which order.
    """
    x = np.atleast_1d(np.asarray(ids)).astype(np.uint64) * _GAMMA + np.uint64(key)
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53
