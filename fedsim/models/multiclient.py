"""Several clients' LoRA adapters in one forward pass over one resident backbone.

Clients of a round share the frozen (4-bit) base exactly; only their LoRA weights differ. Inside
``multi_client_lora`` every peft LoRA layer computes its base output once for the whole concatenated batch and
adds, for each sample, the LoRA term of that sample's own client:

    y_i = base(x_i) + scaling * B_c(i) A_c(i) dropout(x_i)

with each client's A and B stacked and gathered per sample (two batched matmuls per layer, however many
clients). The resident adapter is switched off meanwhile (peft's own ``disable_adapters``); the clients'
weights are plain leaf tensors, so each client's gradients land on its own tensors only.

peft's mixed-adapter batches (``adapter_names=``) cannot do this: they are inference-only.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:  # peft (with transformers and bitsandbytes) loads in the processes that hold a model only
    from peft.tuners.lora import LoraLayer

Params = dict[str, torch.Tensor]


def lora_layers(model: torch.nn.Module) -> dict[str, LoraLayer]:
    """The model's peft LoRA layers by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLayer)}


def check_batchable(model: torch.nn.Module, trainable: list[str]) -> None:
    """Refuse, naming what is wrong, an adapter that multi-client batches cannot train: every trainable
    tensor must be a plain LoRA A or B of a linear layer (no DoRA or other variant, no modules_to_save)."""
    covered = set()
    for name, layer in lora_layers(model).items():
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            if adapter in getattr(layer, "lora_variant", {}):
                raise ValueError(f"runtime.clients_per_batch > 1 trains plain LoRA only; layer {name!r} uses the "
                                 f"{type(layer.lora_variant[adapter]).__name__} variant (DoRA or similar)")
            if not isinstance(layer.lora_A[adapter], torch.nn.Linear):
                raise ValueError(f"runtime.clients_per_batch > 1 trains LoRA on linear layers only; {name!r} is a "
                                 f"{type(layer).__name__}")
            covered.update({f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"})
    others = sorted(set(trainable) - covered)
    if others:
        raise ValueError(f"runtime.clients_per_batch > 1 trains LoRA A/B weights only, but the adapter also trains "
                         f"{others[:3]} (model.lora.modules_to_save?); set runtime.clients_per_batch=1")


@dataclass
class ClientRows:
    """One client's part of a concatenated batch."""

    params: Params  # its LoRA tensors, named as the model's trainable parameters
    rows: slice  # its samples' rows in the batch (right-padded to the batch's longest sequence)
    width: int  # the sequence length of its own batch, were it trained alone
    generator: torch.Generator | None = None  # its LoRA dropout's random stream


def _dropped(h: torch.Tensor, dropout: torch.nn.Module, client: ClientRows) -> torch.Tensor:
    """``dropout(h)`` with the client's own random stream, its mask drawn over the client's own batch shape
    (the padding beyond its width, which no real token attends to, gets none): the mask it would get alone.
    This is torch's CPU dropout (input * bernoulli(1 - p) / (1 - p)) on the client's generator."""
    if not isinstance(dropout, torch.nn.Dropout) or not dropout.training or dropout.p == 0:
        return dropout(h)
    keep = 1 - dropout.p
    shape = (h.shape[0], client.width, *h.shape[2:]) if h.dim() == 3 else h.shape
    noise = torch.empty(shape, dtype=h.dtype, device=h.device).bernoulli_(keep, generator=client.generator)
    noise.div_(keep)
    if h.dim() == 3 and client.width < h.shape[1]:
        noise = torch.nn.functional.pad(noise, (0, 0, 0, h.shape[1] - client.width))
    return h * noise


def _add_client_lora(name: str, layer: LoraLayer, adapter: str, clients: list[ClientRows], samples: int):
    """A forward hook that adds each client's LoRA term, on its own rows, to the layer's base output."""
    a_name, b_name = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
    dropout, scaling = layer.lora_dropout[adapter], layer.scaling[adapter]
    linear = torch.nn.functional.linear

    def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        if x.shape[0] != samples:
            raise ValueError(f"runtime.clients_per_batch > 1 needs LoRA layers whose input has one row per sample; "
                             f"{name!r} got leading size {x.shape[0]} for {samples} samples (LoRA on a vision "
                             "tower that flattens patches?); narrow model.lora.target_regex or use clients_per_batch=1")
        h = x.to(clients[0].params[a_name].dtype)
        # Per client, the very operations peft's layer runs on that client's batch alone (F.linear on its rows):
        # its update is then bit for bit the one it would get trained alone, on CPU.
        parts = [linear(linear(_dropped(h[c.rows], dropout, c), c.params[a_name]), c.params[b_name]) * scaling
                 for c in clients]
        return output + torch.cat(parts).to(output.dtype)

    return hook


@contextmanager
def multi_client_lora(model: torch.nn.Module, clients: list[ClientRows], samples: int) -> Iterator[None]:
    """Within this context, the rows of each client in a batch of ``samples`` go through that client's LoRA
    weights instead of the resident adapter."""
    hooks = []
    try:
        for name, layer in lora_layers(model).items():
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    hooks.append(layer.register_forward_hook(_add_client_lora(name, layer, adapter, clients, samples)))
        with _resident_lora_off(model):
            yield
    finally:
        for handle in hooks:
            handle.remove()


@contextmanager
def _resident_lora_off(model: torch.nn.Module) -> Iterator[None]:
    """Every LoRA layer returns its base output alone (peft's ``disable_adapters`` switch), restored after."""
    layers = list(lora_layers(model).values())
    before = [layer.disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was
