"""FedScale's trace files, read without running code from them, and mapped onto fedsim's clients by seed.

FedScale (SymbioticLab/FedScale, benchmark/dataset/data/device_info/) ships two pickled dicts keyed by an
integer trace-client id:

- ``client_behave_trace``: ``{id: {"active": [s...], "inactive": [s...], "finish_time": s, ...}}``. Its
  ClientMetadata.is_active takes ``t % finish_time`` and calls the client online when it lies in a closed
  interval ``[active[i], inactive[i]]``: the trace repeats with period finish_time.
- ``client_device_capacity``: ``{id: {"computation": ms, "communication": kbit/s}}``. Its
  ClientMetadata.get_completion_time charges ``3 * batch * steps * computation / 1000`` seconds of compute
  and ``(upload + download) / communication`` seconds of transfer, with sizes in kbit of 1024 bits
  (Aggregator.run: ``sys.getsizeof(pickle.dumps(model)) / 1024.0 * 8.0  # kbits``).

The same content in a file whose name ends in ``.json`` (ids as strings) is read as JSON. Any other extra
field (FedScale's "duration", "model") is ignored.
"""

from __future__ import annotations

import io
import math
import pickle
import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedsim.scheduler._common import TraceError, hashed_uniforms, is_number, read_bytes, read_json, trace_error
from fedsim.seeding import derive_seed

# FedScale's kbit is 1024 bits (see the module docstring): bytes per second per unit of "communication".
BYTES_PER_S_PER_FEDSCALE_KBPS = 1024 / 8
# Coordinate of the trace-client mapping in the "device" seed stream (0 and 1 are the speed and bandwidth draws).
_MAPPING_COORDINATE = 2


# The globals a pickle of numpy scalars (np.float64(1.5), np.int64(3)) needs: the dtype and the scalar
# constructor, which build a number from a dtype and its bytes and run nothing else (torch's weights_only
# loader allows the same).
_SCALAR = np.float64(0).__reduce__()[0]  # numpy's private scalar constructor, wherever this numpy keeps it
_NUMPY_SCALAR_GLOBALS = {("numpy", "dtype"): np.dtype, ("numpy.core.multiarray", "scalar"): _SCALAR,
                         ("numpy._core.multiarray", "scalar"): _SCALAR}


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes build (dicts, lists, tuples, strings, numbers) and numpy scalars.

    Every other object (a class instance, a function such as os.system) needs a global, and find_class
    refuses each one before importing anything, so no code from the file runs.
    """

    def __init__(self, data: bytes, key: str, path: str) -> None:
        # latin1: Python 2 pickles hold byte strings; any byte decodes, where the default ASCII may fail.
        super().__init__(io.BytesIO(data), encoding="latin1")
        self.key, self.path = key, path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _NUMPY_SCALAR_GLOBALS:
            return _NUMPY_SCALAR_GLOBALS[module, name]
        raise trace_error(self.key, self.path, f"is a pickle that refers to {module}.{name}: only plain dicts, "
                          f"lists, strings and numbers (numpy scalars too) are read (or convert the file to JSON, named *.json)")


def read_trace_file(key: str, path: str) -> dict[int, Any]:
    """``{trace-client id: entry}`` from a FedScale pickle, or JSON when ``path`` ends in .json."""
    if path.lower().endswith(".json"):
        loaded = read_json(key, path)
    else:
        data = read_bytes(key, path)
        try:
            loaded = _PlainUnpickler(data, key, path).load()
        except TraceError:
            raise
        except Exception as err:  # a malformed pickle fails in many ways; each is a bad file, not a bug
            raise trace_error(key, path, f"is not a readable pickle ({type(err).__name__}: {err})") from None
    if not isinstance(loaded, dict):
        raise trace_error(key, path, f"must hold a dict keyed by client id, not a {type(loaded).__name__}")
    if not loaded:
        raise trace_error(key, path, "lists no clients")
    return _by_integer_id(key, path, loaded)


def _by_integer_id(key: str, path: str, loaded: dict) -> dict[int, Any]:
    """Entries sorted by id, so a pickle and its JSON conversion map the same trace clients to fedsim's."""
    out: dict[int, Any] = {}
    for name, entry in loaded.items():
        if isinstance(name, (int, np.integer)) and not isinstance(name, bool):
            ident = int(name)
        elif isinstance(name, str) and name.isascii() and name.isdigit():
            ident = int(name)
        else:
            raise trace_error(key, path, f"has client id {name!r}: expected an integer")
        if ident in out:
            raise trace_error(key, path, f"lists client {ident} twice")
        out[ident] = entry
    return dict(sorted(out.items()))


def _field(key: str, path: str, ident: int, entry: Any, name: str) -> Any:
    if not isinstance(entry, dict):
        raise trace_error(key, path, f"has {reprlib.repr(entry)} for client {ident}: expected a dict")
    if name not in entry:
        raise trace_error(key, path, f"has no {name!r} for client {ident}")
    return entry[name]


