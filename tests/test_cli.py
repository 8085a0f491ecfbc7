"""The ``fedsim`` command line, as a user calls it."""

import json

import pytest

from fedsim.cli import main

from conftest import REPO

QUICKSTART = str(REPO / "experiments" / "quickstart.yaml")


def test_a_bad_key_fails_before_any_work_with_exit_code_2(tmp_path, capsys):
    assert main(["run", QUICKSTART, "federation.rondus=3", f"output.dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert "federation.rondus" in err and "federation.rounds" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_writes_the_run_directory_and_prints_the_summary(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["run", QUICKSTART, "runtime.engine=sequential", "federation.rounds=1", "data.num_train=120",
                 "data.num_test=20", "partition.num_clients=4", "federation.clients_per_round=2",
                 "training.local_epochs=1", "output.progress=never", f"output.dir={run}"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["run_dir"] == str(run) and printed["rounds"] == 1
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors"):
        assert (run / name).exists(), name
    assert json.loads((run / "summary.json").read_text())["adapter_sha256"] == printed["adapter_sha256"]
