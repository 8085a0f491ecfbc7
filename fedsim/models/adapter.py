"""Adapter exchange: the trainable state of a peft model as named tensors, its digest, and its saving."""

from __future__ import annotations

import hashlib
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from fedsim.messages import NamedTensors, WireTensors
from fedsim.output import atomic_dir


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def get_weights(model: torch.nn.Module) -> NamedTensors:
    """A float32 CPU copy of every trainable tensor (LoRA and modules_to_save)."""
    return WireTensors({name: p.detach().to("cpu", torch.float32, copy=True)
                        for name, p in trainable_parameters(model).items()})


def set_weights(model: torch.nn.Module, weights: NamedTensors) -> None:
    """Load named tensors into the trainable parameters; the names must match exactly."""
    params = trainable_parameters(model)
    if params.keys() != weights.keys():
        missing, unexpected = sorted(params.keys() - weights.keys()), sorted(weights.keys() - params.keys())
        raise KeyError(f"adapter tensors do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])


def adapter_sha256(weights: NamedTensors) -> str:
    """SHA-256 over (name, shape, float32 bytes) in sorted name order: equal digests mean equal adapters."""
    digest = hashlib.sha256()
    update_digest(digest, weights)
    return digest.hexdigest()


def update_digest(digest: hashlib._Hash, weights: NamedTensors, prefix: str = "") -> None:
    """Feed ``weights`` to ``digest`` as ``adapter_sha256`` does, each name under ``prefix``: adapters fed one
    after another, in the sorted order of their prefixed names, give the digest of them all in one dict."""
    for name in sorted(weights):
        tensor = weights[name].detach().to("cpu", torch.float32).contiguous()
        digest.update((prefix + name).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.numpy().tobytes())


def save_adapter(model: torch.nn.Module, weights: NamedTensors, out_dir: str | Path) -> None:
    """Write ``weights`` in peft format (``PeftModel.from_pretrained(base, out_dir)`` loads it), atomically."""
    set_weights(model, weights)
    with atomic_dir(Path(out_dir)) as staging:
        model.save_pretrained(staging)


def adapter_files(model: torch.nn.Module, weights: NamedTensors) -> dict[str, bytes]:
    """The peft-format files of ``weights`` as contents, for writing wherever the run directory lives."""
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(model, weights, Path(tmp) / "adapter")
        return {p.name: p.read_bytes() for p in (Path(tmp) / "adapter").iterdir()}


@contextmanager
def inference(model: torch.nn.Module) -> Iterator[None]:
    """No grad, dropout off, every other module left in train mode.

    ``model.eval()`` is avoided on purpose: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit layer
    that runs an eval-mode no-grad forward into an inference layout for good, and training then fails.
    """
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for module in dropouts:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module in dropouts:
            module.train()
