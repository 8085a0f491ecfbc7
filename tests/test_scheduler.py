"""Simulated devices, availability, task durations and the sync / async planners."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import asdict, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from fedsim.config import ConfigError, SchedulerConfig
from fedsim.scheduler import (
    AlwaysAvailable, AsyncPlanner, BernoulliAvailability, Clock, DeviceProfiles, SyncPlanner, TraceAvailability,
    build_availability, check_scheduler_config,
)
from fedsim.scheduler._common import TraceError
from fedsim.scheduler.availability import FedScaleAvailability
from fedsim.scheduler.fedscale import map_trace_clients


def write_json(tmp_path: Path, obj, name: str = "trace.json") -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def devices(speed, bandwidth_bps=1e6) -> DeviceProfiles:
    speed = np.asarray(speed, dtype=float)
    return DeviceProfiles(speed=speed, bandwidth=np.full(len(speed), float(bandwidth_bps)))


# --- devices -----------------------------------------------------------------------------------------------


def test_constant_speed_and_equal_bandwidth():
    d = DeviceProfiles.from_config(SchedulerConfig(bandwidth_mbps=80.0), 50, seed=0)
    np.testing.assert_array_equal(d.speed, np.ones(50))
    np.testing.assert_array_equal(d.bandwidth, np.full(50, 10e6))  # 80 Mbit/s = 10 MB/s


def test_lognormal_speed_and_bandwidth_medians_on_10k_clients():
    cfg = SchedulerConfig(speed="lognormal", speed_sigma=0.5, bandwidth_mbps=40.0, bandwidth_sigma=0.8)
    d = DeviceProfiles.from_config(cfg, 10_000, seed=3)
    assert np.median(d.speed) == pytest.approx(1.0, rel=0.03)
    assert np.std(np.log(d.speed)) == pytest.approx(0.5, rel=0.05)
    assert np.median(d.bandwidth) == pytest.approx(5e6, rel=0.05)
    assert np.std(np.log(d.bandwidth)) == pytest.approx(0.8, rel=0.05)
    assert d.speed.min() > 0 and d.bandwidth.min() > 0
    assert np.corrcoef(d.speed, d.bandwidth)[0, 1] == pytest.approx(0.0, abs=0.05)  # separate streams


def test_uniform_speed_range():
    d = DeviceProfiles.from_config(SchedulerConfig(speed="uniform", speed_low=2.0, speed_high=6.0), 10_000, seed=1)
    assert 2.0 <= d.speed.min() and d.speed.max() <= 6.0
    assert np.median(d.speed) == pytest.approx(4.0, rel=0.03)


def test_devices_deterministic_by_seed():
    cfg = SchedulerConfig(speed="lognormal", bandwidth_sigma=0.3)
    a, b = (DeviceProfiles.from_config(cfg, 100, seed=5) for _ in range(2))
    np.testing.assert_array_equal(a.speed, b.speed)
    np.testing.assert_array_equal(a.bandwidth, b.bandwidth)
    assert not np.array_equal(a.speed, DeviceProfiles.from_config(cfg, 100, seed=6).speed)


def test_device_trace_overrides_listed_clients_only(tmp_path):
    path = write_json(tmp_path, {"3": {"speed": 7.5}, "5": {"bandwidth_mbps": 8},
                                 "0": {"speed": 0.5, "bandwidth_mbps": 16}})
    cfg = SchedulerConfig(speed="lognormal")
    base = DeviceProfiles.from_config(cfg, 10, seed=0)
    cfg.device_trace = path
    d = DeviceProfiles.from_config(cfg, 10, seed=0)
    assert d.speed[3] == 7.5 and d.bandwidth[5] == 1e6
    assert d.speed[0] == 0.5 and d.bandwidth[0] == 2e6
    assert d.bandwidth[3] == base.bandwidth[3] and d.speed[5] == base.speed[5]
    untouched = [1, 2, 4, 6, 7, 8, 9]
    np.testing.assert_array_equal(d.speed[untouched], base.speed[untouched])


@pytest.mark.parametrize("content, problem", [
    ({"10": {"speed": 1.0}}, "unknown client '10'"),
    ({"abc": {"speed": 1.0}}, "unknown client 'abc'"),
    ({"-1": {"speed": 1.0}}, "unknown client '-1'"),
    ({"2": {"speed": -1.0}}, "speed=-1.0"),
    ({"2": {"bandwidth_mbps": 0}}, "bandwidth_mbps=0"),
    ({"2": {"speed": "fast"}}, "speed='fast'"),
    ({"2": {"speed": True}}, "speed=True"),
    ({"2": {"cpu": 2.0}}, "unknown field"),
    ({"2": 3.0}, "expected an object"),
    ({"2": {}}, "expected an object"),
    ([1, 2], "not a list"),
    ('{"1": {"speed": 1}, "1": {"speed": 2}}', "twice"),
    ("{not json", "not valid JSON"),
])
def test_device_trace_errors(tmp_path, content, problem):
    path = write_json(tmp_path, content)
    with pytest.raises(ValueError) as err:
        DeviceProfiles.from_config(SchedulerConfig(device_trace=path), 10, seed=0)
    assert "scheduler.device_trace" in str(err.value) and path in str(err.value) and problem in str(err.value)


def test_device_trace_missing_file(tmp_path):
    path = str(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="scheduler.device_trace.*nope.json.*could not be read"):
        DeviceProfiles.from_config(SchedulerConfig(device_trace=path), 10, seed=0)


@pytest.mark.parametrize("field, value, key", [
    ("speed", "fast", "scheduler.speed"),
    ("speed_low", 0.0, "scheduler.speed_low"),
    ("bandwidth_mbps", 0.0, "scheduler.bandwidth_mbps"),
    ("availability", "sometimes", "scheduler.availability"),
    ("availability_p", 1.5, "scheduler.availability_p"),
    ("compute_time", "guessed", "scheduler.compute_time"),
    ("overcommit", 0.5, "scheduler.overcommit"),
    ("dropout", 1.0, "scheduler.dropout"),
    ("quorum", 2.0, "scheduler.quorum"),
    ("deadline_s", -1.0, "scheduler.deadline_s"),
])
def test_config_checks_name_the_key(field, value, key):
    cfg = SchedulerConfig(**{field: value})
    if field == "speed_low":
        cfg.speed = "uniform"
    with pytest.raises(ConfigError, match=key):
        check_scheduler_config(cfg)


# --- availability ------------------------------------------------------------------------------------------


def test_always_available():
    a = build_availability(SchedulerConfig(), 7, seed=0)
    assert isinstance(a, AlwaysAvailable)
    assert a.available_ids(123.0, 4).tolist() == list(range(7))
    assert a.next_time(0.0) is None


def test_bernoulli_rate_and_independence_across_decisions():
    a = BernoulliAvailability(20_000, p=0.3, seed=1)
    assert a.available(None, 0.0, decision=1).mean() == pytest.approx(0.3, abs=0.015)
    one_client = np.array([a.available([7], 0.0, decision=k)[0] for k in range(2000)])
    assert one_client.mean() == pytest.approx(0.3, abs=0.035)
    assert not np.array_equal(a.available(None, 0.0, 1), a.available(None, 0.0, 2))
    assert not np.array_equal(a.available(None, 0.0, 1), a.available(None, 0.0, 1, attempt=1))


def test_bernoulli_query_order_independent():
    full = BernoulliAvailability(1000, p=0.5, seed=2).available(None, 5.0, decision=3)
    fresh = BernoulliAvailability(1000, p=0.5, seed=2)
    subset = np.array([999, 3, 500, 42, 0])
    fresh.available(None, 0.0, decision=9)  # an unrelated query first
    np.testing.assert_array_equal(fresh.available(subset, 5.0, 3), full[subset])
    np.testing.assert_array_equal(fresh.available(subset[::-1], 99.0, 3), full[subset[::-1]])  # time is no input
    np.testing.assert_array_equal(fresh.available(None, 5.0, 3), full)
    assert not np.array_equal(BernoulliAvailability(1000, p=0.5, seed=3).available(None, 5.0, 3), full)


def test_bernoulli_extremes_and_retry():
    assert not BernoulliAvailability(50, p=0.0, seed=0).available(None, 0.0, 0).any()
    assert BernoulliAvailability(50, p=0.0, seed=0).next_time(3.0) is None
    assert BernoulliAvailability(50, p=1.0, seed=0).available(None, 0.0, 0).all()
    assert BernoulliAvailability(50, p=0.5, seed=0, retry_s=2.5).next_time(3.0) == 5.5


def test_trace_membership(tmp_path):
    path = write_json(tmp_path, {"0": [[0, 10], [10, 20], [50, 60]], "2": [[5, 15]], "3": []})
    a = build_availability(SchedulerConfig(availability="trace", availability_trace=path), 5, seed=0)
    assert isinstance(a, TraceAvailability)
    expected = {  # half-open [start, end): start counts, end does not; touching intervals join
        -1.0: [], 0.0: [0], 4.9: [0], 5.0: [0, 2], 10.0: [0, 2], 15.0: [0], 19.99: [0], 20.0: [], 49.0: [],
        50.0: [0], 59.0: [0], 60.0: [], 1e9: [],
    }
    times = list(expected)
    rng = np.random.default_rng(0)
    for t in list(times) + list(rng.permutation(times)) + times[::-1]:  # any query order
        assert a.available_ids(t, decision=0).tolist() == expected[t], t
        assert a.available([2, 0, 4], t, decision=0).tolist() == [2 in expected[t], 0 in expected[t], False]
    assert [a.next_time(t) for t in (-1.0, 0.0, 5.0, 10.0, 30.0, 50.0)] == [0.0, 5.0, 10.0, 50.0, 50.0, None]


@pytest.mark.parametrize("content, problem", [
    ({"0": [[10, 20], [5, 8]]}, "must not overlap"),
    ({"0": [[0, 10], [9, 20]]}, "must not overlap"),
    ({"0": [[5, 5]]}, "start_s < end_s"),
    ({"0": [[6, 5]]}, "start_s < end_s"),
    ({"0": [[0, 1, 2]]}, "two numbers"),
    ({"0": [["a", 1]]}, "two numbers"),
    ({"0": [0, 1]}, "two numbers"),
    ({"0": {"start": 0}}, "expected a list"),
    ({"7": [[0, 1]]}, "unknown client '7'"),
    ('{"0": [[NaN, 1]]}', "start_s < end_s"),
    ("[]", "not a list"),
])
def test_trace_validation_errors(tmp_path, content, problem):
    path = write_json(tmp_path, content)
    with pytest.raises(ValueError) as err:
        build_availability(SchedulerConfig(availability="trace", availability_trace=path), 5, seed=0)
    assert "scheduler.availability_trace" in str(err.value) and path in str(err.value) and problem in str(err.value)


def test_trace_requires_a_path():
    with pytest.raises(ConfigError, match="scheduler.availability_trace"):
        build_availability(SchedulerConfig(availability="trace"), 5, seed=0)


# --- clock -------------------------------------------------------------------------------------------------


def test_modeled_duration_by_hand():
    clock = Clock(SchedulerConfig(seconds_per_sample=0.01), devices([1.0, 2.0], bandwidth_bps=1e6))
    t = clock.task_duration(1, num_samples_processed=100, bytes_down=1_500_000, bytes_up=500_000)
    assert (t.compute_s, t.comm_s, t.total_s) == pytest.approx((2.0, 2.0, 4.0))  # 100*0.01*2 ; 2e6 B / 1e6 B/s
    t0 = clock.task_duration(0, 100, 0, 0, measured_compute_s=99.0)  # ignored when modeled
    assert (t0.compute_s, t0.comm_s, t0.total_s) == pytest.approx((1.0, 0.0, 1.0))


def test_measured_duration_by_hand():
    clock = Clock(SchedulerConfig(compute_time="measured"), devices([3.0], bandwidth_bps=4e5))
    t = clock.task_duration(0, 100, 2e5, 2e5, measured_compute_s=1.5)
    assert (t.compute_s, t.comm_s, t.total_s) == pytest.approx((4.5, 1.0, 5.5))
    with pytest.raises(ValueError, match="measured_compute_s"):
        clock.task_duration(0, 100, 0, 0)


def test_bandwidth_from_config_feeds_comm_time():
    cfg = SchedulerConfig(bandwidth_mbps=8.0)
    clock = Clock(cfg, DeviceProfiles.from_config(cfg, 3, seed=0))
    assert clock.task_duration(2, 0, 3_000_000, 1_000_000).comm_s == pytest.approx(4.0)  # 8 Mbit/s = 1 MB/s


# --- sync planner ------------------------------------------------------------------------------------------


def sync(num_clients=100, k=10, seed=0, **cfg) -> SyncPlanner:
    return SyncPlanner(SchedulerConfig(**cfg), num_clients, k, seed)


def test_overcommit_selection_size():
    planner = sync(k=10, overcommit=1.3)
    assert planner.dispatch_size == 13  # 10 * 1.3 is 13.000000000000002 in floating point
    for r in range(1, 20):
        s = planner.select(r, 0.0)
        assert len(s.dispatched) == 13 and len(set(s.dispatched)) == 13
        assert s.dispatched == sorted(s.dispatched) and s.failed == set()
    assert len(sync(num_clients=12, k=10, overcommit=1.3).select(1, 0.0).dispatched) == 12  # capped


def test_selection_only_from_available_and_capped():
    avail = BernoulliAvailability(40, p=0.2, seed=0)
    planner = SyncPlanner(SchedulerConfig(overcommit=2.0), 40, 10, seed=0, availability=avail)
    for r in range(30):
        s = planner.select(r, 0.0)
        ids = set(avail.available_ids(0.0, r).tolist())
        assert set(s.dispatched) <= ids and len(s.dispatched) == min(20, len(ids))


def test_dropout_rate_and_determinism():
    planner = sync(num_clients=1000, k=100, dropout=0.2)
    selections = [planner.select(r, 0.0) for r in range(50)]
    assert all(s.failed <= set(s.dispatched) for s in selections)
    rate = sum(len(s.failed) for s in selections) / sum(len(s.dispatched) for s in selections)
    assert rate == pytest.approx(0.2, abs=0.02)
    again = sync(num_clients=1000, k=100, dropout=0.2)
    assert [again.select(r, 0.0) for r in range(50)] == selections
    assert [sync(num_clients=1000, k=100, dropout=0.2, seed=1).select(r, 0.0) for r in range(3)] != selections[:3]
    assert planner.select(3, 0.0).reporting == [c for c in selections[3].dispatched if c not in selections[3].failed]


def test_close_keeps_first_k_by_finish_time_ties_by_id():
    planner = sync(k=3, overcommit=2.0)
    out = planner.close(1, 100.0, {9: 5.0, 2: 1.0, 7: 3.0, 4: 3.0, 1: 8.0, 5: 3.0})
    assert out.kept == [2, 4, 5]  # 2 at 1.0, then the 3.0 tie broken by id: 4, 5 (7 is late)
    assert out.late == [1, 7, 9] and out.end_s == 103.0 and out.quorum_met


def test_close_without_deadline_short_of_k_waits_for_last():
    out = sync(k=4).close(1, 10.0, {3: 2.0, 1: 6.0})
    assert out.kept == [1, 3] and out.late == [] and out.end_s == 16.0 and not out.quorum_met
    empty = sync(k=4).close(2, 10.0, {})
    assert empty.kept == [] and empty.end_s == 10.0


def test_deadline_closes_early_when_k_finish():
    out = sync(k=2, deadline_s=10.0, overcommit=2.0).close(1, 0.0, {0: 4.0, 1: 2.0, 2: 9.0, 3: 12.0})
    assert out.kept == [0, 1] and out.late == [2, 3] and out.end_s == 4.0 and out.quorum_met


def test_deadline_with_quorum_met():
    planner = sync(k=4, deadline_s=10.0, quorum=0.5, overcommit=1.3)
    out = planner.close(1, 50.0, {0: 4.0, 1: 10.0, 2: 11.0, 3: 30.0})
    assert out.kept == [0, 1] and out.late == [2, 3] and out.end_s == 60.0 and out.quorum_met  # 2 of ceil(0.5*4)


def test_deadline_with_quorum_missed():
    planner = sync(k=4, deadline_s=10.0, quorum=0.8)
    assert planner.quorum_size == 4  # ceil(3.2)
    out = planner.close(1, 50.0, {0: 4.0, 1: 6.0, 2: 7.0, 3: 10.5})
    assert out.kept == [0, 1, 2] and out.late == [3] and out.end_s == 60.0 and not out.quorum_met


def test_empty_selection_then_wait_for_trace(tmp_path):
    path = write_json(tmp_path, {str(c): [[100, 200]] for c in range(5)})
    planner = SyncPlanner(SchedulerConfig(availability="trace", availability_trace=path), 10, 3, seed=0)
    assert planner.select(1, 0.0).dispatched == []
    assert planner.retry_time(0.0) == 100.0
    s = planner.select_when_available(1, 0.0)
    assert s.start_s == 100.0 and len(s.dispatched) == 3 and set(s.dispatched) <= set(range(5))
    with pytest.raises(RuntimeError, match="none will ever be"):
        planner.select_when_available(2, 250.0)


def test_bernoulli_wait_uses_fresh_draws():
    planner = SyncPlanner(SchedulerConfig(availability="bernoulli", availability_p=0.05), 10, 2, seed=0)
    starts = [planner.select_when_available(r, 0.0) for r in range(40)]
    assert all(s.dispatched for s in starts)
    assert any(s.attempt > 0 and s.start_s == s.attempt * 1.0 for s in starts)  # retried 1 s apart


# --- async planner -----------------------------------------------------------------------------------------


def run_async(planner: AsyncPlanner, events: int, samples: int = 100):
    """Drive the planner for ``events`` finishes; check invariants on the way; return the finished dispatches."""
    done, new, last = [], planner.start(0.0), -1.0
    while len(done) < events:
        for d in new:
            assert d.start_s == planner.now_s
            planner.set_duration(d.id, planner.clock.task_duration(d.client, samples, 0, 0).total_s)
        flying = [d.client for d in planner.in_flight]
        assert len(flying) <= planner.concurrency and len(set(flying)) == len(flying)
        finished = planner.next_finished()
        if finished is not None:
            assert finished.finish_s >= last and planner.now_s == finished.finish_s
            assert finished.client not in [d.client for d in planner.in_flight]
            last = finished.finish_s
            done.append(finished)
        new = planner.dispatch_next()
    return done


def test_async_in_flight_bound_order_and_uniqueness():
    cfg = SchedulerConfig(speed="lognormal", speed_sigma=1.0)
    planner = AsyncPlanner(cfg, 30, concurrency=8, seed=0)
    first = planner.start(0.0)
    assert len(first) == 8 and len({d.client for d in first}) == 8
    for d in first:
        planner.set_duration(d.id, 1.0)  # equal finishes come out by dispatch id
    assert [planner.next_finished().id for _ in range(8)] == [d.id for d in first]
    done = run_async(AsyncPlanner(cfg, 30, concurrency=8, seed=0), 300)
    assert len({d.client for d in done}) == 30


def test_async_concurrency_capped_at_population():
    planner = AsyncPlanner(SchedulerConfig(), 3, concurrency=10, seed=0)
    assert planner.concurrency == 3 and sorted(d.client for d in planner.start()) == [0, 1, 2]


def test_async_slow_clients_finish_fewer_tasks():
    def fast_and_slow(num_clients):
        speed = np.where(np.arange(num_clients) < num_clients // 2, 1.0, 10.0)
        planner = AsyncPlanner(SchedulerConfig(), num_clients, concurrency=6, seed=0, devices=devices(speed))
        fast = sum(d.client < num_clients // 2 for d in run_async(planner, 200))
        return fast, 200 - fast

    # Few clients per slot: slow clients are in flight most of the time and rarely finish.
    fast, slow = fast_and_slow(8)
    assert fast > 4 * slow
    # Many clients: dispatch is uniform so both halves start alike; slow ones still finish fewer in 200 events.
    fast, slow = fast_and_slow(20)
    assert fast > 1.3 * slow


def test_async_requires_durations():
    planner = AsyncPlanner(SchedulerConfig(), 10, concurrency=2, seed=0)
    first = planner.start()
    planner.set_duration(first[0].id, 1.0)
    with pytest.raises(RuntimeError, match=f"\\[{first[1].id}\\]"):
        planner.next_finished()


def test_async_time_advances_past_unavailable_periods(tmp_path):
    path = write_json(tmp_path, {str(c): [[100, 200], [500, 600]] for c in range(4)})
    cfg = SchedulerConfig(availability="trace", availability_trace=path, seconds_per_sample=0.5)
    planner = AsyncPlanner(cfg, 6, concurrency=2, seed=0)
    assert planner.start(0.0) == []
    assert planner.next_finished() is None and planner.now_s == 100.0
    done = run_async_from(planner, 8)  # each task takes 50 s: 2 slots x 2 tasks fit in each interval
    assert [d.start_s for d in done] == [100.0, 100.0, 150.0, 150.0, 500.0, 500.0, 550.0, 550.0]
    assert [d.finish_s for d in done] == [150.0, 150.0, 200.0, 200.0, 550.0, 550.0, 600.0, 600.0]
    assert all(d.client < 4 for d in done)
    assert planner.dispatch_next() == []
    with pytest.raises(RuntimeError, match="no client will ever be available"):
        planner.next_finished()


def run_async_from(planner: AsyncPlanner, events: int):
    done, new = [], planner.dispatch_next()
    while len(done) < events:
        for d in new:
            planner.set_duration(d.id, 50.0)
        finished = planner.next_finished()
        if finished is not None:
            done.append(finished)
        new = planner.dispatch_next()
    return done


def test_async_raises_when_nobody_will_ever_be_available(tmp_path):
    path = write_json(tmp_path, {"0": [[0, 10]]})
    planner = AsyncPlanner(SchedulerConfig(availability="trace", availability_trace=path), 3, 1, seed=0)
    assert planner.start(20.0) == []
    with pytest.raises(RuntimeError, match="no client will ever be available"):
        planner.next_finished()


def test_async_bernoulli_waits_in_retry_steps():
    avail = BernoulliAvailability(5, p=0.1, seed=0, retry_s=2.0)
    planner = AsyncPlanner(SchedulerConfig(), 5, 3, seed=0, availability=avail)
    done = run_async(planner, 50)
    assert len(done) == 50
    # Every start is an event time (0 or a finish) plus a whole number of 2 s retries, and some waited.
    bases = np.array([0.0] + [e.finish_s for e in done])
    waits = [(d.start_s - bases[bases <= d.start_s]) / 2.0 for d in done]
    assert all(np.any(np.isclose(w, np.round(w))) for w in waits)
    assert any(d.start_s not in set(bases.tolist()) for d in done)


def test_async_dropout_holds_slot_and_reports_failed():
    planner = AsyncPlanner(SchedulerConfig(dropout=0.3), 200, 10, seed=0)
    done = run_async(planner, 1000)
    assert sum(d.failed for d in done) / len(done) == pytest.approx(0.3, abs=0.05)
    assert all(d.duration_s is not None for d in done if d.failed)


def test_async_deterministic_by_seed():
    cfg = SchedulerConfig(speed="uniform", availability="bernoulli", availability_p=0.5, dropout=0.1)

    def trajectory(seed):
        return [(d.id, d.client, d.start_s, d.finish_s, d.failed)
                for d in run_async(AsyncPlanner(cfg, 50, 5, seed=seed), 100)]

    assert trajectory(0) == trajectory(0)
    assert trajectory(0) != trajectory(1)


def test_async_state_restores_to_the_same_future():
    """A planner rebuilt from ``state()`` (through JSON, as in a checkpoint) dispatches and finishes exactly
    as the original, including slots left empty for want of available clients."""
    cfg = SchedulerConfig(availability="bernoulli", availability_p=0.3, dropout=0.2, speed="lognormal",
                          speed_sigma=1.0)

    def advance(planner: AsyncPlanner, new, events: int):
        done = []
        while len(done) < events:
            for d in new:
                planner.set_duration(d.id, planner.clock.task_duration(d.client, 100, 0, 0).total_s)
            finished = planner.next_finished()
            if finished is not None:
                done.append(asdict(finished))
            new = planner.dispatch_next()
        return done, new

    original = AsyncPlanner(cfg, 12, concurrency=5, seed=3)
    _, new = advance(original, original.start(0.0), 40)
    for d in new:  # a checkpoint is taken with every in-flight duration known
        original.set_duration(d.id, original.clock.task_duration(d.client, 100, 0, 0).total_s)
    saved = json.loads(json.dumps(original.state()))
    restored = AsyncPlanner(cfg, 12, concurrency=5, seed=3)
    restored.restore(saved)
    assert restored.state() == saved
    assert advance(restored, [], 60)[0] == advance(original, [], 60)[0]
    with pytest.raises(RuntimeError, match="after start"):
        restored.restore(saved)


# --- FedScale traces ---------------------------------------------------------------------------------------
# tests/fixtures/fedscale/ holds hand-written traces in FedScale's formats. Each pickle (named as FedScale
# names its files, no extension) is ``pickle.dump(d, f, protocol=2)`` of a plain dict literal; the .json
# beside it is ``json.dump(d, f, indent=1)`` of the same dict. FEDSCALE_BEHAVE below is that dict for
# client_behave_trace (with FedScale's unused "duration" and "model" fields left out of this copy).

FEDSCALE = Path(__file__).parent / "fixtures" / "fedscale"
FEDSCALE_BEHAVE = {  # trace id: (finish_time, active, inactive)
    3: (100, [10, 50], [20, 60]),
    7: (40, [0], [5]),
    11: (1000, [100], [1200]),  # runs past finish_time: online from 100 to the end of each period
    20: (60, [30], [30]),  # online at one instant per period
    42: (50, [-10, 45], [5, 49]),  # starts before 0: online from each period's start
    100: (10, [], []),  # never online
}


def fedscale_online(trace_id: int, t: float) -> bool:
    """FedScale's ClientMetadata.is_active, read as intended: t mod finish_time in a closed interval."""
    finish, active, inactive = FEDSCALE_BEHAVE[trace_id]
    return any(on <= t % finish <= off for on, off in zip(active, inactive))


