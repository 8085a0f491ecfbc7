"""The built-in ``tiny`` preset: a small LLaVA-style MLLM built offline and cached on disk.

A CLIP vision tower and a Qwen2 language model, with a byte-level BPE tokenizer trained locally on the
synthetic benchmark's prompts, a CLIP image processor and a ChatML chat template. Like a real MLLM it is
pre-trained (briefly, in full precision, all weights) on the synthetic ``pretrain`` split, which is
disjoint from every client's data: generic questions about colours, shapes, notes and option letters.
The result is saved as an ordinary Hugging Face folder and then loaded through exactly the same 4-bit +
LoRA path as a hub model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from fedsim.data.collator import Collator, prompt_and_answer
from fedsim.data.synthetic import GENERATORS

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]

# Everything that changes the built model belongs here: its hash names the cache folder.
SPEC = {
    "version": 1,
    "image_size": 32,
    "patch_size": 8,
    "vision_hidden": 64,
    "vision_layers": 2,
    "text_hidden": 128,
    "text_intermediate": 256,
    "text_layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "vocab_size": 640,
    "tokenizer_samples": 3000,
    # The synthetic tasks whose prompts train the tokenizer. Listed here, not taken from the generator
    # registry, so that adding a task to the benchmark does not silently change the built model.
    "tokenizer_tasks": ["classification", "vqa", "pretrain", "textqa"],
    "pretrain_steps": 400,
    "pretrain_batch": 32,
    "pretrain_lr": 2e-3,
    "seed": 1234,
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim"))


def tiny_model_path(cache_dir: str | Path | None = None) -> Path:
    """Path of the built tiny preset, building it first if the cache lacks it (safe across processes)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    digest = hashlib.sha256(json.dumps(SPEC, sort_keys=True).encode()).hexdigest()[:12]
    path = root / f"tiny-llava-{digest}"
    if (path / "config.json").exists():
        return path
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # several workers may ask at once; one builds, the rest wait
        if not (path / "config.json").exists():
            staging = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
            try:
                build_tiny(staging)
                os.replace(staging, path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return path


def _samples(task: str, count: int, rng: np.random.Generator) -> list[dict]:
    return [GENERATORS[task](rng, SPEC["image_size"]) for _ in range(count)]


def _train_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SPEC["vocab_size"], special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="<|im_end|>", bos_token=None, extra_special_tokens={"image_token": "<image>"})


def _processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    size = SPEC["image_size"]
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    # num_additional_image_tokens=1 counts CLIP's CLS token, which the "default" strategy then drops.
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=SPEC["patch_size"],
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def _model(tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=SPEC["vision_hidden"], intermediate_size=2 * SPEC["vision_hidden"],
                              num_hidden_layers=SPEC["vision_layers"], num_attention_heads=SPEC["heads"],
                              image_size=SPEC["image_size"], patch_size=SPEC["patch_size"],
                              projection_dim=SPEC["vision_hidden"])
    text = Qwen2Config(vocab_size=len(tokenizer), hidden_size=SPEC["text_hidden"],
                       intermediate_size=SPEC["text_intermediate"], num_hidden_layers=SPEC["text_layers"],
                       num_attention_heads=SPEC["heads"], num_key_value_heads=SPEC["kv_heads"],
                       max_position_embeddings=512, tie_word_embeddings=False,
                       pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return LlavaForConditionalGeneration(config)


def _pretrain(model: LlavaForConditionalGeneration, processor: LlavaProcessor, rng: np.random.Generator) -> float:
    collate = Collator(processor, max_length=256, train=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SPEC["pretrain_lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=SPEC["pretrain_lr"],
                                                   total_steps=SPEC["pretrain_steps"], pct_start=0.1)
    model.train()
    losses = []
    for step in range(SPEC["pretrain_steps"]):
        batch = collate(_samples("pretrain", SPEC["pretrain_batch"], rng))
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0:
            log.info("tiny preset pre-training step %d/%d loss %.3f", step, SPEC["pretrain_steps"], loss.item())
    return float(np.mean(losses[-20:]))


def build_tiny(out_dir: str | Path) -> None:
    """Build, pre-train and save the tiny preset into ``out_dir`` (deterministic given the SPEC)."""
    log.info("building the tiny preset in %s (once; cached afterwards)", out_dir)
    rng = np.random.default_rng(SPEC["seed"])
    torch.manual_seed(SPEC["seed"])
    bootstrap = _processor(_train_tokenizer(["bootstrap"]))  # renders prompts for the real tokenizer's corpus
    corpus = []
    for task in SPEC["tokenizer_tasks"]:
        for sample in _samples(task, SPEC["tokenizer_samples"] // len(SPEC["tokenizer_tasks"]), rng):
            prompt, answer = prompt_and_answer(bootstrap, sample)
            corpus.append(prompt + answer)
    tokenizer = _train_tokenizer(corpus)
    processor = _processor(tokenizer)
    model = _model(tokenizer)
    final_loss = _pretrain(model, processor, rng)
    log.info("tiny preset pre-trained: final loss %.3f", final_loss)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    (Path(out_dir) / "fedsim_tiny.json").write_text(json.dumps({"spec": SPEC, "pretrain_loss": final_loss}, indent=1))
