"""Load an image-text-to-text model in 4-bit (bitsandbytes NF4) and wrap it with LoRA adapters (peft).

The same path serves a hub name, a local folder and the built-in ``tiny`` preset (which is built into a
local folder first), so the tiny model exercises exactly the code a real 8B model goes through.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForImageTextToText, AutoProcessor, BitsAndBytesConfig, ProcessorMixin
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.utils import is_torchvision_available

from fedsim.algorithms.client import edge_layers
from fedsim.config import ClientAlgoConfig, ConfigError, ModelConfig

log = logging.getLogger(__name__)

# Decoder layer N of the language model, as named in a peft-wrapped model (transformers 5.x unless said):
#   LLaVA, Qwen2-VL, Gemma3, Mllama      base_model.model.model.language_model.layers.N.
#   Idefics3 / SmolVLM                   base_model.model.model.text_model.layers.N.
#   MiniCPM-V (remote code)              base_model.model.llm.model.layers.N.
#   LLaVA under transformers 4.x         base_model.model.language_model.model.layers.N.
# The component must be a whole name segment right before ``[model.]layers``, so vision towers
# (vision_tower.encoder.layers.N, vision_model.encoder.layers.N, Mllama's vision_model.[global_]transformer.layers.N,
# Qwen2-VL's visual.blocks.N, MiniCPM-V's vpm.encoder.layers.N) never match. Mllama interleaves its cross-attention
# layers in the same ``layers`` list: each keeps its list index and counts as one of the
# L = text_config.num_hidden_layers decoder layers (Llama-3.2-11B-Vision: 40, of which 8 cross-attention).
LAYER_PATTERN = re.compile(r"(?:^|\.)(?:language_model|text_model|llm)\.(?:model\.)?layers\.(\d+)\.")


@dataclass
class LoadedModel:
    model: PeftModel
    processor: Any
    device: torch.device
    num_layers: int  # decoder layers of the language model
    layer_of: dict[str, int | None]  # trainable parameter name -> decoder layer index
    commit: str | None = None  # the hub commit the weights came from (None: a local folder)


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device=cuda but no CUDA device is visible; use model.device=auto or cpu")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        if cfg.device == "auto":
            log.info("no CUDA device visible: running on CPU with float32 compute")
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, cfg.compute_dtype)


def is_local_model(cfg: ModelConfig) -> bool:
    """True for ``tiny`` and for a name that is a local path (starts with ., / or ~, or exists here)."""
    return cfg.name == "tiny" or cfg.name.startswith((".", "/", "~")) or Path(cfg.name).expanduser().exists()


def resolve_model_path(cfg: ModelConfig) -> str:
    """``tiny`` -> the shipped preset folder; anything else is passed to from_pretrained."""
    if cfg.name == "tiny":
        from fedsim.models.tiny import tiny_model_path

        return str(tiny_model_path())
    looks_local = is_local_model(cfg)
    if looks_local and not (Path(cfg.name).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"model.name={cfg.name!r} is a local path but has no config.json; "
                                "expected a Hugging Face model folder (config.json, weights, processor files)")
    return str(Path(cfg.name).expanduser()) if looks_local else cfg.name


def pretrained_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """What every ``from_pretrained`` of the model takes (weights, processor, tokenizer): ``revision`` for a hub
    name, so that all of them come from one commit, and ``trust_remote_code``.

    A local folder (or ``tiny``) has no revisions: a ``model.revision`` set with one is ignored, with a warning.
    """
    kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.revision:
        if is_local_model(cfg):
            log.warning("model.revision=%r is ignored: model.name=%r is a local folder, which has no revisions",
                        cfg.revision, cfg.name)
        else:
            kwargs["revision"] = cfg.revision
    return kwargs


def resolved_commit(cfg: ModelConfig) -> str | None:
    """The hub commit whose files a hub model was loaded from, read from the local hub cache (no network);
    None for a local folder or when the cache does not say."""
    if is_local_model(cfg):
        return None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(cfg.name, "config.json", revision=cfg.revision or None)
    if not isinstance(cached, str) or Path(cached).parent.parent.name != "snapshots":
        return None
    return Path(cached).parent.name


# Weight files that torch.load unpickles (transformers: pytorch_model.bin and its shards; .pt/.pth/.ckpt elsewhere).
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
PICKLE_HINT = ("fedsim loads safetensors weights only, since unpickling a file can run code; convert them "
               "(save_pretrained(..., safe_serialization=True)) or, if you trust where they come from, set "
               "model.allow_pickle_weights=true")


def check_weight_format(path: str, cfg: ModelConfig) -> None:
    """Refuse a local model folder whose weights are pickles only, unless ``model.allow_pickle_weights``; a hub
    repository is refused by ``from_pretrained(use_safetensors=True)`` before any weight is fetched."""
    folder = Path(path)
    if cfg.allow_pickle_weights or not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted({p.name for pattern in PICKLE_WEIGHTS for p in folder.glob(pattern)})
    if pickles:
        raise ConfigError(f"model.name={cfg.name!r} has pickled weights only ({', '.join(pickles)}): {PICKLE_HINT}")


@functools.cache
def without_video_processor(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """``processor_class`` with its video processor left out (images and text only).

    In transformers 5 every video processor needs torchvision, and processors such as Qwen2-VL's and
    SmolVLM's refuse to be built without one; fedsim never feeds videos, so it drops that part instead.
    """

    class ImageOnlyProcessor(processor_class):
        @classmethod
        def get_attributes(cls) -> list[str]:
            return [name for name in super().get_attributes() if name != "video_processor"]

        @classmethod
        def from_args_and_dict(cls, args: list, processor_dict: dict, **kwargs: Any) -> ProcessorMixin:
            # __init__ still takes a video processor (SmolVLM's requires one): None in its place.
            index = processor_class.get_attributes().index("video_processor")
            return super().from_args_and_dict([*args[:index], None, *args[index:]], processor_dict, **kwargs)

    # Saved folders must name the real class, so that AutoProcessor can load them again.
    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_class.__name__
    return ImageOnlyProcessor


def load_processor(path: str, model_config: Any, **kwargs: Any) -> Any:
    """AutoProcessor, or the image-only variant of the model's processor when torchvision is missing;
    ``kwargs`` (``pretrained_kwargs``) go to its from_pretrained."""
    processor_class = PROCESSOR_MAPPING[type(model_config)] if type(model_config) in PROCESSOR_MAPPING else None
    if (processor_class is not None and not is_torchvision_available()
            and "video_processor" in processor_class.get_attributes()):
        log.info("torchvision is not installed: loading %s without its video processor", processor_class.__name__)
        builtin = {key: value for key, value in kwargs.items() if key != "trust_remote_code"}  # a built-in class
        return without_video_processor(processor_class).from_pretrained(path, **builtin)
    return AutoProcessor.from_pretrained(path, **kwargs)


def load_backbone(cfg: ModelConfig) -> tuple[torch.nn.Module, Any, torch.device]:
    """The frozen (4-bit unless disabled) backbone and its processor, without adapters."""
    path = resolve_model_path(cfg)
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    quantization = None
    if cfg.load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                                          bnb_4bit_use_double_quant=cfg.double_quant,
                                          bnb_4bit_compute_dtype=dtype)
    kwargs = pretrained_kwargs(cfg)
    check_weight_format(path, cfg)
    try:
        # None: safetensors where the model has them, else the pickled weights.
        model = AutoModelForImageTextToText.from_pretrained(
            path, quantization_config=quantization, dtype=dtype, device_map={"": device},
            use_safetensors=None if cfg.allow_pickle_weights else True, **kwargs)
    except OSError as err:
        # transformers says "... cannot be loaded with `safetensors`" for a hub repository without them.
        if cfg.allow_pickle_weights or "safetensors" not in str(err):
            raise
        raise ConfigError(f"{err}\nmodel.name={cfg.name!r} has no safetensors weights here: {PICKLE_HINT}") from err
    processor = load_processor(path, model.config, **kwargs)
    model.requires_grad_(False)
    # Stay in train mode: on CPUs with AVX512-BF16 an eval-mode no-grad forward repacks bitsandbytes 4-bit
    # weights for inference for good, and training afterwards fails. Evaluation turns dropout off instead.
    model.train()
    return model, processor, device


def attach_lora(model: torch.nn.Module, cfg: ModelConfig, seed: int) -> PeftModel:
    if cfg.load_in_4bit and cfg.prepare_kbit_training:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    lora = cfg.lora
    peft_config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or lora.target_regex,
        modules_to_save=list(lora.modules_to_save) or None)
    torch.manual_seed(seed)  # LoRA's A matrices are drawn from torch's global generator
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as err:
        raise ValueError(f"model.lora targets matched nothing usable in {cfg.name!r}: {err}") from None
    peft_model.train()
    return peft_model


def load_model(cfg: ModelConfig, seed: int) -> LoadedModel:
    """Backbone + processor + LoRA, ready for local training."""
    backbone, processor, device = load_backbone(cfg)
    model = attach_lora(backbone, cfg, seed)
    layer_of = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            match = LAYER_PATTERN.search(name)
            layer_of[name] = int(match.group(1)) if match else None
    num_layers = model.base_model.model.config.get_text_config().num_hidden_layers
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    commit = resolved_commit(cfg)
    log.info("loaded %s%s on %s: %d trainable parameters in %d tensors, %d decoder layers",
             cfg.name, f" (commit {commit})" if commit else "", device, n_trainable, len(layer_of), num_layers)
    return LoadedModel(model, processor, device, num_layers, layer_of, commit)


def check_layer_window(loaded: LoadedModel, client_cfg: ClientAlgoConfig) -> None:
    """Refuse ``fedmllm_reg`` when no trainable parameter lies in its regularized decoder layers s..L-1-s.

    Its penalty would otherwise be zero without a word: LoRA targets that miss the language model's middle
    layers (only the vision tower or the projector), or a model whose layer names ``LAYER_PATTERN`` does not know.
    """
    if client_cfg.name != "fedmllm_reg":
        return
    num_layers = loaded.num_layers
    try:
        edge = edge_layers(client_cfg.window, num_layers)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    last = num_layers - 1 - edge
    layers = sorted({layer for layer in loaded.layer_of.values() if layer is not None})
    if any(edge <= layer <= last for layer in layers):
        return
    names = sorted(loaded.layer_of)
    if layers:
        found = f"those inside decoder layers are in layers {layers} only"
    elif names:
        found = "none is inside a decoder layer of the language model"
    else:
        found = "the model has none"
    first_of_layer: dict[int | None, str] = {}
    for name in names:
        first_of_layer.setdefault(loaded.layer_of[name], name)
    examples = f" (e.g. {', '.join(list(first_of_layer.values())[:3])})" if names else ""
    hint = " or lower algorithm.client.window" if layers else ""
    raise ConfigError(
        f"algorithm.client.name='fedmllm_reg' regularizes the language model's decoder layers {edge}..{last} of "
        f"{num_layers} (window={client_cfg.window:g}), but none of the {len(names)} trainable tensors lies in them: "
        f"{found}{examples}. Decoder-layer parameters are recognised by the name pattern '{LAYER_PATTERN.pattern}'. "
        "Point model.lora.target_modules or model.lora.target_regex at the language model's decoder layers (the "
        f"default target_regex does){hint}, or use algorithm.client.name='fedprox' to regularize every trainable "
        "parameter.")
