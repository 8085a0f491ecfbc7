"""The loading path beyond the LLaVA preset: tiny random Idefics3 (SmolVLM), Qwen2-VL, Gemma3 and Mllama models,
built offline.

Each model is saved to a folder with its processor and goes through ``load_model`` exactly as a hub checkpoint
would. Idefics3 and Qwen2-VL go all the way: 4-bit language model, LoRA on its attention projections only,
mixed-modality batches, training and evaluation. Every family, the LLaVA preset included, checks which
trainable parameters FedMLLM's regularization pulls to the global model.
"""

import logging
import shutil

import bitsandbytes as bnb
import datasets
import numpy as np
import pytest
from PIL import ImageOps
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.utils import is_torchvision_available

from fedsim.algorithms import LocalContext, build_client_strategy
from fedsim.config import ClientAlgoConfig, EvalConfig, LoraConfig, ModelConfig, TrainingConfig
from fedsim.data.collator import Collator, user_text
from fedsim.data.schema import features
from fedsim.data.synthetic import generate
from fedsim.evaluation import Evaluator
from fedsim.metrics import normalize_answer
from fedsim.models.adapter import inference
from fedsim.models.loading import (LAYER_PATTERN, LoadedModel, check_layer_window, load_model, pretrained_kwargs,
                                   without_video_processor)

from conftest import adamw_steps
from test_multiclient import STRATEGIES, one_by_one_and_together, relative_difference, uneven_clients

IMAGE_SIZE = 32
TEXT_LAYERS = 3  # enough for FedMLLM's window to leave layers free at both ends
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=TEXT_LAYERS, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)

# SmolVLM-style template: "<|im_start|>User:<image> text<end_of_utterance>\nAssistant: answer<end_of_utterance>\n"
IDEFICS3_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] | capitalize }}:"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %} {{ item['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>Assistant:{% endif %}"
)
IDEFICS3_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                   "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]

QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_TOKENS = ["<|endoftext|>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>"]