def fedscale_availability(num_clients: int, seed: int = 0, name: str = "client_behave_trace"):
    cfg = SchedulerConfig(availability="fedscale", availability_trace=str(FEDSCALE / name))
    return build_availability(cfg, num_clients, seed)


def write_pickle(tmp_path: Path, obj, name: str = "trace") -> str:
    path = tmp_path / name
    path.write_bytes(pickle.dumps(obj))
    return str(path)


def test_fedscale_availability_follows_fedscale_semantics():
    a = fedscale_availability(6, seed=4)
    assert isinstance(a, FedScaleAvailability)
    trace_ids = sorted(FEDSCALE_BEHAVE)
    replays = [trace_ids[j] for j in map_trace_clients(4, 6, 6)]
    assert sorted(replays) == trace_ids  # N == M: each trace client exactly once
    client_of = {t: c for c, t in enumerate(replays)}
    by_hand = {  # (trace id, time): online
        (3, 10): True, (3, 20): True, (3, 20.5): False, (3, 110): True, (3, 155): True, (3, 161): False,
        (7, 0): True, (7, 5): True, (7, 6): False, (7, 40): True, (7, 83): True,
        (11, 99): False, (11, 100): True, (11, 999.9): True, (11, 1000): False, (11, 1100): True,
        (20, 30): True, (20, 30.5): False, (20, 90): True,
        (42, 0): True, (42, 5): True, (42, 6): False, (42, 45): True, (42, 50): True, (42, 49.5): False,
        (100, 0): False, (100, 5): False,
    }
    for (trace_id, t), online in by_hand.items():
        assert fedscale_online(trace_id, t) == online, (trace_id, t)
        assert a.available([client_of[trace_id]], t, decision=0).tolist() == [online], (trace_id, t)
    times = np.concatenate([np.arange(0, 2100, 0.5), np.random.default_rng(0).uniform(0, 1e5, 300)])
    for t in np.random.default_rng(1).permutation(times):  # any query order
        expected = [fedscale_online(trace_id, t) for trace_id in replays]
        assert a.available(None, t, decision=0).tolist() == expected, t


