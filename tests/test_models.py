import json
import shutil

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedsim.config import ConfigError, EvalConfig, ModelConfig
from fedsim.data.collator import Collator
from fedsim.data.synthetic import PRETRAIN_KINDS, generate
from fedsim.evaluation import Evaluator
from fedsim.models.adapter import adapter_sha256, get_weights, inference, save_adapter, set_weights
from fedsim.models.loading import load_backbone, load_model, resolve_model_path
from fedsim.models.tiny import CHECKSUMS, SPEC, file_checksums, pretrain_scores
from fedsim.validation import load_config

from conftest import adamw_steps


@pytest.fixture(scope="module")
def loaded(tiny_path):
    return load_model(ModelConfig(name=str(tiny_path)), seed=0)


def test_backbone_linears_are_4bit_and_only_lora_trains(loaded):
    model = loaded.model
    quantized = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in quantized)
    assert any("vision_tower" in n for n in quantized)
    for name, module in model.named_modules():
        if name.endswith(("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")):
            assert isinstance(module, bnb.nn.Linear4bit), name
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "language_model" in n for n in trainable)
    assert loaded.num_layers == 4
    assert sorted({loaded.layer_of[n] for n in trainable}) == [0, 1, 2, 3]


def test_weights_round_trip_and_digest(loaded):
    weights = get_weights(loaded.model)
    changed = {k: v + 1.0 for k, v in weights.items()}
    set_weights(loaded.model, changed)
    assert adapter_sha256(get_weights(loaded.model)) == adapter_sha256(changed) != adapter_sha256(weights)
    set_weights(loaded.model, weights)
    with pytest.raises(KeyError, match="missing"):
        set_weights(loaded.model, dict(list(weights.items())[1:]))


def test_eval_then_train_then_eval_on_one_model(loaded):
    """bitsandbytes repacks 4-bit weights after an eval-mode forward on some CPUs; fedsim must avoid it."""
    data = generate("classification", 16, "train", 0)
    evaluator = Evaluator(loaded.processor, data, EvalConfig(batch_size=8), 128, loaded.device, seed=0)
    before = evaluator.evaluate(loaded.model)
    initial = get_weights(loaded.model)
    batch = Collator(loaded.processor, 128, train=True)([data[i] for i in range(8)])
    losses = adamw_steps(loaded.model, batch, steps=8, lr=3e-3)  # 3 steps at 1e-2 can overshoot on one batch
    assert losses[-1] < losses[0]
    after = evaluator.evaluate(loaded.model)
    assert 0.0 <= after["accuracy"] <= 1.0 and 0.0 <= before["accuracy"] <= 1.0
    with inference(loaded.model):  # evaluation leaves the model trainable: no module left in eval mode
        pass
    assert all(m.training for m in loaded.model.modules())
    set_weights(loaded.model, initial)


def test_saved_adapter_loads_with_peft(loaded, tmp_path, tiny_path):
    weights = {k: v + 0.01 for k, v in get_weights(loaded.model).items()}
    save_adapter(loaded.model, weights, tmp_path / "adapter")
    base, _, _ = load_backbone(ModelConfig(name=str(tiny_path)))
    restored = PeftModel.from_pretrained(base, tmp_path / "adapter")
    restored_weights = {n: p.detach() for n, p in restored.named_parameters() if "lora_" in n}
    assert adapter_sha256(restored_weights) == adapter_sha256(weights)


def test_local_model_path_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_path(ModelConfig(name=str(tmp_path)))


def test_pickled_weights_load_only_when_allowed(tiny_path, tmp_path):
    """The tiny preset with its weights as pytorch_model.bin (what save_pretrained(safe_serialization=False)
    wrote before transformers 5) is refused by default, naming the key, and loads the same tensors with it."""
    folder = shutil.copytree(tiny_path, tmp_path / "pickled", ignore=shutil.ignore_patterns("model.safetensors"))
    tensors = load_file(tiny_path / "model.safetensors")
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"pickled weights only \(pytorch_model.bin\).*model.allow_pickle_weights"):
        load_backbone(ModelConfig(name=str(folder), load_in_4bit=False))
    pickled, _, _ = load_backbone(ModelConfig(name=str(folder), load_in_4bit=False, allow_pickle_weights=True))
    safe, _, _ = load_backbone(ModelConfig(name=str(tiny_path), load_in_4bit=False))
    expected = safe.state_dict()
    assert pickled.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in pickled.state_dict().items())


