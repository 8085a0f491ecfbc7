from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fedsim.config import ConfigError, ExperimentConfig, to_yaml
from fedsim.validation import load_config, validate
from real_fixtures import make_dataset

QUICKSTART = Path(__file__).resolve().parent.parent / "experiments" / "quickstart.yaml"


def _error(overrides: list[str], path: Path | None = QUICKSTART) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_quickstart_loads_with_its_values():
    cfg = load_config(QUICKSTART)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name == "quickstart"
    assert cfg.partition.scheme == "dirichlet"
    assert cfg.partition.alpha == 1.0
    assert cfg.federation.rounds == 20
    assert cfg.federation.fraction == 0.25
    assert cfg.training.local_epochs == 2
    assert cfg.eval.every == 2
    # Keys the YAML leaves out keep the schema defaults.
    assert cfg.model.lora.r == 8
    assert cfg.runtime.engine == "ray"


def test_no_path_gives_validated_defaults():
    assert load_config() == ExperimentConfig()


def test_overrides_are_applied_and_typed():
    cfg = load_config(QUICKSTART, ["federation.rounds=3", "training.lr=0.01", "model.lora.r=4",
                                   "algorithm.server.lr=0.5", "model.lora.target_modules=[q_proj,v_proj]"])
    assert cfg.federation.rounds == 3 and isinstance(cfg.federation.rounds, int)
    assert cfg.training.lr == 0.01
    assert cfg.model.lora.r == 4
    assert cfg.algorithm.server.lr == 0.5
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    # Untouched keys stay as the file says.
    assert cfg.partition.scheme == "dirichlet"


def test_later_override_wins():
    assert load_config(QUICKSTART, ["seed=1", "seed=7"]).seed == 7


def test_name_defaults_to_yaml_stem(tmp_path):
    path = tmp_path / "my_study.yaml"
    path.write_text("federation:\n  rounds: 2\n")
    assert load_config(path).name == "my_study"
    # An explicit name (in the file or as an override) wins over the stem.
    assert load_config(path, ["name=other"]).name == "other"
    named = tmp_path / "x.yaml"
    named.write_text("name: given\n")
    assert load_config(named).name == "given"


def test_unknown_top_level_key_names_it_and_lists_valid_keys():
    msg = _error(["rnds=3"])
    assert "'rnds'" in msg
    for key in ("seed", "model", "federation", "training"):
        assert key in msg


def test_unknown_nested_key_names_it_and_lists_valid_keys():
    msg = _error(["model.rnak=4"])
    assert "'model.rnak'" in msg
    assert "valid keys here:" in msg
    valid = msg.split("valid keys here:")[1]
    for key in ("name", "load_in_4bit", "lora"):
        assert key in valid
    assert "rounds" not in valid  # only the keys of the section the typo is in


def test_unknown_key_close_to_a_valid_one_is_suggested():
    msg = _error(["model.lora.rr=3"])
    assert "'model.lora.rr'" in msg
    assert "did you mean 'model.lora.r'?" in msg


def test_unknown_key_in_yaml_file_names_key_and_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("federation:\n  rnds: 3\n")
    msg = _error([], path)
    assert "'federation.rnds'" in msg
    assert str(path) in msg
    assert "did you mean 'federation.rounds'?" in msg


def test_wrong_type_names_the_key():
    msg = _error(["federation.rounds=abc"])
    assert "'federation.rounds'" in msg
    assert "abc" in msg


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("partition.scheme=zipf", "partition.scheme", ["dirichlet", "iid", "quantity"]),
        ("algorithm.server.name=fedfoo", "algorithm.server.name", ["fedavg", "fedadam", "fedyogi", "scaffold"]),
        ("algorithm.client.name=foo", "algorithm.client.name", ["plain", "fedprox", "scaffold"]),
        ("runtime.engine=x", "runtime.engine", ["sequential"]),
        ("output.progress=maybe", "output.progress", ["auto", "always", "never"]),
        ("data.task=caption", "data.task", ["classification", "vqa"]),
        ("data.dataset=mnist", "data.dataset", ["synthetic"]),
        ("training.optimizer=adam", "training.optimizer", ["adamw", "sgd"]),
        ("algorithm.server.fedasync_rule=avg", "algorithm.server.fedasync_rule", ["mix", "delta"]),
    ],
)
def test_value_outside_choices_names_key_and_allowed_values(override, key, allowed):
    msg = _error([override])
    assert f"'{key}'" in msg
    bad = override.split("=", 1)[1]
    assert repr(bad) in msg
    for value in allowed:
        assert value in msg