def test_fedscale_next_time_is_the_next_start():
    a = fedscale_availability(6)
    # starts: 10, 50 (period 100); 0 (40); 100 (1000); 30 (60); 0, 45 (50)
    assert [a.next_time(t) for t in (0.0, 10.0, 30.0, 45.0, 99.5, 1999.0)] == [10.0, 30.0, 40.0, 50.0, 100.0, 2000.0]
    for t in np.arange(0.0, 400.0, 0.25):  # someone comes online at next_time(t), nobody new before it
        later = a.next_time(t)
        assert a.available(None, later, 0).sum() > 0 and later > t
        before = a.available(None, t, 0)
        for u in np.arange(t + 0.25, later, 0.25):
            assert not (a.available(None, u, 0) & ~before).any(), (t, u)


def test_fedscale_json_matches_pickle():
    a, b = fedscale_availability(20, seed=2), fedscale_availability(20, seed=2, name="client_behave_trace.json")
    for t in np.arange(0.0, 1200.0, 7.5):
        np.testing.assert_array_equal(a.available(None, t, 0), b.available(None, t, 0))
        assert a.next_time(t) == b.next_time(t)
    cfg = SchedulerConfig(device_trace_format="fedscale", device_trace=str(FEDSCALE / "client_device_capacity"))
    d_pickle = DeviceProfiles.from_config(cfg, 20, seed=2)
    cfg.device_trace = str(FEDSCALE / "client_device_capacity.json")
    d_json = DeviceProfiles.from_config(cfg, 20, seed=2)
    np.testing.assert_array_equal(d_pickle.speed, d_json.speed)
    np.testing.assert_array_equal(d_pickle.bandwidth, d_json.bandwidth)


