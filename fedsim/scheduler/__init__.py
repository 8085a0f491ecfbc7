"""Simulated devices, availability and the virtual clock; sync and async planners on top of them."""

from __future__ import annotations

from fedsim.config import SchedulerConfig
from fedsim.scheduler.availability import (
    AVAILABILITY, AlwaysAvailable, Availability, BernoulliAvailability, TraceAvailability,
    build_availability, check_availability_config, load_availability_trace,
)
from fedsim.scheduler.clock import Clock, TaskTime, check_clock_config
from fedsim.scheduler.devices import SPEED_MODELS, DeviceProfiles, check_device_config, load_device_trace
from fedsim.scheduler.planner import (
    AsyncPlanner, Dispatch, RoundOutcome, Selection, SyncPlanner, check_planner_config,
)


def check_scheduler_config(cfg: SchedulerConfig) -> None:
    """Raise ConfigError for any ``scheduler.*`` value out of range (trace files are checked when read)."""
    check_availability_config(cfg)
    check_device_config(cfg)
    check_clock_config(cfg)
    check_planner_config(cfg)


__all__ = [
    "AVAILABILITY", "SPEED_MODELS", "AlwaysAvailable", "AsyncPlanner", "Availability", "BernoulliAvailability",
    "Clock", "DeviceProfiles", "Dispatch", "RoundOutcome", "Selection", "SyncPlanner", "TaskTime",
    "TraceAvailability", "build_availability", "check_scheduler_config", "load_availability_trace",
    "load_device_trace",
]
