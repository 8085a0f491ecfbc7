"""The ``fedsim`` command line, as a user calls it."""

import configparser
import gzip
import importlib.metadata
import json
import os

import jsonschema
import pytest
import yaml

from fedsim import __version__
from fedsim.cli import _resume_config, main
from fedsim.config import to_yaml
from fedsim.runlock import run_lock
from fedsim.validation import load_config

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
    # no YAML: the embedded quickstart, made smaller
    code = main(["run", "runtime.engine=sequential", "federation.rounds=1", "data.num_train=120",
                 "data.num_test=20", "partition.num_clients=4", "federation.clients_per_round=2",
                 "training.local_epochs=1", "output.progress=never", f"output.dir={run}"])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["run_dir"] == str(run) and printed["rounds"] == 1
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "adapter/adapter_model.safetensors"):
        assert (run / name).exists(), name
    assert json.loads((run / "summary.json").read_text())["adapter_sha256"] == printed["adapter_sha256"]
    assert load_config(run / "config.yaml").name == "quickstart"


def test_version_help_licence_and_citation_agree_with_the_package(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"fedsim {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for command in ("run", "partition", "sweep", "report"):  # one line each, with what it does
        assert sum(line.split()[:1] == [command] and len(line.split()) > 3 for line in lines) == 1, command

    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    schema = json.loads(gzip.decompress((REPO / "tests" / "schemas" / "cff-1.2.0.schema.json.gz").read_bytes()))
    jsonschema.Draft7Validator(schema).validate(citation)  # the Citation File Format's own schema
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert citation["version"] == importlib.metadata.version("fedsim") == __version__
    assert citation["license"] == setup["metadata"]["license"] == "Apache-2.0"
    assert (REPO / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]


def test_partition_prints_each_client_and_writes_its_figure(tmp_path, capsys):
    out = tmp_path / "fig" / "partition.png"
    code = main(["partition", QUICKSTART, "partition.num_clients=10", "data.num_train=3000",
                 "data.scenarios.cross.image_only=3", f"--out={out}"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, rows, total = lines[0].split("\t"), [l.split("\t") for l in lines[1:11]], lines[11].split("\t")
    assert header[:5] == ["client", "samples", "both", "image only", "text only"]
    assert [int(r[0]) for r in rows] == list(range(10))
    # cross 3-7: exactly 3 image-only clients, 7 text-only, no client with both
    image_only = [r for r in rows if int(r[3]) == int(r[1])]
    text_only = [r for r in rows if int(r[4]) == int(r[1])]
    assert len(image_only) == 3 and len(text_only) == 7 and all(int(r[2]) == 0 for r in rows)
    assert total[0] == "total" and int(total[1]) == 3000
    assert sum(int(h) for r in rows for h in r[5].split()) == 3000  # label histograms cover every sample
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and lines[-1] == f"figure: {out}"


def test_partition_of_a_missing_dataset_path_names_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-memes"
    assert main(["partition", QUICKSTART, "data.dataset=hateful_memes", f"data.path={missing}"]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "train.jsonl" in err  # the path and the expected layout


def _saved_run(tmp_path, *overrides: str):
    """A run directory as an interrupted run leaves it: its config.yaml (no checkpoint: nothing gets that far)."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(QUICKSTART, [f"output.dir={run}", *overrides])
    (run / "config.yaml").write_text(to_yaml(cfg))
    return run


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything gets as far as loading a model or starting an engine."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded or an engine started")

    monkeypatch.setattr("fedsim.models.loading.load_backbone", refuse)
    monkeypatch.setattr("fedsim.engine.ENGINES", {"ray": refuse, "sequential": refuse})


def test_resume_refuses_a_saved_config_with_remote_code_unless_the_command_line_confirms(tmp_path, capsys,
                                                                                       no_model_loading):
    run = _saved_run(tmp_path, "model.trust_remote_code=true")
    assert main(["run", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "model.trust_remote_code=true" in err and "someone else" in err and "code" in err
    assert f"fedsim run --resume {run} model.trust_remote_code=true" in err  # how to confirm
    assert main(["run", "--resume", str(run), "model.trust_remote_code=false"]) == 2
    assert "someone else" in capsys.readouterr().err
    # Confirmed: it goes on to the next check (no checkpoint here), still before any model loading.
    assert main(["run", "--resume", str(run), "model.trust_remote_code=true"]) == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint" in err and "someone else" not in err


def test_resume_takes_no_other_override(tmp_path, capsys, no_model_loading):
    run = _saved_run(tmp_path)
    for extra in (["federation.rounds=3"], [QUICKSTART], ["model.trust_remote_code=true", "seed=1"]):
        assert main(["run", "--resume", str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert "takes no config files or overrides" in err and "model.trust_remote_code=true" in err
    assert main(["run", "--resume", str(run)]) == 2  # without remote code: straight to the checkpoint check
    assert "no complete checkpoint" in capsys.readouterr().err


def test_a_run_directory_in_use_is_refused_naming_its_holder(tmp_path, capsys, no_model_loading):
    run = _saved_run(tmp_path)
    with run_lock(run):  # a run alive in it
        for argv in (["run", "--resume", str(run)], ["run", QUICKSTART, f"output.dir={run}"]):
            assert main(argv) == 2
            assert f"fedsim: error: {run} is in use by process {os.getpid()} (started " in capsys.readouterr().err


def test_resume_drops_a_saved_cluster_address_unless_the_command_line_gives_it(tmp_path, caplog):
    elsewhere = "ray://someone-else:10001"
    run = _saved_run(tmp_path, f"runtime.address={elsewhere}")
    assert _resume_config(run, []).runtime.address is None
    assert f"runtime.address={elsewhere}: ignored" in caplog.text
    assert f"fedsim run --resume {run} runtime.address={elsewhere}" in caplog.text  # how to keep it
    caplog.clear()
    assert _resume_config(run, [f"runtime.address={elsewhere}"]).runtime.address == elsewhere
    assert "ignored" not in caplog.text
    # confirming remote code does not confirm the address
    (tmp_path / "trusted").mkdir()
    run = _saved_run(tmp_path / "trusted", "model.trust_remote_code=true", f"runtime.address={elsewhere}")
    trusted = _resume_config(run, ["model.trust_remote_code=true"])
    assert trusted.model.trust_remote_code and trusted.runtime.address is None


def test_resume_refuses_a_saved_config_with_an_interpolation(tmp_path, capsys, no_model_loading):
    run = _saved_run(tmp_path)
    saved = run / "config.yaml"
    saved.write_text(saved.read_text().replace("name: tiny", "name: ${oc.env:HOME}"))
    assert main(["run", "--resume", str(run)]) == 2
    assert f"config key 'model.name' has invalid value '${{oc.env:HOME}}'" in capsys.readouterr().err