def test_fedscale_mapping_by_seed():
    m = 1000
    a = map_trace_clients(7, m, m)
    np.testing.assert_array_equal(np.sort(a), np.arange(m))  # N == M: a permutation
    np.testing.assert_array_equal(map_trace_clients(7, m, m), a)
    assert (map_trace_clients(8, m, m) != a).mean() > 0.9
    assert len(np.unique(map_trace_clients(7, 600, m))) == 600  # N < M: no trace client twice
    np.testing.assert_array_equal(map_trace_clients(7, 10, m), a[:10])  # a client's trace ignores N
    big = map_trace_clients(7, 10_050, 100)  # N > M: every trace client 100 or 101 times
    counts = np.bincount(big, minlength=100)
    assert counts.min() == 100 and counts.max() == 101
    assert not np.array_equal(big[:100], big[100:200])  # each block of M clients has its own permutation
    np.testing.assert_array_equal(map_trace_clients(7, 5, 1), np.zeros(5))
    assert map_trace_clients(7, 0, 3).shape == (0,)


def test_fedscale_availability_at_a_million_clients(tmp_path):
    trace = {str(j): {"active": [j], "inactive": [j + 500], "finish_time": 2000} for j in range(1000)}
    cfg = SchedulerConfig(availability="fedscale", availability_trace=write_json(tmp_path, trace))
    a = build_availability(cfg, 1_000_000, seed=0)
    online = a.available(None, 700.0, decision=0)
    assert online.shape == (1_000_000,) and online.dtype == bool
    assert online.mean() == pytest.approx(501 / 1000)  # trace clients 200..700, each replayed 1000 times
    assert a.next_time(700.0) == 701.0