def _number(key: str, path: str, ident: int, name: str, value: Any, positive: bool) -> float:
    if not (is_number(value) and math.isfinite(value) and (value > 0 or not positive)):
        expected = "a finite number > 0" if positive else "a finite number"
        raise trace_error(key, path, f"has {name}={value!r} for client {ident}: expected {expected}")
    return float(value)


def _times(key: str, path: str, ident: int, name: str, value: Any) -> list[float]:
    if not (isinstance(value, (list, tuple)) and all(is_number(v) and math.isfinite(v) for v in value)):
        raise trace_error(key, path, f"has {name}={reprlib.repr(value)} for client {ident}: expected a list "
                          f"of finite numbers (seconds)")
    return [float(v) for v in value]


@dataclass(frozen=True)
class BehaveTrace:
    """Availability of M trace clients as flat arrays: trace client j is online at time t iff an interval k
    with ``owner[k] == j`` has ``start[k] <= t mod period[j] <= end[k]``.

    Intervals are clipped to one period [0, period]: t mod period never leaves it, so nothing else is seen.
    """

    period: np.ndarray  # (M,) seconds: FedScale's finish_time
    start: np.ndarray  # (K,) seconds
    end: np.ndarray  # (K,) seconds
    owner: np.ndarray  # (K,) trace-client index in 0..M-1

    @property
    def num_clients(self) -> int:
        return len(self.period)


def read_behave_trace(key: str, path: str) -> BehaveTrace:
    """Read and check a ``client_behave_trace``: per client, equal-length active/inactive lists with
    active[i] <= inactive[i], and finish_time > 0."""
    period: list[float] = []
    start: list[float] = []
    end: list[float] = []
    owner: list[int] = []
    for j, (ident, entry) in enumerate(read_trace_file(key, path).items()):
        finish = _number(key, path, ident, "finish_time", _field(key, path, ident, entry, "finish_time"), True)
        active = _times(key, path, ident, "active", _field(key, path, ident, entry, "active"))
        inactive = _times(key, path, ident, "inactive", _field(key, path, ident, entry, "inactive"))
        if len(active) != len(inactive):
            raise trace_error(key, path, f"has {len(active)} active and {len(inactive)} inactive times for "
                              f"client {ident}: expected one inactive time per active time")
        for on, off in zip(active, inactive):
            if off < on:
                raise trace_error(key, path, f"has an interval active={on:g}, inactive={off:g} for client "
                                  f"{ident}: expected active <= inactive")
        period.append(finish)
        start += active
        end += inactive
        owner += [j] * len(active)
    return _clip_to_period(np.array(period), np.array(start), np.array(end), np.array(owner, dtype=np.int64))


def _clip_to_period(period: np.ndarray, start: np.ndarray, end: np.ndarray, owner: np.ndarray) -> BehaveTrace:
    start = np.maximum(start, 0.0)
    end = np.minimum(end, period[owner])
    keep = (start <= end) & (start < period[owner])
    return BehaveTrace(period=period, start=start[keep], end=end[keep], owner=owner[keep])


def read_device_capacity(key: str, path: str) -> tuple[np.ndarray, np.ndarray]:
    """Read and check a ``client_device_capacity``: (computation ms per sample, communication FedScale
    kbit/s), one entry per trace client, both > 0."""
    computation: list[float] = []
    communication: list[float] = []
    for ident, entry in read_trace_file(key, path).items():
        for name, out in (("computation", computation), ("communication", communication)):
            out.append(_number(key, path, ident, name, _field(key, path, ident, entry, name), True))
    return np.array(computation), np.array(communication)


def map_trace_clients(seed: int, num_clients: int, num_trace_clients: int) -> np.ndarray:
    """``idx[c]``: the trace client (0..M-1) that fedsim client c replays, a pure function of (seed, c, M).

    Clients go in blocks of M: block b = c // M maps position c % M by its own seeded affine permutation
    ``(a_b * pos + s_b) mod M`` with gcd(a_b, M) = 1. So for N <= M no two clients share a trace client,
    for N > M each trace client serves floor(N/M) or ceil(N/M) clients, client c keeps its trace client
    whatever N is, and it costs O(1) per client with no per-client Python object.
    """
    clients = np.arange(num_clients, dtype=np.int64)
    block, pos = np.divmod(clients, num_trace_clients)
    num_blocks = int(block[-1]) + 1 if num_clients else 0
    units = np.flatnonzero(np.gcd(np.arange(num_trace_clients), num_trace_clients) == 1)
    draws = hashed_uniforms(derive_seed(seed, "device", _MAPPING_COORDINATE), np.arange(2 * num_blocks))
    scale = (draws[0::2] * len(units)).astype(np.int64)
    shift = (draws[1::2] * num_trace_clients).astype(np.int64)
    return (units[scale][block] * pos + shift[block]) % num_trace_clients