@pytest.mark.parametrize(
    "override, key",
    [
        ("training.lr=0", "training.lr"),
        ("training.batch_size=-1", "training.batch_size"),
        ("federation.fraction=1.5", "federation.fraction"),
        ("federation.rounds=-1", "federation.rounds"),
        ("model.lora.dropout=-0.1", "model.lora.dropout"),
        ("algorithm.server.lr=0", "algorithm.server.lr"),
        ("federation.clients_per_round=21", "federation.clients_per_round"),  # quickstart has 20 clients
        ("partition.num_clients=2001", "partition.num_clients"),  # more clients than training samples
    ],
)
def test_range_errors_name_the_key(override, key):
    msg = _error([override])
    assert f"'{key}'" in msg


def test_clients_per_round_bound_mentions_num_clients():
    msg = _error(["federation.clients_per_round=21"])
    assert "partition.num_clients (20)" in msg
    # The bound itself is allowed.
    assert load_config(QUICKSTART, ["federation.clients_per_round=20"]).clients_per_round() == 20


def test_personalized_clients_and_state_cache_are_checked():
    assert "partition.num_clients (20)" in _error(["eval.personalized_clients=21"])  # quickstart: 20 clients
    assert "'eval.personalized_clients'" in _error(["eval.personalized_clients=-1"])
    assert "'eval.personalized_clients'" in _error(["eval.personalized_clients=2.5"])  # an integer
    assert "'runtime.state_cache_mb'" in _error(["runtime.state_cache_mb=-1"])
    cfg = load_config(QUICKSTART, ["eval.personalized_clients=20", "runtime.state_cache_mb=0"])
    assert cfg.eval.personalized_clients == 20 and cfg.runtime.state_cache_mb == 0


def test_boundary_values_are_accepted():
    cfg = load_config(QUICKSTART, ["federation.fraction=1.0", "federation.rounds=0", "model.lora.dropout=0"])
    assert cfg.federation.fraction == 1.0


def test_no_local_work_is_rejected():
    msg = _error(["training.local_epochs=0"])
    assert "training.local_epochs" in msg
    # Steps instead of epochs is fine.
    assert load_config(QUICKSTART, ["training.local_epochs=0", "training.local_steps=5"]).training.local_steps == 5


@pytest.mark.parametrize("side", ["client", "server"])
def test_scaffold_on_one_side_only_is_rejected(side):
    msg = _error([f"algorithm.{side}.name=scaffold"])
    assert "scaffold" in msg
    assert "algorithm.client.name" in msg and "algorithm.server.name" in msg


SCAFFOLD = ["algorithm.client.name=scaffold", "algorithm.server.name=scaffold"]


def test_scaffold_on_both_sides_with_sgd_is_accepted():
    cfg = load_config(QUICKSTART, SCAFFOLD + ["training.optimizer=sgd"])
    assert cfg.algorithm.client.name == cfg.algorithm.server.name == "scaffold"


def test_scaffold_with_adamw_names_the_optimizer():
    message = _error(SCAFFOLD)  # adamw is the default optimizer
    assert "'training.optimizer'" in message and "'adamw'" in message and "'sgd'" in message


def test_scaffold_with_momentum_names_the_momentum():
    message = _error(SCAFFOLD + ["training.optimizer=sgd", "training.momentum=0.9"])
    assert "'training.momentum'" in message and "SCAFFOLD" in message


def test_momentum_is_sgd_only_and_below_one():
    cfg = load_config(QUICKSTART, ["training.optimizer=sgd", "training.momentum=0.9"])
    assert (cfg.training.optimizer, cfg.training.momentum) == ("sgd", 0.9)
    message = _error(["training.momentum=0.9"])  # with the default adamw
    assert "'training.momentum'" in message and "training.optimizer=sgd" in message
    for bad in ("1.0", "-0.1"):
        message = _error(["training.optimizer=sgd", f"training.momentum={bad}"])
        assert "'training.momentum'" in message and "[0, 1)" in message


