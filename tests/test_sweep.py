"""Sweeps (``fedsim sweep``) and reports (``fedsim report``) on tiny runs."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from fedsim.cli import main
from fedsim.config import ConfigError
from fedsim.runlock import DirectoryInUse, run_lock
from fedsim.sweep import Sweep, parse_grid_arg

from conftest import REPO
from test_local_ray import client, gcs_of, is_loopback, listening_sockets, run_tree, wait_for_a_client_worker

QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")
TINY = ["data.num_train=120", "data.num_test=24", "federation.clients_per_round=2", "federation.rounds=2",
        "training.local_epochs=1", "eval.every=1", "eval.zero_shot=true", "runtime.engine=sequential",
        "runtime.num_threads=1", "scheduler.speed=lognormal"]
GRID = ["--grid", "partition.num_clients=4,6", "--grid", "algorithm.server.name=fedavg,fedbuff"]


def read_table(sweep_dir):
    with open(sweep_dir / "sweep.csv") as f:
        return list(csv.DictReader(f))


def test_grid_argument_parsing():
    assert parse_grid_arg("partition.num_clients=100, 500,1000") == ("partition.num_clients", ["100", "500", "1000"])
    for bad in ("partition.num_clients", "=1,2", "key=1,,2", "key="):
        with pytest.raises(ConfigError, match="key=value1,value2"):
            parse_grid_arg(bad)


def test_plan_checks_every_point_before_running(tmp_path):
    with pytest.raises(ConfigError, match=r"grid point num_clients=4-lr=-1.*training.lr"):
        Sweep.plan([QUICKSTART], TINY, ["partition.num_clients=4", "training.lr=0.1,-1"], str(tmp_path))
    with pytest.raises(ConfigError, match="no grid"):
        Sweep.plan([QUICKSTART], TINY, [], str(tmp_path))
    with pytest.raises(ConfigError, match="'output.dir' cannot be swept"):
        Sweep.plan([QUICKSTART], TINY, ["output.dir=a,b"], str(tmp_path))
    with pytest.raises(ConfigError, match="repeats a value"):
        Sweep.plan([QUICKSTART], TINY, ["seed=1,1"], str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing written


def test_grid_from_yaml_and_command_line(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text("sweep:\n  grid:\n    partition.num_clients: [10, 20]\n    algorithm.server.name: [fedavg]\n"
                     "    training.lr: [0.001]\n")
    sweep = Sweep.plan([QUICKSTART, str(study)], TINY, ["algorithm.server.name=fedavg,fedadam"], None)
    assert sweep.grid == {"partition.num_clients": ["10", "20"], "algorithm.server.name": ["fedavg", "fedadam"],
                          "training.lr": ["0.001"]}
    assert [p.label for p in sweep.points()] == ["num_clients=10-server.name=fedavg-lr=0.001",
                                                 "num_clients=10-server.name=fedadam-lr=0.001",
                                                 "num_clients=20-server.name=fedavg-lr=0.001",
                                                 "num_clients=20-server.name=fedadam-lr=0.001"]
    assert str(sweep.dir) == "runs/sweep-quickstart"  # named after the experiment


def test_a_sweep_dir_continues_only_its_own_sweep(tmp_path):
    Sweep.plan([QUICKSTART], TINY, ["seed=1,2"], str(tmp_path)).write_manifest()
    other = Sweep.plan([QUICKSTART], TINY + ["training.lr=0.5"], ["seed=1,2"], str(tmp_path))
    with pytest.raises(ConfigError, match="different base config"):
        other.check_manifest()
    Sweep.plan([QUICKSTART], TINY, ["seed=1,2,3"], str(tmp_path)).check_manifest()  # a grown grid is fine


def stand_in_checkpoint(run_dir):
    """A complete (if meaningless) checkpoint in ``run_dir``, as the loop writes one."""
    import torch

    from fedsim.checkpoint import Checkpoint, write_checkpoint
    from fedsim.statestore import StateManifest

    run_dir.mkdir(parents=True, exist_ok=True)
    write_checkpoint(run_dir, Checkpoint(round=1, server={"w": torch.zeros(1)}, clients=StateManifest(), state={}))


def test_a_sweep_resumes_its_runs_with_the_consent_resume_asks_for(tmp_path):
    """``fedsim run --resume`` refuses a saved config with model.trust_remote_code, and drops a saved
    runtime.address, unless the command line repeats them; a sweep whose own config set them must repeat
    them when it resumes an interrupted point."""
    asked = ["model.trust_remote_code=true", "runtime.address=ray://head:10001"]
    for given, expected in ((asked, asked), ([], [])):
        sweep = Sweep.plan([QUICKSTART], TINY + given, ["seed=1"], str(tmp_path / str(bool(given))))
        point = sweep.points()[0]
        stand_in_checkpoint(sweep.dir / point.label)
        command = sweep.command(point)
        assert command[command.index("--resume"):] == ["--resume", str(sweep.dir / point.label), *expected]


def test_a_sweep_sets_aside_a_run_without_checkpoint_and_never_deletes_it(tmp_path):
    sweep = Sweep.plan([QUICKSTART], TINY, ["seed=1"], str(tmp_path))
    point = sweep.points()[0]
    run_dir = sweep.dir / point.label
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"round": 1}\n')  # a finished round, no checkpoint yet
    with run_lock(run_dir):  # a run alive in it: left alone
        with pytest.raises(DirectoryInUse):
            sweep.command(point)
    assert (run_dir / "metrics.jsonl").exists()
    command = sweep.command(point)
    assert "--resume" not in command and f"output.dir={run_dir}" in command  # a fresh run...
    assert not run_dir.exists()
    [aside] = tmp_path.glob(f"{point.label}.failed-*")  # ...beside the old one, kept whole
    assert (aside / "metrics.jsonl").read_text() == '{"round": 1}\n'


def test_a_sweep_directory_in_use_is_refused_naming_its_holder(tmp_path, capsys):
    with run_lock(tmp_path):
        assert main(["sweep", QUICKSTART, "--grid", "seed=1", *TINY, "--out", str(tmp_path)]) == 2
    assert f"fedsim: error: {tmp_path} is in use by process {os.getpid()} (started " in capsys.readouterr().err
    assert not (tmp_path / "sweep.json").exists()  # refused before any work


def children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state, ppid, ...
        except OSError:  # ended while we looked
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running, not gone nor a zombie (an orphan's zombie lingers where nothing reaps it, as in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # a real sweep process: ~5-15 s, most of it its imports
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_a_sweep_killed_by_sigkill_takes_its_run_with_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "sweep", QUICKSTART, "--grid", "seed=1", *TINY,
                             "--out", str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run := children(proc.pid)) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert run, "the sweep started no run"
        # its first child is its run: a sweep of sequential runs starts no Ray instance for them
        assert "fedsim.cli\0run" in Path(f"/proc/{run[0]}/cmdline").read_text(), "not a run"
        proc.kill()  # no handler, no finally: only the kernel can stop its run now
        proc.wait()
        deadline = time.time() + 10
        while alive(run[0]) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(run[0]), "the sweep's run outlived it"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the sweep's session
        proc.wait()


@contextmanager
def local_ray_recorded(monkeypatch):
    """actors.local_ray's instance for other processes, stood in for by a record of each request (its min_cpus)."""
    import actors.local_ray

    requests = []

    @contextmanager
    def instance(min_cpus=0.0):
        requests.append(min_cpus)
        yield {"RAY_ADDRESS": "127.0.0.1:1"}

    monkeypatch.setattr(actors.local_ray, "local_ray_for_other_processes", instance)
    yield requests


