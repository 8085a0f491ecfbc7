"""Chaos table: inject each fault a user may meet into a small Ray run and tell what became of the run.

Every fault runs on the Ray engine with 2 workers and a checkpoint every round, on a small federation (6
clients, 3 a round, 4 rounds, one torch thread per process), and is compared with a fault-free Ray run of the
same config (FedAvg or SCAFFOLD): survived faults must end on its ``adapter_sha256``; faults a run cannot
survive (a full disk, a damaged client state) must stop it with an error naming the file, and the run must
then resume to the same adapter where the damage can be undone. Faults outside Ray (the driver, the disk, a
second writer, a node of an emulated cluster) hit ``fedsim run`` subprocesses; faults that need the run's
Ray handles (a worker, the aggregator actor, a hung call) hit ``run_ray`` in a thread of this process, on a
local Ray instance this script starts (a local instance is token-protected: only its own process tree can
reach it). Prints one Markdown row per fault, then the error lines the refusals printed.

    python experiments/chaos.py          # every fault: ~16 min on 2 busy cores, ~4 more for the references
    python experiments/chaos.py --only worker-kill,corrupt-state --seed 3 --out runs/chaos/table.md

Exit code 0 iff every row is as expected. The disk faults mount a tmpfs (root only). References are kept in
--workdir and reused by later invocations with the same overrides.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from fedsim.checkpoint import check_checkpoint
from fedsim.output import library_versions
from fedsim.statestore import STATES_DIR

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "experiments" / "quickstart.yaml"
LOCAL_CLUSTER = REPO / "cluster" / "local.py"
ROUNDS = 4
SMALL = ("data.num_train=240", "data.num_test=60", "partition.num_clients=6", "federation.clients_per_round=3",
         f"federation.rounds={ROUNDS}", "training.batch_size=8", "training.local_epochs=1", f"eval.every={ROUNDS}",
         "eval.zero_shot=false", "output.progress=never", "runtime.engine=ray", "runtime.num_workers=2",
         "runtime.num_threads=1", "checkpoint.every=1")
CONFIGS = {
    "fedavg": SMALL,
    # state_cache_mb=0: every client state is read from its file; a cached copy would hide a damaged file.
    "scaffold": (*SMALL, "algorithm.server.name=scaffold", "algorithm.client.name=scaffold", "training.optimizer=sgd",
                 "runtime.state_cache_mb=0"),
}
RUN_TIMEOUT_S = 900.0
REFUSAL_TIMEOUT_S = 300.0  # a second writer is refused before any work: imports only
CLUSTER_PORT = 6451  # away from the tests' clusters (6411, 6431) and local.py's default 6390
CHECKPOINT_ROOM = 16 * 1024  # free bytes left for the checkpoint fault: a metrics line fits, an adapter does not
NO_SPACE = "No space left on device"
SURVIVED, REFUSED = "survived", "refused as designed"
LEFTOVER_GRACE_S = 10.0  # a killed driver's Ray processes still running this long after it are reported

log = logging.getLogger("chaos")


class Failed(Exception):
    """The fault was neither survived nor refused as designed; the message says what happened instead."""

    def __init__(self, message: str, injected: str | None = None):
        super().__init__(message)
        self.injected = injected  # when the fault function knows more than the fault's description


@dataclass
class Result:
    outcome: str
    summary: dict | None = None  # the run's last summary.json, compared with the fault-free run (None: —)
    injected: str | None = None  # when the fault function knows more than the fault's description
    note: str = ""  # the error line of a refusal


@dataclass
class Fault:
    name: str
    config: str  # the key of CONFIGS the run uses
    injected: str
    run: Callable[["Chaos"], Result]


FAULTS: dict[str, Fault] = {}


def fault(name: str, config: str, injected: str):
    def register(run: Callable[["Chaos"], Result]) -> Callable[["Chaos"], Result]:
        FAULTS[name] = Fault(name, config, injected, run)
        return run
    return register


# ----------------------------------------------------------------------------------------------- runs
def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def checkpointed_round(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint" / "state.json").read_text())["round"]
    except (OSError, ValueError):  # none yet, or being replaced
        return 0


def wait_for_round(run_dir: Path, alive: Callable[[], bool], round_idx: int, timeout_s: float = RUN_TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while checkpointed_round(run_dir) < round_idx:
        if not alive():
            raise Failed(f"the run ended before round {round_idx}'s checkpoint")
        if time.time() > deadline:
            raise Failed(f"no checkpoint of round {round_idx} within {timeout_s:g} s")
        time.sleep(0.05)


@dataclass
class Driver:
    """A ``fedsim run`` subprocess, its output in a log file from ``offset`` on."""
    proc: subprocess.Popen
    log: Path
    offset: int

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        with open(self.log, "rb") as f:
            f.seek(self.offset)
            return f.read().decode(errors="replace")

    def finish(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise Failed(f"still running after {timeout_s:g} s (log: {self.log})") from None

    def finish_ok(self, run_dir: Path) -> dict:
        if self.finish():
            raise Failed(f"exit code {self.proc.returncode}: {error_line(self.output())} (log: {self.log})")
        return read_summary(run_dir)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """The driver stopped (SIGSTOP) for the block: what the block does lands before it reads or writes more."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        try:
            yield
        finally:
            os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.alive():
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