GEMMA3_TOKENS = ["<pad>", "<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                 "<image_soft_token>", "<end_of_image>"]
MLLAMA_TOKENS = ["<pad>", "<unk>", "<|begin_of_text|>", "<|eot_id|>", "<|image|>", "<|python_tag|>"]
MLLAMA_LAYERS = 4  # self, cross, self, self: FedMLLM's window 1..2 holds a cross- and a self-attention layer


def _tokenizer(special_tokens: list[str], **roles: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on synthetic prompts (deterministic, no download)."""
    corpus = ["User: Assistant: user assistant"]
    for task in ("classification", "vqa"):
        corpus += [user_text(s) + " " + s["answer"] for s in generate(task, 100, "train", seed=0)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", **roles)


def build_idefics3(out_dir) -> None:
    """SigLIP-style tower (32 px, patch 8) + Llama; pixel shuffle by 2 leaves 4 tokens per 32 px crop.

    Image splitting stays on as in SmolVLM: a square image becomes 2x2 crops + a global view (5 images),
    a 2:1 one 1x2 crops + global (3 images).
    """
    torch.manual_seed(0)
    tokenizer = _tokenizer(IDEFICS3_TOKENS, pad_token="<pad>", bos_token="<|im_start|>", eos_token="<end_of_utterance>")
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * IMAGE_SIZE},
                                                max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=IDEFICS3_TEMPLATE)
    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=IMAGE_SIZE, patch_size=8)
    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TEXT)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    Idefics3ForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_qwen2_vl(out_dir) -> None:
    """Qwen2-VL tower (patch 8, 2x2 merge) + Qwen2 with M-RoPE; a 32x32 image gives 16 patches, 4 tokens."""
    torch.manual_seed(0)
    tokenizer = _tokenizer(QWEN2_VL_TOKENS, pad_token="<|endoftext|>", eos_token="<|im_end|>")
    patches = dict(patch_size=8, temporal_patch_size=2, merge_size=2)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=IMAGE_SIZE**2, max_pixels=IMAGE_SIZE**2, **patches)
    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        processor = Qwen2VLProcessor(image_processor, tokenizer, Qwen2VLVideoProcessor(**patches),
                                     chat_template=QWEN2_VL_TEMPLATE)
    else:  # every video processor needs torchvision: save the image-only processor fedsim loads then
        processor = without_video_processor(Qwen2VLProcessor)(image_processor, tokenizer,
                                                              chat_template=QWEN2_VL_TEMPLATE)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_TOKENS}
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]  # M-RoPE splits head_dim / 2 over (t, h, w)
    text = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                bos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [head_dim // 8, 3 * head_dim // 16,
                                                                      3 * head_dim // 16]}, **TEXT)
    vision = dict(depth=2, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"])
    Qwen2VLForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_gemma3(out_dir) -> None:
    """SigLIP tower (32 px, patch 8) pooled to 4 soft tokens per image + Gemma3 text model."""
    torch.manual_seed(0)
    tokenizer = _tokenizer(GEMMA3_TOKENS, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                           extra_special_tokens={"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                                                 "eoi_token": "<end_of_image>"})
    image_processor = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor = Gemma3Processor(image_processor, tokenizer, image_seq_length=4)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in GEMMA3_TOKENS}
    text = dict(TEXT, head_dim=16, sliding_window=16, vocab_size=len(tokenizer), pad_token_id=ids["<pad>"],
                bos_token_id=ids["<bos>"], eos_token_id=ids["<eos>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8)
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                          boi_token_id=ids["<start_of_image>"], eoi_token_id=ids["<end_of_image>"],
                          image_token_id=ids["<image_soft_token>"])
    Gemma3ForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)


def build_mllama(out_dir) -> None:
    """Tiled vision model (local + global layers) + Mllama text model whose decoder layer 1 is cross-attention."""
    torch.manual_seed(0)
    tokenizer = _tokenizer(MLLAMA_TOKENS, pad_token="<pad>", bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    processor = MllamaProcessor(MllamaImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}), tokenizer)
    text = dict(TEXT, num_hidden_layers=MLLAMA_LAYERS, cross_attention_layers=[1], vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=8, vision_output_dim=64, intermediate_layers_indices=[0])
    config = MllamaConfig(text_config=text, vision_config=vision,
                          image_token_index=tokenizer.convert_tokens_to_ids("<|image|>"))
    MllamaForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)

BUILDERS = {"idefics3": build_idefics3, "qwen2_vl": build_qwen2_vl, "gemma3": build_gemma3, "mllama": build_mllama}
TRAINED = ("idefics3", "qwen2_vl")  # families that also run the collator, training and evaluation tests


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads made a step 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_folder(request, tmp_path_factory):
    """family -> the folder of its tiny model, built on first use ("llava": the built-in preset)."""
    folders = {}

    def folder(family: str):
        if family == "llava":
            return request.getfixturevalue("tiny_path")
        if family not in folders:
            folders[family] = tmp_path_factory.mktemp(family)
            BUILDERS[family](folders[family])
        return folders[family]

    return folder


@pytest.fixture(scope="module", params=TRAINED)
def loaded(request, model_folder):
    return load_model(ModelConfig(name=str(model_folder(request.param))), seed=0)


@pytest.fixture(scope="module")
def mixed_samples() -> list[dict]:
    """Image+text, text-only, and image-only with a 2:1 image (another crop / patch count than a square one)."""
    first, second, third = generate("classification", 3, "train", seed=0)
    return [first, dict(second, image=None, has_image=False),
            dict(third, image=third["image"].crop((0, 0, IMAGE_SIZE, IMAGE_SIZE // 2)), text=None, has_text=False)]


def _is_language_model(name: str) -> bool:
    return "language_model" in name or "text_model" in name


def test_language_model_is_4bit(loaded):
    quantized = [n for n, m in loaded.model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in range(TEXT_LAYERS):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert any(_is_language_model(n) and n.endswith(f"layers.{layer}.self_attn.{proj}.base_layer")
                       for n in quantized), (layer, proj)


def test_lora_is_trainable_in_the_language_model_only(loaded):
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and _is_language_model(n) and LAYER_PATTERN.search(n) for n in trainable)
    assert loaded.num_layers == TEXT_LAYERS
    assert set(loaded.layer_of) == set(trainable)
    # 4 projections x (A, B) per decoder layer
    assert sorted(loaded.layer_of.values()) == sorted(list(range(TEXT_LAYERS)) * 8)


def test_mixed_batch_keeps_every_input_the_model_needs(loaded, mixed_samples):
    batch = Collator(loaded.processor, 256, train=True)(mixed_samples)
    width = batch["input_ids"].shape[1]
    for key in ("attention_mask", "labels", "mm_token_type_ids"):
        if key in batch:
            assert batch[key].shape == (3, width)
    assert (batch["labels"] != -100).sum(dim=1).min() > 0
    if "image_grid_thw" in batch:  # Qwen2-VL: one grid per image, patches of both images concatenated
        assert batch["image_grid_thw"].shape == (2, 3)
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(dim=1).sum())
        assert batch["mm_token_type_ids"][1].sum() == 0  # the text-only row has no image tokens
    if "pixel_attention_mask" in batch:  # Idefics3: 5 crops and 3 crops, padded with all-zero images
        assert batch["pixel_values"].shape == (2, 5, 3, IMAGE_SIZE, IMAGE_SIZE)
        assert torch.all(batch["pixel_values"][1, 3:] == 0) and torch.all(batch["pixel_attention_mask"][1, 3:] == 0)
        assert torch.all(batch["pixel_attention_mask"][0] == 1)


@pytest.mark.parametrize("strategy", ["fedmllm_reg", "scaffold"])
def test_clients_trained_in_one_batch_get_their_one_by_one_updates(loaded, strategy):
    """runtime.clients_per_batch on the family's own processor and layer names: uneven clients, mixed
    modalities (Qwen2-VL's flattened patches, Idefics3's padded crops), each client's update within 1e-4."""
    training = TrainingConfig(batch_size=4, optimizer="sgd" if strategy == "scaffold" else "adamw")
    alone, together = one_by_one_and_together(loaded, uneven_clients(3), STRATEGIES[strategy], training)
    for mine, reference in zip(together, alone):
        assert relative_difference(mine, reference) <= 1e-4


def test_evaluate_train_evaluate(loaded, mixed_samples):
    test = generate("classification", 4, "test", seed=0)
    evaluator = Evaluator(loaded.processor, test, EvalConfig(batch_size=4), 256, loaded.device, seed=0)
    before = evaluator.evaluate(loaded.model)
    assert 0.0 <= before["accuracy"] <= 1.0

    batch = Collator(loaded.processor, 256, train=True)(mixed_samples)
    params = [p for p in loaded.model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    losses = adamw_steps(loaded.model, batch)
    assert np.all(np.isfinite(losses)) and len(set(losses)) == 3, losses
    assert all(not torch.equal(p, s) for p, s in zip(params, start))

    after = evaluator.evaluate(loaded.model)
    assert 0.0 <= after["accuracy"] <= 1.0


@pytest.mark.parametrize("family", TRAINED)
def test_batched_greedy_answers_equal_each_question_generated_alone(family, model_folder):
    """The evaluator generates a left-padded batch; each row must get the tokens ``model.generate`` gives that
    question alone, unpadded. Rows 0 and 1 share their text and differ in the image; row 4's 2:1 image makes
    its prompt shorter (fewer crops or patches), so the batch is padded. A path that loses the attention mask,
    shifts positions under padding or mixes up rows' images misses the per-row answers. A model of its own: the
    module's shared one has been trained by other tests, and its answers then no longer tell rows apart."""
    loaded = load_model(ModelConfig(name=str(model_folder(family))), seed=0)
    rows = generate("vqa", 5, "test", seed=0)
    wide = rows[4]["image"].crop((0, 0, IMAGE_SIZE, IMAGE_SIZE // 2))
    negative = ImageOps.invert(rows[0]["image"])  # row 1: row 0's note, the colour negative of its image
    rows = [rows[0], dict(rows[0], image=negative), rows[2], rows[3], dict(rows[4], image=wide)]
    collate = Collator(loaded.processor, 256, train=False, padding_side="left")
    with inference(loaded.model):
        alone = [loaded.model.generate(**one, max_new_tokens=4, do_sample=False, pad_token_id=collate.pad_id)
                 [0, one["input_ids"].shape[1]:] for one in map(collate, ([row] for row in rows))]
    answers = loaded.processor.tokenizer.batch_decode(alone, skip_special_tokens=True)
    assert collate(rows)["attention_mask"].sum(dim=1).unique().numel() > 1  # the batch is padded
    assert answers[0] != answers[1] and all(normalize_answer(answer) for answer in answers), answers
    test = datasets.Dataset.from_list([dict(row, answer=answer) for row, answer in zip(rows, answers)],
                                      features=features())
    evaluator = Evaluator(loaded.processor, test, EvalConfig(batch_size=5, max_new_tokens=4), 256,
                          loaded.device, seed=0)
    scores = evaluator.evaluate(loaded.model)
    assert scores["accuracy"] == scores["token_f1"] == 1.0, (scores, answers)


# LoRA on the vision tower (q_proj/v_proj, Qwen2-VL's qkv, every tower's fc1) as well as on the language model:
# the regularization must pick the language model's window layers out of all of them.
EVERYWHERE = LoraConfig(target_modules=["q_proj", "v_proj", "qkv", "fc1"])
WINDOW = 0.25  # s = round(0.25 L) = 1 for L = 3 and 4: layers 1..L-2 regularized, the first and last left free


def window_parameters(loaded: LoadedModel, edge: int) -> set[str]:
    """Trainable parameters inside decoder layers edge..L-1-edge, found by walking the language model's modules."""
    layers = loaded.model.get_base_model().get_decoder().layers
    assert len(layers) == loaded.num_layers
    inside = {id(p) for layer in layers[edge:len(layers) - edge] for p in layer.parameters() if p.requires_grad}
    return {n for n, p in loaded.model.named_parameters() if id(p) in inside}


@pytest.mark.parametrize("family", ["llava", *sorted(BUILDERS)])
def test_fedmllm_reg_pulls_exactly_the_window_layers(family, model_folder):
    loaded = load_model(ModelConfig(name=str(model_folder(family)), lora=EVERYWHERE), seed=0)
    cfg = ClientAlgoConfig(name="fedmllm_reg", window=WINDOW)
    strategy = build_client_strategy(cfg)
    strategy.begin(LocalContext({}, {}, None, loaded.layer_of, loaded.num_layers))
    assert strategy.edge == 1

    trainable = {n for n, p in loaded.model.named_parameters() if p.requires_grad}
    expected = window_parameters(loaded, strategy.edge)
    free_layers = window_parameters(loaded, 0) - expected
    # Discriminating: LoRA sits in the window, in the free edge layers and in the vision tower.
    assert expected and free_layers and trainable - expected - free_layers
    if family == "mllama":  # its cross-attention layer is decoder layer 1, inside the window
        assert any(".cross_attn." in n for n in expected)
    assert {n for n in trainable if strategy.regularized(n)} == expected
    check_layer_window(loaded, cfg)


# -- hub revisions ------------------------------------------------------------------------------------------


def test_pretrained_kwargs_pin_hub_names_only(tmp_path, caplog):
    hub = ModelConfig(name="Qwen/Qwen2-VL-2B-Instruct", revision="0123abcd", trust_remote_code=True)
    assert pretrained_kwargs(hub) == {"revision": "0123abcd", "trust_remote_code": True}
    assert pretrained_kwargs(ModelConfig(name="Qwen/Qwen2-VL-2B-Instruct")) == {"trust_remote_code": False}
    for local in (str(tmp_path), "tiny"):
        with caplog.at_level(logging.WARNING, logger="fedsim.models.loading"):
            assert pretrained_kwargs(ModelConfig(name=local, revision="v2")) == {"trust_remote_code": False}
        assert f"model.revision='v2' is ignored: model.name={local!r} is a local folder" in caplog.text
        caplog.clear()


def _hub_cache(cache, repo: str, folder, refs: tuple[str, ...]) -> None:
    """A Hugging Face hub cache holding ``folder`` as one commit of model ``repo``, each of ``refs`` naming it."""
    commit = "c0ffee" + "0" * 34
    shutil.copytree(folder, cache / f"models--{repo.replace('/', '--')}" / "snapshots" / commit)
    (cache / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    for ref in refs:
        (cache / f"models--{repo.replace('/', '--')}" / "refs" / ref).write_text(commit)


def test_model_revision_pins_weights_processor_and_tokenizer_to_one_commit(tmp_path, monkeypatch, model_folder):
    """Offline, from a local hub cache whose only ref is the tag v2 (no main): every file the model, its
    processor and its tokenizer need is found only when the revision reaches each from_pretrained."""
    import huggingface_hub.constants

    _hub_cache(tmp_path, "fedsim-test/tiny-qwen2-vl", model_folder("qwen2_vl"), refs=("v2",))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model(ModelConfig(name="fedsim-test/tiny-qwen2-vl", revision="v2"), seed=0)
    assert loaded.commit == "c0ffee" + "0" * 34 and loaded.num_layers == TEXT_LAYERS
    assert loaded.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") is not None
    with pytest.raises(OSError):  # the default branch is not in the cache: nothing falls back to it
        load_model(ModelConfig(name="fedsim-test/tiny-qwen2-vl"), seed=0)