def test_a_sweep_starts_one_ray_only_for_runs_that_would_start_their_own(tmp_path, monkeypatch):
    """The Ray engine without runtime.address or RAY_ADDRESS: one instance, with the CPUs of P runs of the
    largest point at once; a sequential sweep or one that joins a cluster starts none."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    workers = ["runtime.num_workers=1,3", "runtime.cpus_per_worker=0.5"]
    on_ray = Sweep.plan([QUICKSTART], [*TINY, "runtime.engine=ray"], workers, str(tmp_path))
    with local_ray_recorded(monkeypatch) as requests:
        for parallel in (1, 2, 5):  # the largest reserves 1.5 CPUs; 2 runs at most at once
            with on_ray.shared_ray(on_ray.points(), parallel) as env:
                assert env == {"RAY_ADDRESS": "127.0.0.1:1"}
        assert requests == [1.5, 3.0, 3.0]
        with on_ray.shared_ray(on_ray.points()[:1], 2):  # only the points still to run count
            assert requests[-1] == 0.5
        mixed = Sweep.plan([QUICKSTART], TINY, ["runtime.engine=sequential,ray"], str(tmp_path))
        with mixed.shared_ray(mixed.points(), 2):
            assert requests[-1] == 2.0  # one run on Ray: the quickstart's 2 workers of 1 CPU
        requests.clear()
        sequential = Sweep.plan([QUICKSTART], TINY, ["seed=1,2"], str(tmp_path))
        joining = Sweep.plan([QUICKSTART], [*TINY, "runtime.engine=ray", "runtime.address=10.0.0.1:6379"],
                             ["seed=1,2"], str(tmp_path))
        for sweep in (sequential, joining):
            with sweep.shared_ray(sweep.points(), 2) as env:
                assert env is None  # the runs inherit the sweep's environment
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
        with on_ray.shared_ray(on_ray.points(), 2) as env:
            assert env is None
        assert requests == []


def refused(address: str) -> bool:
    try:
        socket.create_connection(address.rsplit(":", 1), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow  # two real sweeps on Ray (~60 s on 2 cores)
def test_a_sweep_runs_on_one_loopback_ray_that_ends_with_it_even_when_terminated(tmp_path):
    """A sweep of 2 runs on the Ray engine, stopped by SIGTERM while its first run is joined to its instance,
    leaves no process of it and its GCS port closed; run again, 2 at once, both runs join one instance (one GCS,
    one node) listening on loopback only and refusing a client without the token, gone when the sweep ends, and
    the runs' adapters are those of standalone runs (the sequential engine's, which Ray's match bit for bit)."""
    sweep_dir = tmp_path / "sweep"
    ray_run = [*TINY, "runtime.engine=ray", "runtime.num_workers=1", "federation.rounds=1", "eval.zero_shot=false",
               "partition.num_clients=4"]
    args = ["sweep", QUICKSTART, "--grid", "seed=1,2", *ray_run, "--out", str(sweep_dir)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    log_path = tmp_path / "sweep.log"

    def start(parallel: int) -> subprocess.Popen:
        with open(log_path, "w") as log:
            return subprocess.Popen([sys.executable, "-m", "fedsim.cli", *args, "--parallel", str(parallel)],
                                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

    proc = start(parallel=1)
    try:
        deadline = time.time() + 180
        while not re.search("Connected to Ray cluster|Started a local Ray", read_if_any(sweep_dir / "seed=1.log")):
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()
            time.sleep(0.2)
        procs = run_tree(proc.pid)
        address, _ = gcs_of(procs)
        proc.terminate()
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        proc.kill()
    assert not [p.pid for p in procs[1:] if alive_after(p.pid)], "the terminated sweep left processes behind"
    assert refused(address)
    assert [r["status"] for r in read_table(sweep_dir)] == ["pending", "pending"]

    proc = start(parallel=2)
    clients = []
    try:
        procs = wait_for_a_client_worker(proc, log_path)
        assert [s for s in listening_sockets(procs) if not is_loopback(s[1])] == []
        address, token = gcs_of(procs)
        assert len(token) == 64
        clients.append(client(address, tmp_path))
        gcs_servers = gcs_servers_in(procs)
        while proc.poll() is None:
            with contextlib.suppress(psutil.Error):  # the sweep ended meanwhile
                gcs_servers |= gcs_servers_in(run_tree(proc.pid))
            time.sleep(0.3)
        assert proc.returncode == 0, log_path.read_text()
        refusal = clients[0].communicate(timeout=90)[0]
    finally:
        for p in [proc, *clients]:
            p.kill()
    assert clients[0].returncode != 0 and "AuthenticationError" in refusal, refusal
    assert len(gcs_servers) == 1, gcs_servers
    assert not alive_after(gcs_servers.pop()) and refused(address)

    summaries = [json.loads((sweep_dir / f"seed={seed}" / "summary.json").read_text()) for seed in (1, 2)]
    assert len({w["node_id"] for s in summaries for w in s["workers"]}) == 1
    assert {w["node_ip"] for s in summaries for w in s["workers"]} == {"127.0.0.1"}
    with torch_threads_kept():
        for seed, summary in zip((1, 2), summaries):
            standalone = tmp_path / f"standalone-{seed}"
            assert main(["run", QUICKSTART, *ray_run, f"seed={seed}", "runtime.engine=sequential",
                         f"output.dir={standalone}"]) == 0
            assert summary["adapter_sha256"] == json.loads((standalone / "summary.json").read_text())["adapter_sha256"]


def read_if_any(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def alive_after(pid: int, timeout_s: float = 30.0) -> bool:
    """Whether ``pid`` is still alive after waiting up to ``timeout_s`` for it to end."""
    deadline = time.time() + timeout_s
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    return alive(pid)


def gcs_servers_in(procs: list[psutil.Process]) -> set[int]:
    """The pids of the GCS servers among ``procs`` (those that ended meanwhile left out)."""
    found = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.name() == "gcs_server":
                found.add(proc.pid)
    return found


@contextmanager
def torch_threads_kept():
    """runtime.num_threads sets torch's thread count for the whole process: the next test gets it back."""
    import torch

    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_interrupted_sweep_restarts_without_repeating_and_reports(tmp_path):
    """A 2x2 sweep is killed (with its run in flight) once its first run has finished; the same command
    finishes it without running the first again; ``fedsim report`` then draws it."""
    sweep_dir = tmp_path / "sweep"
    args = ["sweep", QUICKSTART, *GRID, *TINY, "--out", str(sweep_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = sweep_dir / "num_clients=4-server.name=fedavg" / "summary.json"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (sweep_dir / "sweep.csv").exists() and read_table(sweep_dir)[0]["status"] == "done":
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its run in flight
    proc.wait()
    rows = read_table(sweep_dir)
    assert [r["status"] for r in rows] == ["done", "pending", "pending", "pending"]
    finished_at = first.stat().st_mtime_ns

    assert main(args) == 0
    rows = read_table(sweep_dir)
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows)
    assert first.stat().st_mtime_ns == finished_at  # not run again
    assert [(r["partition.num_clients"], r["algorithm.server.name"]) for r in rows] == \
        [("4", "fedavg"), ("4", "fedbuff"), ("6", "fedavg"), ("6", "fedbuff")]
    for row in rows:
        summary = json.loads((sweep_dir / row["run"] / "summary.json").read_text())
        assert float(row["final_accuracy"]) == summary["final_metrics"]["accuracy"]
        assert int(row["client_updates"]) == summary["client_updates"] > 0
        assert summary["num_clients"] == int(row["partition.num_clients"])

    assert main(["report", str(sweep_dir)]) == 0
    report = sweep_dir / "report"
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert {"metric_vs_round.png", "metric_vs_simulated_time.png", "metric_vs_bytes.png",
            "scaling_num_clients.png", "staleness.png"} <= set(pngs)
    page = (report / "index.html").read_text()
    assert sorted(set(re.findall(r'src="([^"]+\.png)"', page))) == pngs
    for row in rows:  # every run in the table, labelled by its values
        assert f"num_clients={row['partition.num_clients']}, server.name={row['algorithm.server.name']}" in page
    assert all((report / p).stat().st_size > 10_000 for p in pngs)  # drawn, not empty canvases


@pytest.mark.slow
def test_report_of_a_single_run_and_bad_metric(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", QUICKSTART, *TINY, "partition.num_clients=4", f"output.dir={run}"]) == 0
    versions = json.loads((run / "summary.json").read_text())["versions"]
    assert versions["torch"].startswith("2.") and versions["transformers"] and versions["bitsandbytes"]
    assert main(["report", str(run), "--out", str(tmp_path / "fig")]) == 0
    page = (tmp_path / "fig" / "index.html").read_text()
    assert 'src="metric_vs_round.png"' in page and "staleness.png" not in page
    assert main(["report", str(run), "--metric", "bleu"]) == 2
    assert "'bleu' was never evaluated" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nothing")]) == 2


def write_run(run_dir, evals, headline=None, **extra):
    """A finished run's metrics.jsonl and summary.json, without training: ``evals[0]`` is the zero-shot
    evaluation, ``evals[r]`` round r's."""
    run_dir.mkdir(parents=True)
    records = [{"round": r, "bytes_up": 1000, "bytes_down": 1000, "simulated_seconds": 10.0 * r, "eval": e}
               for r, e in enumerate(evals[1:], start=1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = {"experiment": run_dir.name, "algorithm": {"server": "fedavg"}, "mode": "sync",
               "rounds": len(records), "client_updates": 2 * len(records), "simulated_seconds": 10.0 * len(records),
               "wall_seconds": 1.0, "train_seconds": 1.0, "bytes_up": 1000 * len(records),
               "bytes_down": 1000 * len(records), "zero_shot_metrics": evals[0], "final_metrics": evals[-1]}
    if headline:
        summary["headline_metric"] = headline
    (run_dir / "summary.json").write_text(json.dumps({**summary, **extra}))


def with_ablations(accuracy):
    return {"accuracy": accuracy, "no_image/accuracy": accuracy / 2, "no_text/accuracy": accuracy / 3}


def test_report_draws_modality_contribution_of_runs_with_ablations(tmp_path):
    sweep_dir = tmp_path / "sweep"
    runs = [{"label": f"seed={seed}", "values": {"seed": str(seed)}} for seed in (1, 2, 3)]
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"runs": runs}))
    for seed in (1, 2):
        write_run(sweep_dir / f"seed={seed}", [with_ablations(a / seed) for a in (0.3, 0.6, 0.9)])
    write_run(sweep_dir / "seed=3", [{"accuracy": a} for a in (0.3, 0.6, 0.9)])  # no ablations: no panel
    assert main(["report", str(sweep_dir)]) == 0
    page = (sweep_dir / "report" / "index.html").read_text()
    assert 'src="modality_contribution.png"' in page
    assert (sweep_dir / "report" / "modality_contribution.png").stat().st_size > 10_000

    plain = tmp_path / "plain"
    write_run(plain, [{"accuracy": a} for a in (0.3, 0.6)])
    assert main(["report", str(plain)]) == 0
    assert "modality_contribution" not in (plain / "report" / "index.html").read_text()
    assert not (plain / "report" / "modality_contribution.png").exists()


def test_report_plots_accuracy_against_epsilon_and_bytes_only_for_runs_that_spend_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    runs = [{"label": f"sigma={s}", "values": {"privacy.noise_multiplier": str(s)}} for s in (0.5, 1.0)]
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"runs": runs}))
    for sigma, eps in ((0.5, 9.0), (1.0, 2.5)):
        write_run(sweep_dir / f"sigma={sigma}", [{"accuracy": a} for a in (0.3, 0.5 / sigma)],
                  privacy={"epsilon": eps}, compression={"kind": "topk"})
    assert main(["report", str(sweep_dir)]) == 0
    page = (sweep_dir / "report" / "index.html").read_text()
    assert 'src="tradeoff_epsilon.png"' in page and 'src="tradeoff_bytes.png"' in page

    plain = tmp_path / "plain"
    write_run(plain, [{"accuracy": a} for a in (0.3, 0.6)])
    assert main(["report", str(plain)]) == 0
    assert "tradeoff" not in (plain / "report" / "index.html").read_text()


def test_report_plots_accuracy_against_the_attackers_share_a_panel_per_attack(tmp_path):
    sweep_dir = tmp_path / "sweep"
    grid = [{"algorithm.server.name": rule, "attack.kind": kind, "attack.fraction": str(share)}
            for rule in ("fedavg", "median") for kind in ("sign_flip", "free_rider") for share in (0.0, 0.2)]
    runs = [{"label": "-".join(values.values()), "values": values} for values in grid]
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"runs": runs}))
    for run in runs:
        final = 0.8 - float(run["values"]["attack.fraction"])
        write_run(sweep_dir / run["label"], [{"accuracy": a} for a in (0.3, final)])
    assert main(["report", str(sweep_dir)]) == 0
    page = (sweep_dir / "report" / "index.html").read_text()
    assert 'src="robustness.png"' in page and "scaling_fraction" not in page  # one figure for the attack share

    plain = tmp_path / "plain"
    write_run(plain, [{"accuracy": a} for a in (0.3, 0.6)])
    assert main(["report", str(plain)]) == 0
    assert "robustness" not in (plain / "report" / "index.html").read_text()