def error_line(output: str) -> str:
    """The last line of a run's output that reads like its error."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line or NO_SPACE in line]
    return (errors or lines or ["(no output)"])[-1][:400]


class Chaos:
    """What the faults share: the working folder, the seeded RNG, the fault-free references, the drivers started."""

    def __init__(self, workdir: Path, seed: int):
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.drivers: list[Driver] = []

    def fresh_dir(self, name: str) -> Path:
        path = self.workdir / name
        shutil.rmtree(path, ignore_errors=True)
        return path

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> Driver:
        """``fedsim run ARGS`` as a subprocess, its output in WORKDIR/NAME.log (appended to)."""
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "a") as out:
            offset = out.tell()
            proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "run", *args], cwd=REPO, env=env,
                                    stdout=out, stderr=subprocess.STDOUT, text=True)
        driver = Driver(proc, log_path, offset)
        self.drivers.append(driver)
        return driver

    def start_run(self, name: str, config: str, run_dir: Path, *extra: str,
                  env: dict[str, str] | None = None) -> Driver:
        return self.start(name, str(QUICKSTART), *CONFIGS[config], *extra, f"output.dir={run_dir}", env=env)

    def reference_dir(self, config: str) -> Path:
        """The fault-free run of ``config``, made once per set of overrides and kept in the working folder."""
        key = hashlib.sha256(json.dumps(CONFIGS[config]).encode()).hexdigest()[:8]
        run_dir = self.workdir / f"reference-{config}-{key}"
        if not (run_dir / "summary.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            log.info("fault-free run of %s in %s", config, run_dir)
            self.start_run(f"reference-{config}", config, run_dir).finish_ok(run_dir)
        return run_dir

    def reference(self, config: str) -> dict:
        return read_summary(self.reference_dir(config))

    def stop_drivers(self) -> None:
        for driver in self.drivers:
            driver.stop()
        self.drivers.clear()


# ----------------------------------------------------------------------------------------- in-process runs
class InProcessRun:
    """``run_ray`` in a thread of this process, on the local Ray instance of ``local_ray()``."""

    def __init__(self, config: str, run_dir: Path, *extra: str):
        from fedsim.validation import load_config

        self.cfg = load_config(QUICKSTART, [*CONFIGS[config], *extra, f"output.dir={run_dir}"])
        self.run_dir = run_dir
        self.outcome: dict = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        from actors.runtime import run_ray

        try:
            self.outcome["summary"] = run_ray(self.cfg, self.run_dir)
        except BaseException as err:  # reported in the row
            self.outcome["error"] = err

    def wait_for_round(self, round_idx: int) -> None:
        wait_for_round(self.run_dir, self.thread.is_alive, round_idx)

    def actor(self, role: str):
        """The run's live actor whose name holds ``:ROLE:`` (``worker0``, ``server``)."""
        import ray

        names = [n for n in ray.util.list_named_actors() if f":{role}:" in n and self.cfg.name in n]
        if len(names) != 1:
            raise Failed(f"expected one actor named like :{role}:, found {names}")
        return ray.get_actor(names[0])

    def finish(self) -> dict:
        self.thread.join(timeout=RUN_TIMEOUT_S)
        if self.thread.is_alive():
            raise Failed(f"still running after {RUN_TIMEOUT_S:g} s")
        if "error" in self.outcome:
            raise Failed(f"the run raised {type(self.outcome['error']).__name__}: {self.outcome['error']}")
        return self.outcome["summary"]


