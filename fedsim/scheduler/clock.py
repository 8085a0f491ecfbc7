"""How long a client's task takes on the virtual clock: compute on its device plus moving the model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from fedsim.config import SchedulerConfig
from fedsim.scheduler._common import fail
from fedsim.scheduler.devices import DeviceProfiles

COMPUTE_TIME = ("modeled", "measured")


@dataclass(frozen=True)
class TaskTime:
    compute_s: float
    comm_s: float
    total_s: float


def check_clock_config(cfg: SchedulerConfig) -> None:
    if cfg.compute_time not in COMPUTE_TIME:
        fail("compute_time", cfg.compute_time, "one of " + ", ".join(COMPUTE_TIME))
    if not (cfg.seconds_per_sample >= 0 and math.isfinite(cfg.seconds_per_sample)):
        fail("seconds_per_sample", cfg.seconds_per_sample, "a finite value >= 0")


class Clock:
    """Task durations: compute = base * speed[c], comm = (bytes_down + bytes_up) / bandwidth[c].

    base is ``num_samples_processed * seconds_per_sample`` when ``compute_time`` is "modeled" (deterministic)
    and the measured wall-clock seconds of the real training when it is "measured".
    """

    def __init__(self, cfg: SchedulerConfig, devices: DeviceProfiles) -> None:
        check_clock_config(cfg)
        self.cfg, self.devices = cfg, devices

    def task_duration(self, client: int, num_samples_processed: int, bytes_down: int, bytes_up: int,
                      measured_compute_s: Optional[float] = None) -> TaskTime:
        if not 0 <= client < self.devices.num_clients:
            raise ValueError(f"client {client} is not in 0..{self.devices.num_clients - 1}")
        if min(num_samples_processed, bytes_down, bytes_up) < 0:
            raise ValueError(f"samples and bytes must be >= 0, got num_samples_processed={num_samples_processed}, "
                             f"bytes_down={bytes_down}, bytes_up={bytes_up}")
        if self.cfg.compute_time == "measured":
            if measured_compute_s is None or not measured_compute_s >= 0:
                raise ValueError(f"scheduler.compute_time is 'measured': pass the task's measured compute "
                                 f"seconds (>= 0) as measured_compute_s, got {measured_compute_s!r}")
            base = float(measured_compute_s)
        else:
            base = num_samples_processed * self.cfg.seconds_per_sample
        compute = base * float(self.devices.speed[client])
        comm = (bytes_down + bytes_up) / float(self.devices.bandwidth[client])
        return TaskTime(compute_s=compute, comm_s=comm, total_s=compute + comm)