@pytest.mark.parametrize("name, revision, refused", [
    ("Org/remote-vlm", None, True),
    ("Org/remote-vlm", "main", True),       # a branch moves
    ("Org/remote-vlm", "v1.0", True),       # so can a tag
    ("Org/remote-vlm", "0123abcd", True),   # a short hash is not one commit forever
    ("Org/remote-vlm", "0123456789abcdef0123456789abcdef01234567", False),
    ("tiny", None, False),                  # a local folder: nothing is fetched, nothing to pin
])
def test_remote_code_from_the_hub_needs_a_pinned_commit(name, revision, refused):
    overrides = [f"model.name={name}", "model.trust_remote_code=true"] + ([f"model.revision={revision}"] * bool(revision))
    if refused:
        with pytest.raises(ConfigError, match=r"config key 'model.revision'.*40-hex commit.*local model folder"):
            load_config(None, overrides)
    else:
        assert load_config(None, overrides).model.trust_remote_code


def test_the_shipped_tiny_preset_matches_its_recorded_checksums(tiny_path):
    """The preset ships as files, not as a build: any change to them must come from a rebuild
    (`python -m fedsim.models.tiny`), which records new checksums and its SPEC next to them."""
    recorded = json.loads((tiny_path / CHECKSUMS).read_text())
    assert recorded == file_checksums(tiny_path)
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "fedsim_tiny.json"} <= set(recorded)
    assert json.loads((tiny_path / "fedsim_tiny.json").read_text())["spec"] == SPEC
    assert resolve_model_path(ModelConfig(name="tiny")) == str(tiny_path)


# A bar for every question kind pre-training records, one per cue the downstream tasks use, each at 0.9 (the
# preset's bar, issue 25): measured on the shipped preset in 4-bit on these 512 questions, about 85 per kind, and
# in brackets seeds 8 and 9. Chance beside it.
PRESET_MIN_ACCURACY = {
    "colour": 0.9,  # measured 0.99 (0.99, 1.00); chance 1/6
    "temperature": 0.9,  # measured 1.00 (1.00, 1.00); chance 1/2
    "size": 0.9,  # measured 1.00 (0.99, 0.99); chance 1/2
    "note_word": 0.9,  # measured 1.00 (1.00, 1.00); chance 1/8
    "sturdiness": 0.9,  # measured 1.00 (1.00, 1.00); chance 1/2
    "weather": 0.9,  # measured 1.00 (1.00, 1.00); chance 1/2
}


def test_the_shipped_tiny_preset_answers_the_questions_downstream_tasks_rely_on(tiny_path):
    """The backbone must have learned to see and to read, not only the easy kinds: a preset that sat on a
    plateau (copying the note's word right, every image question at chance) once shipped with a held-out
    loss that looked converged. Fresh questions (a stream the build never drew), scored on the 4-bit backbone
    as every client first meets it."""
    backbone, processor, _ = load_backbone(ModelConfig(name=str(tiny_path)))
    samples = generate("pretrain", 512, "test", seed=7)
    batches = [[samples[i] for i in range(start, start + 64)] for start in range(0, len(samples), 64)]
    with inference(backbone):
        _, accuracy = pretrain_scores(backbone, Collator(processor, max_length=256, train=True), batches)
    recorded = json.loads((tiny_path / "fedsim_tiny.json").read_text())["held_out"][-1]["accuracy"]
    assert set(accuracy) == set(recorded) == set(PRETRAIN_KINDS) == set(PRESET_MIN_ACCURACY)  # no kind unbarred
    assert min(recorded.values()) >= 0.9, recorded  # the build's own held-out record
    assert {kind: value >= PRESET_MIN_ACCURACY[kind] for kind, value in accuracy.items()} == \
        dict.fromkeys(accuracy, True), accuracy
