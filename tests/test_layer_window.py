"""Which trainable parameters count as LLM decoder layers (``LAYER_PATTERN``), and ``check_layer_window``, which
refuses ``fedmllm_reg`` when its regularized layers s..L-1-s hold no trainable parameter.

Tiny models of each family check the pattern against their module trees in test_model_families.py; families
that need remote code (MiniCPM-V) are checked here on their parameter names.
"""

import pytest

from fedsim.config import ClientAlgoConfig, ConfigError, LoraConfig, ModelConfig
from fedsim.models.loading import LAYER_PATTERN, check_layer_window, load_model

LORA = ".lora_A.default.weight"
NAMES = {
    # MiniCPM-V 2.x (remote code): llm = Qwen2ForCausalLM / LlamaForCausalLM, vpm = SigLIP, resampler.
    "base_model.model.llm.model.layers.0.self_attn.q_proj" + LORA: 0,
    "base_model.model.llm.model.layers.27.mlp.down_proj" + LORA: 27,
    "base_model.model.vpm.encoder.layers.3.self_attn.q_proj" + LORA: None,
    "base_model.model.resampler.kv_proj" + LORA: None,
    "base_model.model.resampler.attn.out_proj" + LORA: None,
    "base_model.model.llm.lm_head.weight": None,
    "base_model.model.llm.model.embed_tokens.weight": None,
    # transformers 5.x names of the families built in test_model_families.py, vision towers included.
    "base_model.model.model.language_model.layers.5.self_attn.q_proj" + LORA: 5,
    "base_model.model.model.language_model.layers.3.cross_attn.q_proj" + LORA: 3,  # Mllama cross-attention
    "base_model.model.model.text_model.layers.11.self_attn.v_proj" + LORA: 11,  # Idefics3 / SmolVLM
    "base_model.model.model.vision_tower.encoder.layers.1.self_attn.q_proj" + LORA: None,  # LLaVA, Gemma3
    "base_model.model.model.vision_model.encoder.layers.1.self_attn.q_proj" + LORA: None,  # Idefics3
    "base_model.model.model.vision_model.transformer.layers.1.self_attn.q_proj" + LORA: None,  # Mllama
    "base_model.model.model.vision_model.global_transformer.layers.0.mlp.fc1" + LORA: None,  # Mllama
    "base_model.model.model.visual.blocks.1.attn.qkv" + LORA: None,  # Qwen2-VL
    "base_model.model.model.multi_modal_projector.linear_1" + LORA: None,
    # LLaVA under transformers 4.x
    "base_model.model.language_model.model.layers.2.self_attn.q_proj" + LORA: 2,
}


@pytest.mark.parametrize("name", sorted(NAMES))
def test_layer_pattern_finds_the_language_model_decoder_layer(name):
    match = LAYER_PATTERN.search(name)
    assert (int(match.group(1)) if match else None) == NAMES[name]


@pytest.fixture(scope="module")
def load_tiny(tiny_path):
    """The LLaVA preset with the given LoRA settings."""
    return lambda **lora: load_model(ModelConfig(name=str(tiny_path), lora=LoraConfig(**lora)), seed=0)


FEDMLLM = ClientAlgoConfig(name="fedmllm_reg", window=0.25)  # tiny preset: L=4, s=1, layers 1..2 regularized


@pytest.mark.parametrize("lora", [
    dict(target_modules=["multi_modal_projector.linear_1"]),
    dict(target_regex=r".*vision_tower.*\.(q_proj|v_proj)$"),
    dict(target_regex=r".*language_model\.layers\.(0|3)\.self_attn\.(q_proj|v_proj)$"),  # the free edge layers
], ids=["projector", "vision_tower", "edge_layers"])
def test_fedmllm_reg_refuses_targets_outside_its_window(load_tiny, lora):
    loaded = load_tiny(**lora)
    with pytest.raises(ConfigError) as err:
        check_layer_window(loaded, FEDMLLM)
    message = str(err.value)
    assert "model.lora" in message and LAYER_PATTERN.pattern in message and "1..2" in message
    assert sorted(loaded.layer_of)[0] in message  # says what it found
    # Other client strategies have no window: the same targets are fine for them.
    check_layer_window(loaded, ClientAlgoConfig(name="fedprox"))


def test_fedmllm_reg_accepts_the_default_targets(load_tiny):
    loaded = load_tiny()
    check_layer_window(loaded, FEDMLLM)
    check_layer_window(loaded, ClientAlgoConfig(name="fedmllm_reg"))  # default window 1/7: s=1 of L=4
    with pytest.raises(ConfigError, match="algorithm.client.window"):
        check_layer_window(loaded, ClientAlgoConfig(name="fedmllm_reg", window=0.45))  # s=2 leaves no layer