def test_report_defaults_to_the_runs_headline_metric(tmp_path):
    evals = [{"accuracy": a, "macro_f1": a / 2, "roc_auc": a / 3} for a in (0.3, 0.6)]
    headline, older = tmp_path / "headline", tmp_path / "older"
    write_run(headline, evals, headline="roc_auc")
    write_run(older, evals)  # written before summary.json had headline_metric
    assert main(["report", str(headline)]) == 0
    assert "metric: roc_auc." in (headline / "report" / "index.html").read_text()
    assert main(["report", str(headline), "--metric", "macro_f1"]) == 0  # an explicit metric wins
    assert "metric: macro_f1." in (headline / "report" / "index.html").read_text()
    assert main(["report", str(older)]) == 0
    assert "metric: accuracy." in (older / "report" / "index.html").read_text()


def _keys(node, prefix=""):
    if not isinstance(node, dict):
        return {prefix}
    return {k for key, value in node.items() for k in _keys(value, f"{prefix}.{key}" if prefix else key)}


@pytest.mark.parametrize("study", ["clients", "participation", "sync-vs-async", "million"])
def test_studies_and_their_gpu_twins_differ_only_in_values(study):
    import yaml

    studies = REPO / "experiments" / "studies"
    cpu, gpu = studies / f"{study}.yaml", studies / "gpu" / f"{study}.yaml"
    cpu_yaml, gpu_yaml = yaml.safe_load(cpu.read_text()), yaml.safe_load(gpu.read_text())
    assert _keys(cpu_yaml) == _keys(gpu_yaml)
    assert cpu_yaml["sweep"] == gpu_yaml["sweep"]  # the same study: only its scale differs
    for path in (cpu, gpu):
        sweep = Sweep.plan([str(path)], [], [], None)  # every point's config is valid
        assert len(sweep.points()) >= 2
    assert cpu_yaml["model"]["name"] == "tiny"