@contextmanager
def local_ray() -> Iterator[None]:
    from actors.local_ray import start_local_ray, stop_local_ray

    start_local_ray(num_cpus=2, log_to_driver=False)
    try:
        yield
    finally:
        stop_local_ray()


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


# ----------------------------------------------------------------------------------------------- faults
def kill_actor_after_round_1(chaos: Chaos, name: str, role: str, restart: bool) -> dict:
    """``ray.kill`` the run's actor named with ``role`` once round 1 is checkpointed; the run's summary."""
    import ray

    with local_ray():
        run = InProcessRun("fedavg", chaos.fresh_dir(name))
        run.wait_for_round(1)
        ray.kill(run.actor(role), no_restart=not restart)
        return run.finish()


@fault("worker-kill", "fedavg", "`ray.kill` (restart allowed, as after a crash) of worker 0 after round 1's checkpoint")
def worker_kill(chaos: Chaos) -> Result:
    summary = kill_actor_after_round_1(chaos, "worker-kill", "worker0", restart=True)
    expect(summary["worker_restarts"] >= 1, f"worker_restarts={summary['worker_restarts']}: the kill went unseen")
    return Result(SURVIVED, summary)


@fault("node-kill", "fedavg", "`cluster/local.py kill-node 1` (SIGKILL of a worker node)")
def node_kill(chaos: Chaos) -> Result:
    state = chaos.fresh_dir("cluster")
    env = {**os.environ, "FEDSIM_LOCAL_CLUSTER": str(state / "state.json"), "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_ADDRESS": f"127.0.0.1:{CLUSTER_PORT}", "PYTHONPATH": str(REPO),
           # Results over 1 KiB stay in the object store of the node that made them, as a real model's
           # updates (megabytes) do, so that a node's death loses them; Ray's default returns them inline.
           "RAY_max_direct_call_object_size": "1024"}

    def local(*args: str) -> None:
        done = subprocess.run([sys.executable, str(LOCAL_CLUSTER), *args], env=env, capture_output=True, text=True,
                              timeout=REFUSAL_TIMEOUT_S)
        expect(done.returncode == 0, f"cluster/local.py {args[0]}: {error_line(done.stdout + done.stderr)}")

    try:
        local("start", "--workers=2", "--cpus-per-node=2", f"--port={CLUSTER_PORT}",
              f"--dashboard-port={CLUSTER_PORT + 2}")
        # "Any moment" of a run as long as a fault-free one on this cluster, under this machine's load now.
        started, whole = time.time(), chaos.fresh_dir("node-kill-fault-free")
        chaos.start_run("node-kill-fault-free", "fedavg", whole, "runtime.placement=spread", env=env).finish_ok(whole)
        delay = chaos.rng.uniform(0.0, time.time() - started)
        injected = f"`kill-node 1` {delay:.1f} s after `fedsim run` started (placement=spread, 2 nodes x 2 CPUs)"
        run_dir = chaos.fresh_dir("node-kill")
        driver = chaos.start_run("node-kill", "fedavg", run_dir, "runtime.placement=spread", env=env)
        try:
            driver.proc.wait(timeout=delay)
            return Result(f"not injected: the run ended within {delay:.1f} s", injected=injected)
        except subprocess.TimeoutExpired:
            done = checkpointed_round(run_dir)
            local("kill-node", "1")
        injected += (", after the last round" if done == ROUNDS else f", in round {done + 1}" if done
                     else ", before round 1's checkpoint")
        try:
            summary = driver.finish_ok(run_dir)
        except Failed as err:
            raise Failed(str(err), injected) from None
    finally:
        subprocess.run([sys.executable, str(LOCAL_CLUSTER), "stop", "--grace", "5"], env=env, capture_output=True)
    nodes = sorted({n for w in summary["workers"] for n in w["node_resources"]})
    return Result(SURVIVED, summary, injected=injected,
                  note=f"workers ran on {nodes}; worker_restarts={summary['worker_restarts']}, "
                       f"tasks_rerun={summary['tasks_rerun']}")