@pytest.mark.parametrize("server", ["fedadagrad", "fedyogi", "fedadam"])
@pytest.mark.parametrize("tau", ["0", "inf"])
def test_adaptive_servers_need_a_positive_tau(server, tau):
    message = _error([f"algorithm.server.name={server}", f"algorithm.server.tau={tau}"])
    assert "'algorithm.server.tau'" in message and server in message


def test_tau_is_free_for_servers_that_do_not_use_it():
    assert load_config(QUICKSTART, ["algorithm.server.tau=0"]).algorithm.server.tau == 0  # fedavg


def test_empty_lora_targets_rejected():
    msg = _error(["model.lora.target_regex=null", "model.lora.target_modules=[]"])
    assert "model.lora.target_modules" in msg


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    msg = _error([], missing)
    assert "not found" in msg and str(missing) in msg


def test_override_without_equals_sign():
    msg = _error(["federation.rounds"])
    assert "'federation.rounds'" in msg
    assert "key=value" in msg


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_validate_checks_a_dataclass_built_in_code():
    cfg = ExperimentConfig()
    validate(cfg)
    cfg.partition.scheme = "zipf"
    with pytest.raises(ConfigError, match="partition.scheme"):
        validate(cfg)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["federation.clients_per_round=7"], 7),  # an explicit count wins over the fraction
        (["federation.clients_per_round=0", "federation.fraction=0.25"], 5),  # round(0.25 * 20)
        (["federation.fraction=0.33"], 7),  # round(6.6)
        (["federation.fraction=0.01"], 1),  # never fewer than one client
        (["federation.fraction=0"], 1),
        (["federation.fraction=1.0"], 20),
    ],
)
def test_clients_per_round(overrides, expected):
    assert load_config(QUICKSTART, overrides).clients_per_round() == expected


def test_to_yaml_round_trip(tmp_path):
    cfg = load_config(QUICKSTART, ["training.lr_schedule=cosine", "model.lora.target_modules=[q_proj,v_proj]",
                                   "algorithm.server.lr=0.1", "output.dir=/tmp/somewhere", "name=rt"])
    text = to_yaml(cfg)
    # Back through omegaconf directly...
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), OmegaConf.create(text)))
    assert back == cfg
    # ...and through load_config, as a run directory's config.yaml would be reloaded.
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_config(path) == cfg
    # The regex with backslashes survives YAML quoting.
    assert load_config(path).model.lora.target_regex == cfg.model.lora.target_regex


def test_a_section_set_to_a_scalar_names_the_section_and_its_keys():
    message = _error(["model=3"])
    assert "'model'" in message and "section" in message and "load_in_4bit" in message


