"""Per-client simulated devices: a compute slowdown factor and a link bandwidth."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fedsim.config import SchedulerConfig
from fedsim.scheduler._common import fail, is_number, load_client_json, trace_error
from fedsim.scheduler.fedscale import BYTES_PER_S_PER_FEDSCALE_KBPS, map_trace_clients, read_device_capacity
from fedsim.seeding import rng_for

# Speeds are slowdown factors (compute seconds are multiplied by them); a floor keeps them positive.
MIN_SPEED = 1e-3
BITS_PER_BYTE = 8
_TRACE_FIELDS = ("speed", "bandwidth_mbps")
# fedsim: per-client overrides of the drawn devices; fedscale: every client replays a FedScale device.
DEVICE_TRACE_FORMATS = ("fedsim", "fedscale")

SpeedModel = Callable[[SchedulerConfig, np.random.Generator, int], np.ndarray]

SPEED_MODELS: dict[str, SpeedModel] = {
    "constant": lambda cfg, rng, n: np.ones(n),
    "lognormal": lambda cfg, rng, n: rng.lognormal(0.0, cfg.speed_sigma, n),  # median 1
    "uniform": lambda cfg, rng, n: rng.uniform(cfg.speed_low, cfg.speed_high, n),
}


def check_device_config(cfg: SchedulerConfig) -> None:
    """Raise ConfigError for device settings out of range (the trace file is checked when read)."""
    if cfg.speed not in SPEED_MODELS:
        fail("speed", cfg.speed, "one of " + ", ".join(sorted(SPEED_MODELS)))
    if not cfg.speed_sigma >= 0:
        fail("speed_sigma", cfg.speed_sigma, "a value >= 0")
    if cfg.speed == "uniform":
        if not cfg.speed_low > 0:
            fail("speed_low", cfg.speed_low, "a value > 0")
        if not cfg.speed_high >= cfg.speed_low:
            fail("speed_high", cfg.speed_high, f"a value >= scheduler.speed_low ({cfg.speed_low})")
    if not (cfg.bandwidth_mbps > 0 and math.isfinite(cfg.bandwidth_mbps)):
        fail("bandwidth_mbps", cfg.bandwidth_mbps, "a finite value > 0")
    if not cfg.bandwidth_sigma >= 0:
        fail("bandwidth_sigma", cfg.bandwidth_sigma, "a value >= 0")
    if cfg.device_trace_format not in DEVICE_TRACE_FORMATS:
        fail("device_trace_format", cfg.device_trace_format, "one of " + ", ".join(DEVICE_TRACE_FORMATS))
    if cfg.device_trace_format == "fedscale" and not cfg.device_trace:
        fail("device_trace", cfg.device_trace, "a path to a client_device_capacity file when "
             "scheduler.device_trace_format is 'fedscale'")


def mbps_to_bytes_per_s(mbps: float | np.ndarray) -> float | np.ndarray:
    return mbps * 1e6 / BITS_PER_BYTE


@dataclass
class DeviceProfiles:
    """``speed[c]``: compute slowdown factor of client c; ``bandwidth[c]``: its link in bytes per second."""

    speed: np.ndarray
    bandwidth: np.ndarray

    def __post_init__(self) -> None:
        self.speed = np.asarray(self.speed, dtype=np.float64)
        self.bandwidth = np.asarray(self.bandwidth, dtype=np.float64)
        if self.speed.ndim != 1 or self.speed.shape != self.bandwidth.shape:
            raise ValueError(f"speed and bandwidth must be 1-d arrays of one length per client, got shapes "
                             f"{self.speed.shape} and {self.bandwidth.shape}")
        if not (np.all(self.speed > 0) and np.all(self.bandwidth > 0)):
            raise ValueError("device speeds and bandwidths must all be > 0")

    @property
    def num_clients(self) -> int:
        return len(self.speed)

    @classmethod
    def from_config(cls, cfg: SchedulerConfig, num_clients: int, seed: int) -> "DeviceProfiles":
        """Draw every client's device from (seed, "device"), then apply ``cfg.device_trace`` overrides; or,
        with ``device_trace_format: fedscale``, give every client a device of FedScale's trace."""
        check_device_config(cfg)
        if cfg.device_trace_format == "fedscale":
            return cls.from_fedscale(cfg.device_trace, num_clients, seed)
        speed = np.maximum(SPEED_MODELS[cfg.speed](cfg, rng_for(seed, "device", 0), num_clients), MIN_SPEED)
        spread = (rng_for(seed, "device", 1).lognormal(0.0, cfg.bandwidth_sigma, num_clients)
                  if cfg.bandwidth_sigma > 0 else np.ones(num_clients))
        bandwidth = mbps_to_bytes_per_s(cfg.bandwidth_mbps * spread)
        if cfg.device_trace:
            for client, entry in load_device_trace(cfg.device_trace, num_clients).items():
                if "speed" in entry:
                    speed[client] = entry["speed"]
                if "bandwidth_mbps" in entry:
                    bandwidth[client] = mbps_to_bytes_per_s(entry["bandwidth_mbps"])
        return cls(speed=speed, bandwidth=bandwidth)

    @classmethod
    def from_fedscale(cls, path: str, num_clients: int, seed: int) -> "DeviceProfiles":
        """Client c gets trace device ``map_trace_clients(seed, N, M)[c]`` of a client_device_capacity file.

        Speed is its computation (ms per sample) over the median of the trace's M devices, so the median
        device runs at scheduler.seconds_per_sample whatever N is; bandwidth is its communication in
        FedScale's kbit/s (1024 bits), so a transfer takes as long as FedScale charges for it.
        """
        computation, communication = read_device_capacity("device_trace", path)
        trace_of = map_trace_clients(seed, num_clients, len(computation))
        return cls(speed=computation[trace_of] / np.median(computation),
                   bandwidth=communication[trace_of] * BYTES_PER_S_PER_FEDSCALE_KBPS)


def load_device_trace(path: str, num_clients: int) -> dict[int, dict[str, float]]:
    """Read and check ``{"<client id>": {"speed": f, "bandwidth_mbps": b}}`` (either field may be left out)."""
    out: dict[int, dict[str, float]] = {}
    for client, entry in load_client_json("device_trace", path, num_clients).items():
        where = f"client {client}"
        if not isinstance(entry, dict) or not entry:
            raise trace_error("device_trace", path, f"has {entry!r} for {where}: expected an object with "
                              f"'speed' and/or 'bandwidth_mbps'")
        unknown = sorted(set(entry) - set(_TRACE_FIELDS))
        if unknown:
            raise trace_error("device_trace", path, f"has unknown field(s) {unknown} for {where}: expected "
                              f"'speed' and/or 'bandwidth_mbps'")
        for name, value in entry.items():
            if not (is_number(value) and math.isfinite(value) and value > 0):
                raise trace_error("device_trace", path, f"has {name}={value!r} for {where}: expected a "
                                  f"finite number > 0")
        out[client] = {name: float(value) for name, value in entry.items()}
    return out