@fault("aggregator-kill", "fedavg", "`ray.kill` of the `:server:` actor after round 1's checkpoint")
def aggregator_kill(chaos: Chaos) -> Result:
    summary = kill_actor_after_round_1(chaos, "aggregator-kill", "server", restart=False)
    expect(summary["server_restarts"] == 1, f"server_restarts={summary['server_restarts']}, expected 1")
    return Result(SURVIVED, summary)


@fault("driver-kill", "fedavg", "SIGKILL of `fedsim run` after round 1's checkpoint, then `fedsim run --resume`")
def driver_kill(chaos: Chaos) -> Result:
    run_dir = chaos.fresh_dir("driver-kill")
    driver = chaos.start_run("driver-kill", "fedavg", run_dir)
    wait_for_round(run_dir, driver.alive, 1)
    driver.proc.kill()
    driver.proc.wait()
    expect(not (run_dir / "summary.json").exists(), "the run had ended before the kill")
    time.sleep(LEFTOVER_GRACE_S)
    left = stop_leftovers(driver.proc.pid)
    summary = chaos.start("driver-kill", "--resume", str(run_dir)).finish_ok(run_dir)
    return Result(SURVIVED, summary, note=f"still running {LEFTOVER_GRACE_S:g} s after the kill, of the killed "
                                          f"driver's Ray instance (stopped here): {left}" if left else "")


def stop_leftovers(driver_pid: int) -> list[str]:
    """SIGKILL the processes still holding files of the Ray session a driver started (Ray names its session
    folder after the driver's PID); their PIDs and names."""
    session = re.compile(rf"/session_[0-9_-]+_{driver_pid}/")
    left = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if any(session.search(os.readlink(fd)) for fd in (proc / "fd").iterdir()):
                left.append(f"{proc.name} {(proc / 'comm').read_text().strip()}")
                os.kill(int(proc.name), signal.SIGKILL)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return left


@fault("hung-call", "fedavg", "SIGSTOP of worker 0's process after round 1's checkpoint, task_timeout_s=5")
def hung_call(chaos: Chaos) -> Result:
    import ray

    with local_ray():
        run = InProcessRun("fedavg", chaos.fresh_dir("hung-call"), "runtime.task_timeout_s=5")
        run.wait_for_round(1)
        pid = ray.get(run.actor("worker0").placement.remote())["pid"]
        os.kill(pid, signal.SIGSTOP)
        summary = run.finish()
    hung = summary["workers"][0]["hung"]
    expect(hung >= 1, f"workers[0].hung={hung}: the stopped worker went unseen")
    return Result(SURVIVED, summary)


@contextmanager
def tmpfs(mount: Path, size: str = "64m") -> Iterator[bool]:
    """A tmpfs of ``size`` at ``mount`` for the block (False: it could not be mounted), unmounted after."""
    mount.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                      capture_output=True).returncode:
        yield False
        return
    try:
        yield True
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # a process still in it: detach


def fill(mount: Path, leave: int) -> Path:
    """A file taking all of ``mount``'s free space but ``leave`` bytes."""
    stats = os.statvfs(mount)
    filler = mount / "filler"
    with open(filler, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, max(stats.f_bavail * stats.f_frsize - leave, 1))
    return filler