def test_fedscale_devices_convert_units():
    cfg = SchedulerConfig(device_trace_format="fedscale", device_trace=str(FEDSCALE / "client_device_capacity"))
    d = DeviceProfiles.from_config(cfg, 7, seed=1)
    computation = np.array([162.0, 81.0, 324.0, 100.0, 50.0, 200.0, 120.0])  # ms per sample, median 120
    communication = np.array([5648.109619499134, 1024.0, 2048.0, 800.0, 12000.0, 350.5, 4096.0])  # kbit/s
    trace_of = map_trace_clients(1, 7, 7)
    np.testing.assert_allclose(d.speed, computation[trace_of] / 120.0)
    np.testing.assert_allclose(d.bandwidth, communication[trace_of] * 128.0)
    # The time FedScale charges for a 1 MB update (in its kbit of 1024 bits) is what fedsim charges.
    size_bytes = 1e6
    np.testing.assert_allclose(size_bytes / d.bandwidth, size_bytes / 1024 * 8 / communication[trace_of])
    many = DeviceProfiles.from_config(cfg, 7_000, seed=1)
    assert np.median(many.speed) == 1.0 and set(many.speed) == set(computation / 120.0)


def test_fedscale_pickle_with_code_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for obj in (Exploit(), {1: {"active": [0], "inactive": [1], "finish_time": Exploit()}}):
        path = write_pickle(tmp_path, obj)
        with pytest.raises(TraceError, match=r"scheduler.availability_trace.*refers to (posix|os|nt)\.system"):
            build_availability(SchedulerConfig(availability="fedscale", availability_trace=path), 3, seed=0)
    assert not marker.exists()
    path = write_pickle(tmp_path, {1: {"computation": Fraction(1), "communication": 1.0}})
    with pytest.raises(TraceError, match=r"scheduler.device_trace.*refers to fractions.Fraction.*convert the file "
                                         r"to JSON"):
        DeviceProfiles.from_config(SchedulerConfig(device_trace_format="fedscale", device_trace=path), 3, seed=0)


