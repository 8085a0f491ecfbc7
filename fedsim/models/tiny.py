"""The built-in ``tiny`` preset: a small LLaVA-style MLLM, shipped with the package, pre-trained.

A CLIP vision tower and a Qwen2 language model, with a byte-level BPE tokenizer trained locally on the
synthetic benchmark's prompts, a CLIP image processor and a ChatML chat template. Like a real MLLM it is
pre-trained (in full precision, until its held-out loss plateaus) on the synthetic ``pretrain`` split,
which is disjoint from every client's data: one generic question kind per cue the downstream tasks use (an
item's colour, colour temperature and size; a note's describing word, what it means, how its weather word
feels), asked with the modality it needs and half the time the other as a distractor, so that fine-tuning
composes features the backbone already has and a missing modality is something it has seen. The projector and the language model learn; the vision tower stays a
fixed random-feature encoder (``SPEC["train_vision_tower"]``). The build records the held-out loss and,
per question kind, the accuracy of the answer's first token: a loss can look converged while the model
answers only the easy kinds.

The result ships in ``fedsim/models/tiny_preset/`` as an ordinary Hugging Face folder (weights in
safetensors, tokenizer, processor, chat template) and is loaded through exactly the same 4-bit + LoRA path
as a hub model; nothing is built at run time, so the model cannot change with the installed libraries or
the machine. ``python -m fedsim.models.tiny`` rebuilds it from ``SPEC`` and records every file's SHA-256 in
``checksums.json``, which a test checks the shipped files against.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import tempfile
from importlib.metadata import version
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

from fedsim.data.collator import IGNORE_INDEX, Collator, prompt_and_answer
from fedsim.data.synthetic import GENERATORS, PRETRAIN_KINDS, pretrain_kind

log = logging.getLogger(__name__)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<image>"]

# Everything that changes the built model belongs here; fedsim_tiny.json in the preset records it.
SPEC = {
    "version": 4,
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
    "pretrain_steps": 4000,
    "pretrain_batch": 32,
    "pretrain_lr": 1e-3,
    # The vision tower stays at its random initialization, a fixed random-feature encoder (as a real MLLM's
    # pre-trained encoder stays frozen while its projector and language model learn): trained jointly from
    # scratch it learned far slower (one item's colour: 54% after 200 steps, against 98% frozen).
    "train_vision_tower": False,
    "pretrain_eval_every": 500,  # held-out loss and accuracy per kind, recorded to show the plateau
    "pretrain_eval_batches": 16,
    "seed": 1234,
}
PRESET_DIR = Path(__file__).resolve().parent / "tiny_preset"
CHECKSUMS = "checksums.json"


def tiny_model_path() -> Path:
    """The shipped tiny preset's folder."""
    if not (PRESET_DIR / "config.json").is_file():
        raise FileNotFoundError(f"the tiny preset is missing from {PRESET_DIR}; it ships with fedsim, and "
                                "`python -m fedsim.models.tiny` rebuilds it")
    return PRESET_DIR


def file_checksums(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a preset folder except the checksum list itself, by file name."""
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.iterdir()) if f.is_file() and f.name != CHECKSUMS}


def _samples(task: str, count: int, rng: np.random.Generator) -> list[dict]:
    """Samples of ``task`` with the benchmark's default cues (they only shape the tokenizer's corpus here)."""
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


def pretrain_scores(model: torch.nn.Module, collate: Collator, batches: list[list[dict]]) -> tuple[float, dict[str, float]]:
    """Held-out loss on pre-training batches, and per question kind (``PRETRAIN_KINDS``) the accuracy of the
    answer's first token under greedy decoding. The loss alone hides a backbone that learned only the easy
    kinds (copying the note's word, the end-of-turn marker): the per-kind accuracies show it."""
    losses, hits = [], {kind: [] for kind in PRETRAIN_KINDS}
    with torch.no_grad():
        for samples in batches:
            batch = collate(samples)
            batch = {key: value.to(model.device) for key, value in batch.items()}
            out = model(**batch)
            losses.append(out.loss.item())
            for row, sample in enumerate(samples):
                first = int((batch["labels"][row] != IGNORE_INDEX).nonzero()[0])
                predicted = out.logits[row, first - 1].argmax().item()
                hits[pretrain_kind(sample["question"])].append(predicted == batch["labels"][row, first].item())
    return float(np.mean(losses)), {kind: float(np.mean(h)) for kind, h in hits.items() if h}


def _pretrain(model: LlavaForConditionalGeneration, processor: LlavaProcessor,
              rng: np.random.Generator) -> list[dict]:
    """Pre-train the projector and the language model on fresh ``pretrain`` batches (warm-up, then cosine decay); returns the held-out
    curve [{step, loss, accuracy per kind}], measured on batches drawn once before training."""
    collate = Collator(processor, max_length=256, train=True)
    held_out = [_samples("pretrain", SPEC["pretrain_batch"], rng) for _ in range(SPEC["pretrain_eval_batches"])]
    model.model.vision_tower.requires_grad_(SPEC["train_vision_tower"])
    trained = [param for param in model.parameters() if param.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=SPEC["pretrain_lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=SPEC["pretrain_lr"],
                                                   total_steps=SPEC["pretrain_steps"], pct_start=0.05)

    def record(step: int) -> None:
        loss, accuracy = pretrain_scores(model, collate, held_out)
        curve.append({"step": step, "loss": loss, "accuracy": accuracy})
        log.info("tiny preset pre-training step %d/%d held-out loss %.4f accuracy %s", step,
                 SPEC["pretrain_steps"], loss, {kind: round(a, 2) for kind, a in accuracy.items()})

    model.train()  # dropout is 0 in these configs: train mode changes nothing but keeps one code path
    curve: list[dict] = []
    for step in range(SPEC["pretrain_steps"]):
        if step % SPEC["pretrain_eval_every"] == 0:
            record(step)
        loss = model(**collate(_samples("pretrain", SPEC["pretrain_batch"], rng))).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    record(SPEC["pretrain_steps"])
    return curve


def build_tiny(out_dir: str | Path) -> None:
    """Build, pre-train and save the tiny preset into ``out_dir`` (deterministic given the SPEC, the
    library versions and the machine's floating-point kernels), with its checksums."""
    log.info("building the tiny preset in %s", out_dir)
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
    curve = _pretrain(model, processor, rng)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    built_with = {name: version(name) for name in ("torch", "transformers", "tokenizers", "numpy", "pillow")}
    (out_dir / "fedsim_tiny.json").write_text(json.dumps(
        {"spec": SPEC, "held_out": curve, "built_with": built_with}, indent=1) + "\n")
    (out_dir / CHECKSUMS).write_text(json.dumps(file_checksums(out_dir), indent=1) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedsim.models.tiny",
                                     description="Rebuild the tiny preset from SPEC (a few minutes on 2 cores).")
    parser.add_argument("--out", type=Path, default=PRESET_DIR, help=f"target folder (default {PRESET_DIR})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=args.out.parent, prefix=".building-"))
    try:
        build_tiny(staging)
        if args.out.exists():
            shutil.rmtree(args.out)
        os.replace(staging, args.out)  # the old preset goes only once the new one is complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"tiny preset written to {args.out}")


if __name__ == "__main__":
    main()