def full_disk(chaos: Chaos, name: str, config: str, leave: int, written: str) -> Result:
    """Fill the run's filesystem after round 1's checkpoint; the run must stop on ENOSPC naming a file under
    ``written``, keep its last complete checkpoint, and resume to the fault-free adapter once there is room."""
    mount = chaos.fresh_dir(f"{name}-tmpfs")
    with tmpfs(mount) as mounted:
        if not mounted:
            return Result("not injected (needs root to mount a tmpfs)")
        run_dir = mount / "run"
        driver = chaos.start_run(name, config, run_dir)
        wait_for_round(run_dir, driver.alive, 1)
        with driver.paused():
            filler = fill(mount, leave)
        code = driver.finish()
        error = error_line(driver.output())
        expect(code != 0, "the run ended normally on a full disk")
        try:
            kept = check_checkpoint(run_dir)
        except FileNotFoundError as err:
            raise Failed(f"stopped, but no complete checkpoint is left: {err}") from None
        filler.unlink()
        summary = chaos.start(name, "--resume", str(run_dir)).finish_ok(run_dir)
    # The resume is worth its row either way: the sha column says whether the refusal lost anything.
    designed = NO_SPACE in error and written in error
    outcome = REFUSED if designed else f"FAILED: stopped (exit code {code}), but the error does not name a file " \
                                       f"under {written}/"
    return Result(outcome, summary, note=f"{error} (kept: {kept.name}/)")


@fault("disk-full-state", "scaffold", "tmpfs filled (0 B free) after round 1's checkpoint, before SCAFFOLD writes a "
       "client state; filler deleted, then `--resume`")
def disk_full_state(chaos: Chaos) -> Result:
    return full_disk(chaos, "disk-full-state", "scaffold", 0, STATES_DIR)


@fault("disk-full-checkpoint", "fedavg", f"tmpfs filled ({CHECKPOINT_ROOM // 1024} KiB free) after round 1's "
       "checkpoint, so round 2's does not fit; filler deleted, then `--resume`")
def disk_full_checkpoint(chaos: Chaos) -> Result:
    return full_disk(chaos, "disk-full-checkpoint", "fedavg", CHECKPOINT_ROOM, "checkpoint")


def state_to_damage(run_dir: Path, reference_dir: Path) -> Path:
    """A client state file the run's checkpoint names, of the client whose task comes latest (the fault-free
    run's metrics say when), so that it is not read before it is damaged."""
    from safetensors.torch import load_file

    after = checkpointed_round(run_dir)
    manifest = load_file(str(check_checkpoint(run_dir) / "clients.safetensors"))
    named = dict(zip(manifest["client"].tolist(), manifest["generation"].tolist()))
    rounds = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    next_use: dict[int, tuple[int, int]] = {}  # client -> (round, place in that round's cohort)
    for record in rounds:
        for place, client in enumerate(record["clients"]):
            if record["round"] > after and client in named:
                next_use.setdefault(client, (record["round"], place))
    if not next_use:
        raise Failed(f"no client the checkpoint of round {after} names trains again")
    client = max(next_use, key=next_use.get)
    # The store's layout: client_states/<client // 1000 as 4 digits>/<client>.<generation>.safetensors
    matches = list((run_dir / STATES_DIR).glob(f"*/{client}.{named[client]}.safetensors"))
    expect(len(matches) == 1, f"client {client}'s state file (generation {named[client]}) not found: {matches}")
    return matches[0]


@fault("corrupt-state", "scaffold", "garbage written over a client state file round 1's checkpoint names, with the "
       "driver paused (SIGSTOP/SIGCONT)")
def corrupt_state(chaos: Chaos) -> Result:
    run_dir = chaos.fresh_dir("corrupt-state")
    # No task queued on a worker: the last task of round 2 fetches its state only once a worker is free, long
    # after this script saw round 1's checkpoint (the first ones may be on their way already).
    driver = chaos.start_run("corrupt-state", "scaffold", run_dir, "runtime.queue_per_worker=0")
    wait_for_round(run_dir, driver.alive, 1)
    with driver.paused():
        damaged = state_to_damage(run_dir, chaos.reference_dir("scaffold"))
        # Replaced whole, as an editor or a copy would: a reader of the old file keeps it intact (an mmap of a
        # file truncated under it dies of SIGBUS).
        garbage = damaged.with_suffix(".garbage")
        garbage.write_bytes(b"not a safetensors file" * 8)
        os.replace(garbage, damaged)
    code = driver.finish()
    output = driver.output()
    expect(code != 0, f"the run ended normally: {damaged} was read before it was damaged, or never")
    named = [line.strip() for line in output.splitlines() if str(damaged) in line]
    expect(bool(named), f"exit code {code}, but no line names {damaged}: {error_line(output)}")
    return Result(REFUSED, injected=f"{FAULTS['corrupt-state'].injected}: `{damaged.relative_to(run_dir)}`",
                  note=named[-1][:400])