# ------------------------------------------------------------------------- figures: percent, chance, round/version
def metric_lines(ax):
    """An axes' lines by label: (x data, y data)."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_report_draws_fractions_in_percent_with_the_chance_line_over_rounds_or_versions(tmp_path):
    import matplotlib.pyplot as plt

    from fedsim.report import Metric, check_chance, draw_figures, load_runs, plot_curves, plotted_metric

    sweep_dir = tmp_path / "sweep"
    grid = [{"attack.fraction": share, "seed": seed} for share in ("0.0", "0.2") for seed in ("1", "2")]
    manifest = [{"label": f"fraction={v['attack.fraction']}-seed={v['seed']}", "values": v} for v in grid]
    sweep_dir.mkdir()
    (sweep_dir / "sweep.json").write_text(json.dumps({"runs": manifest}))
    for run in manifest:  # seed 2 runs asynchronously: the figures over steps mix rounds and versions
        write_run(sweep_dir / run["label"], [with_ablations(a) for a in (0.3, 0.6)],
                  mode="async" if run["values"]["seed"] == "2" else "sync", chance_metrics={"accuracy": 0.25},
                  staleness={"histogram": {"0": 1, "1": 1}, "mean": 0.5},
                  privacy={"epsilon": 1.0 + float(run["values"]["attack.fraction"])})
    runs = load_runs(sweep_dir)
    metric = plotted_metric(runs, None, None)
    assert metric == Metric("accuracy", 0.25)  # the level the runs recorded
    figures = draw_figures(runs, metric)
    try:
        drawn = {f.name: f.figure.axes for f in figures}
        labelled = [*(drawn[name][0] for name in ("metric_vs_round.png", "metric_vs_simulated_time.png",
                                                 "metric_vs_bytes.png", "scaling_seed.png", "tradeoff_epsilon.png",
                                                 "robustness.png"))]
        modality = drawn["modality_contribution.png"][:4]  # 4 panels in rows of 3, the y label on the first column
        for ax in labelled + modality:
            assert metric_lines(ax)["chance (25%)"][1] == [25.0, 25.0], ax.get_title()  # at 100 x chance
        for ax in labelled + [modality[0], modality[3]]:
            assert "%" in ax.get_ylabel(), ax.get_title()
        assert metric_lines(drawn["metric_vs_round.png"][0])["fraction=0.0, seed=1"] == ([0, 1], [30.0, 60.0])
        assert metric_lines(drawn["modality_contribution.png"][0])["no_image"][1] == [15.0, 30.0]
        assert metric_lines(drawn["robustness.png"][0])["seed=1"][1] == [60.0, 60.0]  # final accuracy, x100
        seconds = drawn["scaling_seed.png"][1]  # seconds stay seconds, with no chance line
        assert "%" not in seconds.get_ylabel() and [y for _, y in metric_lines(seconds).values()] == [[10.0, 10.0]] * 2
        assert drawn["metric_vs_round.png"][0].get_xlabel() == "round / global version"
        assert [ax.get_xlabel() for ax in modality] == ["round", "global version", "round", "global version"]
    finally:
        for figure in figures:
            plt.close(figure.figure)

    lone_async = load_runs(sweep_dir / "fraction=0.0-seed=2")
    older = tmp_path / "older"  # written before summary.json had chance_metrics
    write_run(older, [{"accuracy": a, "macro_f1": a} for a in (0.3, 0.6)])
    older_runs = load_runs(older)
    assert plotted_metric(older_runs, None, None) == Metric("accuracy", None)  # no line
    assert plotted_metric(older_runs, "macro_f1", 0.2) == Metric("macro_f1", 0.2)  # --chance
    figures = plot_curves(lone_async, Metric("accuracy")) + plot_curves(older_runs, Metric("accuracy"))
    try:
        assert figures[0].figure.axes[0].get_xlabel() == "global version"
        by_round = figures[3].figure.axes[0]
        assert by_round.get_xlabel() == "round" and not any("chance" in label for label in metric_lines(by_round))
    finally:
        for figure in figures:
            plt.close(figure.figure)
    with pytest.raises(ValueError, match="fractions"):
        check_chance(0.25, "train_loss")
    assert main(["report", str(older), "--chance", "25"]) == 2  # refused before anything is drawn
    assert not (older / "report").exists()


@pytest.mark.slow
def test_a_run_records_the_chance_level_of_its_task_and_its_report_draws_it(tmp_path):
    import matplotlib.pyplot as plt
    from conftest import small_config

    from fedsim.engine.sequential import run_sequential
    from fedsim.report import load_runs, plot_curves, plotted_metric

    cfg = small_config(tmp_path, "data.num_train=40", "data.num_test=8", "partition.num_clients=2",
                       "federation.clients_per_round=2", "federation.rounds=1", "runtime.engine=sequential")
    summary = run_sequential(cfg, tmp_path / "run")
    # 4 options: 1/4, whatever 8 drawn labels' majority; macro_f1 has no chance level
    assert summary["chance_metrics"] == {"accuracy": 0.25}
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["chance_metrics"] == {"accuracy": 0.25}
    runs = load_runs(tmp_path / "run")
    figures = plot_curves(runs, plotted_metric(runs, None, None))
    try:
        ax = figures[0].figure.axes[0]
        lines = metric_lines(ax)
        assert ax.get_xlabel() == "round" and "%" in ax.get_ylabel()
        assert lines["chance (25%)"][1] == [25.0, 25.0]
        assert lines[runs[0].label][1] == pytest.approx([100 * summary["zero_shot_metrics"]["accuracy"],
                                                         100 * summary["final_metrics"]["accuracy"]])
    finally:
        for figure in figures:
            plt.close(figure.figure)