@pytest.mark.parametrize("text", ["- a\n- b\n", "3\n"])
def test_a_yaml_file_that_is_not_a_mapping_is_a_config_error(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_type_error_message_is_one_line():
    assert "\n" not in _error(["federation.rounds=abc"])


def test_measured_compute_time_is_refused_for_asynchronous_strategies():
    message = _error(["algorithm.server.name=fedbuff", "scheduler.compute_time=measured"])
    assert "scheduler.compute_time" in message and "modeled" in message


def test_scenario_steps_and_parameters_are_checked_at_load():
    message = _error(["data.scenarios.missin.beta=0.3"])
    assert "data.scenarios" in message and "'missin'" in message and "missing" in message
    message = _error(["data.scenarios.cross.p=0.3"])
    assert "data.scenarios.cross" in message and "image_only" in message and "'p'" in message
    assert "data.scenarios.cross.image_only" in _error(["partition.num_clients=10", "data.scenarios.cross.image_only=11"])
    assert "data.test_scenarios.missing.beta" in _error(["data.test_scenarios.missing.beta=2"])
    assert "data.scenarios.domain.styles" in _error(["data.scenarios.domain.styles=[sepia]"])
    assert "data.scenarios.modality_task.image_clients" in _error(
        ["partition.num_clients=10", "data.scenarios.modality_task.image_clients=10"])


def test_composed_scenarios_load_in_order():
    cfg = load_config(None, ["data.scenarios.missing.beta=0.3", "data.scenarios.domain.styles=[noise,blur]",
                             "partition.scheme=dirichlet", "partition.alpha=0.5"])
    assert list(cfg.data.scenarios) == ["missing", "domain"]
    assert cfg.data.scenarios["domain"] == {"styles": ["noise", "blur"]}


def test_data_source_errors_name_the_key():
    assert "data.path" in _error(["data.path=/somewhere"])  # synthetic data has no path
    assert "data.revision" in _error(["data.revision=v1"])  # nor a hub revision
    assert "data.num_train" in _error(["data.num_train=0"])
    assert "data.prompt" in _error(["data.prompt=augmented"])
    assert "algorithm.client.window" in _error(["algorithm.client.window=0.5"])


def test_yaml_layers_merge_in_order_and_name_the_experiment(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("federation:\n  rounds: 7\ndata:\n  scenarios:\n    missing: {beta: 0.3}\n")
    method = tmp_path / "fedmllm.yaml"
    method.write_text("federation:\n  rounds: 9\ndata:\n  prompt: agnostic\n  scenarios:\n    domain: {}\n")
    cfg = load_config([base, method], ["seed=3"])
    assert cfg.federation.rounds == 9 and cfg.data.prompt == "agnostic" and cfg.seed == 3
    assert cfg.data.scenarios == {"missing": {"beta": 0.3}, "domain": {}}
    assert cfg.name == "base-fedmllm"


def test_cli_takes_yaml_layers_before_overrides(tmp_path, capsys):
    from fedsim.cli import main

    assert main(["partition", str(QUICKSTART), "federation.rounds=2", str(QUICKSTART)]) == 2
    assert "before key=value overrides" in capsys.readouterr().err


@pytest.mark.parametrize("yaml_text, key, value", [
    ("model:\n  name: ${oc.env:HOME}\n", "model.name", "${oc.env:HOME}"),  # would read the environment
    ("name: a\nmodel:\n  name: ${name}\n", "model.name", "${name}"),  # would copy another key
    ("model:\n  lora:\n    target_modules: [q_proj, 'x${']\n", "model.lora.target_modules", "x${"),
    ("sweep:\n  grid:\n    training.lr: [0.1, '${oc.env:LR}']\n", "sweep.grid.training.lr", "${oc.env:LR}"),
])
def test_an_interpolation_in_a_yaml_file_is_refused_naming_the_key(tmp_path, yaml_text, key, value):
    path = tmp_path / "study.yaml"
    path.write_text(yaml_text)
    msg = _error([], path)
    assert msg.startswith(f"config key '{key}' has invalid value {value!r}: expected") and str(path) in msg


@pytest.mark.parametrize("override", ["model.name=${oc.env:HOME}", "seed=${federation.rounds}",
                                      "model.lora.target_modules=[q_proj,${x}]", "name=literal${"])
def test_an_interpolation_in_an_override_is_refused_naming_the_key(override):
    key, value = override.split("=", 1)
    assert _error([override]).startswith(f"config key '{key}' has invalid value {value!r}: expected")


def test_an_interpolation_in_a_file_name_is_refused(tmp_path):
    path = tmp_path / "${oc.env:HOME}.yaml"
    path.write_text("seed: 1\n")
    assert _error([], path).startswith("config key 'name' has invalid value '${oc.env:HOME}'")


def test_config_module_imports_no_registry():
    """fedsim.config is pure data: the registries import it, so it must not import them (not even lazily)."""
    import ast

    import fedsim.config

    tree = ast.parse(Path(fedsim.config.__file__).read_text())
    imported = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert not [name for name in imported if name and name.startswith("fedsim")]


# -- data sources of the scenarios --------------------------------------------------------------------------

MODALITY_TASK = ["partition.num_clients=10", "data.task=vqa", "data.scenarios.modality_task.image_clients=5"]
TEXT = "data.scenarios.modality_task."


@pytest.fixture
def real_data(tmp_path) -> Path:
    """Fixture folders of a few real datasets under tmp_path/<name>, and an empty folder tmp_path/empty."""
    for name in ("medalpaca", "vqa_rad", "hateful_memes"):
        make_dataset(name, tmp_path / name)
    (tmp_path / "empty").mkdir()
    return tmp_path


def test_modality_task_with_a_real_text_source_loads(real_data):
    cfg = load_config(QUICKSTART, MODALITY_TASK + [f"{TEXT}text_dataset=medalpaca",
                                                   f"{TEXT}text_path={real_data / 'medalpaca'}"])
    assert cfg.data.scenarios["modality_task"]["text_dataset"] == "medalpaca"
    load_config(QUICKSTART, MODALITY_TASK + [f"{TEXT}text_dataset=medalpaca", f"{TEXT}text_hub=medalpaca/cards"])
    # data.test_seed fixes the synthetic test split; the real text source keeps its own, it is not refused,
    # while a real main dataset with it is
    assert "'data.test_seed' is set" in _error(["data.dataset=hateful_memes", "data.test_seed=25",
                                                f"data.path={real_data / 'hateful_memes'}"])
    load_config(QUICKSTART, MODALITY_TASK + ["data.test_seed=25", f"{TEXT}text_dataset=medalpaca",
                                             f"{TEXT}text_path={real_data / 'medalpaca'}"])


@pytest.mark.parametrize("overrides, key, expected", [
    (["text_dataset=mnist"], "text_dataset", "medalpaca, synthetic"),  # not a dataset
    (["text_dataset=vqa_rad", "text_path={root}/vqa_rad"], "text_dataset", "carry images"),  # not text-only
    (["text_task=caption"], "text_task", "'textqa'"),  # not a synthetic task
    (["text_task=classification"], "text_task", "'textqa'"),  # a synthetic task with images
    (["text_path={root}/medalpaca"], "text_path", "'synthetic'"),  # the synthetic source has no path
    (["text_hub=someone/cards"], "text_hub", "'synthetic'"),
    (["text_dataset=medalpaca"], "text_path", "text_hub"),  # a real source needs one of them
    (["text_dataset=medalpaca", "text_path={root}/nowhere"], "text_path", "does not exist"),
    (["text_dataset=medalpaca", "text_path={root}/empty"], "text_path", "medical_meadow_wikidoc_medical_flashcards"),
], ids=["unknown-dataset", "dataset-with-images", "unknown-task", "task-with-images", "synthetic-path",
        "synthetic-hub", "real-without-source", "missing-folder", "incomplete-folder"])
def test_modality_task_text_source_is_checked_at_load(real_data, overrides, key, expected):
    message = _error(MODALITY_TASK + [TEXT + o.format(root=real_data) for o in overrides])
    assert f"data.scenarios.modality_task.{key}" in message and expected in message


def test_modality_task_synthetic_text_source_needs_rows(real_data):
    """gpu.yaml's data.num_train 0 (all rows of a real dataset) gave the synthetic text clients 0 rows."""
    real = ["data.dataset=hateful_memes", f"data.path={real_data / 'hateful_memes'}"]
    for rows in ("num_train", "num_test"):
        message = _error(MODALITY_TASK + real + [f"data.{rows}=0"])
        assert f"'data.{rows}'" in message and "data.scenarios.modality_task" in message
    real_text = [f"{TEXT}text_dataset=medalpaca", f"{TEXT}text_path={real_data / 'medalpaca'}"]
    load_config(QUICKSTART, MODALITY_TASK + real + real_text + ["data.num_train=0", "data.num_test=0"])


def test_modality_task_belongs_to_the_training_split_only():
    message = _error(["data.test_scenarios.modality_task.image_clients=1"])
    assert "data.test_scenarios.modality_task" in message and "data.scenarios" in message


@pytest.mark.parametrize("where", ["scenarios", "test_scenarios"])
def test_multilingual_needs_synthetic_rows(real_data, where):
    step = f"data.{where}.multilingual.languages=[en,de]"
    assert load_config(QUICKSTART, [step]).data.dataset == "synthetic"
    message = _error(["data.dataset=hateful_memes", f"data.path={real_data / 'hateful_memes'}", step])
    assert f"'data.{where}.multilingual'" in message and "'hateful_memes'" in message and "synthetic" in message
    # ...and the text-only clients' rows too
    message = _error(MODALITY_TASK + [f"{TEXT}text_dataset=medalpaca", f"{TEXT}text_path={real_data / 'medalpaca'}",
                                      step])
    assert f"'data.{where}.multilingual'" in message and "'medalpaca'" in message