@fault("second-writer", "fedavg", "with the first run paused after round 1's checkpoint: `fedsim run` of the same "
       "config and `fedsim run --resume` on its run directory")
def second_writer(chaos: Chaos) -> Result:
    run_dir = chaos.fresh_dir("second-writer")
    first = chaos.start_run("second-writer", "fedavg", run_dir)
    wait_for_round(run_dir, first.alive, 1)
    holder = f"process {first.proc.pid}"
    refusals = []
    # Paused, the first run holds its lock without finishing before the others have tried.
    with first.paused():
        for label, second in (("run", chaos.start_run("second-writer-new", "fedavg", run_dir)),
                              ("resume", chaos.start("second-writer-resume", "--resume", str(run_dir)))):
            code = second.finish(REFUSAL_TIMEOUT_S)
            error = error_line(second.output())
            expect(code != 0 and holder in error, f"second `fedsim {label}`: exit code {code}, {error}")
            refusals.append(error)
    summary = first.finish_ok(run_dir)
    return Result(REFUSED, summary, note=" / ".join(refusals))


# ----------------------------------------------------------------------------------------------- table
@dataclass
class Row:
    fault: str
    injected: str
    outcome: str
    sha: str
    lost: str
    seconds: float
    note: str

    @property
    def expected(self) -> bool:
        return self.outcome in (SURVIVED, REFUSED) and self.sha != "no"


def run_fault(chaos: Chaos, item: Fault) -> Row:
    reference = chaos.reference(item.config)  # before the clock starts
    log.info("fault %s", item.name)
    started = time.time()
    try:
        result = item.run(chaos)
    except Exception as err:  # any surprise is the row's outcome, not the end of the table
        reason = str(err) if isinstance(err, Failed) else f"{type(err).__name__}: {err}"
        result = Result(f"FAILED: {reason}", injected=getattr(err, "injected", None))
    finally:
        chaos.stop_drivers()
    seconds = time.time() - started
    sha, lost = "—", "—"
    if result.summary is not None:
        sha = "yes" if result.summary["adapter_sha256"] == reference["adapter_sha256"] else "no"
        lost = str(reference["client_updates"] - result.summary["client_updates"])
    return Row(item.name, result.injected or item.injected, result.outcome, sha, lost, seconds, result.note)


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")[:300]


def table(rows: list[Row]) -> str:
    lines = ["| fault | injected | outcome | adapter_sha256 = fault-free | updates lost | seconds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r.fault} | {cell(r.injected)} | {cell(r.outcome)} | {r.sha} | {r.lost} | {r.seconds:.0f} |"
              for r in rows]
    notes = [f"- {r.fault}: {cell(r.note)}" for r in rows if r.note]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated faults to run (default all): {','.join(FAULTS)}")
    parser.add_argument("--seed", type=int, default=0, help="seeds the random choices (the node kill's moment)")
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "chaos",
                        help="run directories, logs and the fault-free references (default runs/chaos)")
    args = parser.parse_args(argv)
    args.only = args.only.split(",") if args.only else list(FAULTS)
    unknown = [name for name in args.only if name not in FAULTS]
    if unknown:
        parser.error(f"--only: unknown fault(s) {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.workdir / "chaos.log")  # the in-process runs' logs too
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler, logging.StreamHandler()])
    chaos = Chaos(args.workdir.resolve(), args.seed)
    rows = [run_fault(chaos, FAULTS[name]) for name in args.only]
    text = table(rows)
    text += f"\n{time.strftime('%Y-%m-%d %H:%M %Z')}, seed {args.seed}; {json.dumps(library_versions())}\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if all(r.expected for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