def test_fedscale_pickle_of_numpy_scalars_reads_as_plain_numbers(tmp_path):
    plain = {3: {"computation": 2.5, "communication": 800}, 7: {"computation": 10.0, "communication": 60}}
    as_numpy = {np.int64(k): {"computation": np.float32(v["computation"]),
                              "communication": np.int32(v["communication"])} for k, v in plain.items()}
    cfg = SchedulerConfig(device_trace_format="fedscale")
    read = [DeviceProfiles.from_config(replace(cfg, device_trace=write_pickle(tmp_path, content, name)), 5, seed=0)
            for name, content in (("plain", plain), ("numpy", as_numpy))]
    np.testing.assert_array_equal(read[0].speed, read[1].speed)
    np.testing.assert_array_equal(read[0].bandwidth, read[1].bandwidth)


@pytest.mark.parametrize("content, problem", [
    ({1: {"active": [0], "inactive": [1]}}, "no 'finish_time' for client 1"),
    ({1: {"finish_time": 10, "inactive": [1]}}, "no 'active' for client 1"),
    ({1: {"finish_time": 10, "active": [0, 5], "inactive": [1]}}, "2 active and 1 inactive times for client 1"),
    ({1: {"finish_time": 10, "active": [5], "inactive": [1]}}, "active <= inactive"),
    ({1: {"finish_time": 0, "active": [0], "inactive": [1]}}, "finish_time=0 for client 1"),
    ({1: {"finish_time": 10, "active": ["0"], "inactive": [1]}}, "active=['0'] for client 1"),
    ({1: {"finish_time": 10, "active": 0, "inactive": 1}}, "active=0"),
    ({1: {"finish_time": 10, "active": [float("nan")], "inactive": [1]}}, "active=[nan]"),
    ({1: [0, 1]}, "expected a dict"),
    ({"x": {"finish_time": 10, "active": [0], "inactive": [1]}}, "client id 'x'"),
    ({1: {"finish_time": 10, "active": [0], "inactive": [1]},
      "1": {"finish_time": 10, "active": [0], "inactive": [1]}}, "lists client 1 twice"),
    ({}, "lists no clients"),
    ([1, 2], "not a list"),
    (b"garbage", "not a readable pickle"),
])
def test_fedscale_behave_trace_errors(tmp_path, content, problem):
    if isinstance(content, bytes):
        (tmp_path / "trace").write_bytes(content)
        path = str(tmp_path / "trace")
    else:
        path = write_pickle(tmp_path, content)
    with pytest.raises(TraceError) as err:
        build_availability(SchedulerConfig(availability="fedscale", availability_trace=path), 3, seed=0)
    assert "scheduler.availability_trace" in str(err.value) and path in str(err.value) and problem in str(err.value)


@pytest.mark.parametrize("content, problem", [
    ({1: {"computation": 10.0}}, "no 'communication' for client 1"),
    ({1: {"computation": 0.0, "communication": 1.0}}, "computation=0.0 for client 1"),
    ({1: {"computation": True, "communication": 1.0}}, "computation=True"),
    ({1: {"computation": 1.0, "communication": "fast"}}, "communication='fast'"),
])
def test_fedscale_device_trace_errors(tmp_path, content, problem):
    path = write_pickle(tmp_path, content)
    with pytest.raises(TraceError) as err:
        DeviceProfiles.from_config(SchedulerConfig(device_trace_format="fedscale", device_trace=path), 3, seed=0)
    assert "scheduler.device_trace" in str(err.value) and path in str(err.value) and problem in str(err.value)


def test_fedscale_json_and_missing_file_errors(tmp_path):
    path = write_json(tmp_path, '{"1": {"computation": 1, "communication": 2}, "1": {}}')
    with pytest.raises(TraceError, match="twice"):
        DeviceProfiles.from_config(SchedulerConfig(device_trace_format="fedscale", device_trace=path), 3, seed=0)
    with pytest.raises(TraceError, match="scheduler.availability_trace.*could not be read"):
        fedscale_availability(3, name="missing")


@pytest.mark.parametrize("cfg, key", [
    (SchedulerConfig(availability="fedscale"), "scheduler.availability_trace"),
    (SchedulerConfig(device_trace_format="fedscale"), "scheduler.device_trace"),
    (SchedulerConfig(device_trace_format="csv"), "scheduler.device_trace_format"),
])
def test_fedscale_config_checks(cfg, key):
    with pytest.raises(ConfigError, match=key):
        check_scheduler_config(cfg)


def test_fedscale_trace_drives_the_sync_planner():
    cfg = SchedulerConfig(availability="fedscale", availability_trace=str(FEDSCALE / "client_behave_trace"))
    planner = SyncPlanner(cfg, 12, 2, seed=0)
    s = planner.select_when_available(1, 6.0)  # nobody is online at 6 s; trace client 3 is from 10 s
    replays_3 = np.flatnonzero(map_trace_clients(0, 12, 6) == sorted(FEDSCALE_BEHAVE).index(3))
    assert s.start_s == 10.0 and sorted(s.dispatched) == replays_3.tolist()  # N = 2M: two clients replay it
