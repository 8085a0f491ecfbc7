"""Upload compression of client updates: what the server receives, and how many bytes it would cost.

The simulator never ships encoded bytes. A client compresses its delta with ``compress``; the server gets
exactly what the encoding decodes to (float32 tensors, same names and shapes); and ``payload_bytes`` counts
what the encoding WOULD put on the wire, for the simulated clock. The count depends only on
(kind, d, density), so the engine knows it before training. Every kind works over the WHOLE adapter as one
flat vector of d values (``FlatLayout`` order, i.e. the dict's order), not tensor by tensor.

Kinds (the published rules; docs/privacy-robustness-compression.md) and their bytes, with k = ceil(density * d), at least 1
(density * d is rounded to 6 decimals before the ceiling, so that 0.07 * 100 gives 7 and not 8):

- ``none``: float32 values. Bytes ``4*d``.
- ``fp16``: cast to float16 and back (values beyond +-65504 become inf). Bytes ``2*d``.
- ``int8``: blocks of ``BLOCK`` = 64 values, one float32 absmax scale each, symmetric:
  q = round(x / scale * 127), decoded q * scale / 127, so the error is at most half a step, scale / 254.
  Bytes ``d + 4*ceil(d/64)``.
- ``nf4``: QLoRA's 4-bit NormalFloat with bitsandbytes' own quantizer
  (``quantize_4bit(x, blocksize=64, quant_type="nf4")`` then ``dequantize_4bit``), two codes a byte and one
  float32 absmax per 64-block. Bytes ``ceil(d/2) + 4*ceil(d/64)``. bitsandbytes' double quantization
  (``compress_statistics=True``, quantizing the scales themselves to 8 bits) would shrink the scale term; it
  is not used here.
- ``topk``: the k largest-magnitude coordinates. ``randk``: k coordinates drawn uniformly without
  replacement from a ``torch.Generator`` seeded with ``seed``. Bytes for both: the float32 values ``4*k``
  plus the positions, the cheaper of int32 indices (``4*k``) and a bitmap over d (``ceil(d/8)``).
  A randk client and server sharing the seed could send the seed instead of the positions; that is NOT
  assumed: positions are counted as for top-k.

Error feedback (Stich et al. 2018; Karimireddy et al. 2019), sparse kinds only: the client keeps a residual
e, compresses x = e + delta, sends C(x) and keeps e <- x - C(x). The sent values are copies of x's own
float32 values (unscaled), so ``sent + new_residual == residual + delta`` holds EXACTLY (bit for bit), not
just to rounding. Without error feedback the residual is ignored and randk scales its values by d/k so
that the server's expectation is the delta (unbiased).

Determinism: top-k breaks ties in magnitude toward the lower flat index (``torch.topk`` alone does not say
which of equal values it returns); randk depends only on ``seed`` (for a given torch build); int8, fp16
and nf4 are deterministic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fedsim.config import ConfigError
from fedsim.messages import FlatLayout, NamedTensors

KINDS = ("none", "topk", "randk", "int8", "fp16", "nf4")
SPARSE = ("topk", "randk")
BLOCK = 64


def _check(kind: str, density: float) -> None:
    """Refuse a kind or (for sparse kinds) a density that the config should not have let through."""
    if kind not in KINDS:
        raise ConfigError(f"compression.kind: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind in SPARSE and not (0.0 < density <= 1.0):  # also refuses NaN
        raise ConfigError(f"compression.density: {density!r} is not in (0, 1] (the fraction of coordinates "
                          f"that {kind} sends)")


def sent_count(numel: int, density: float) -> int:
    """k, the coordinates a sparse kind sends out of ``numel``: ceil(density * numel), at least 1, at most numel.

    The product is rounded to 6 decimals first, so that float error (0.07 * 100 = 7.000000000000001) does not
    add a coordinate.
    """
    if numel <= 0:
        return 0
    return min(numel, max(1, math.ceil(round(density * numel, 6))))


def payload_bytes(kind: str, numel: int, density: float = 1.0) -> int:
    """Bytes the encoding of ``numel`` values would send (see the module docstring for the formulas)."""
    _check(kind, density)
    d = int(numel)
    if d < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    scales = 4 * math.ceil(d / BLOCK)  # one float32 absmax per 64-block
    if kind == "none":
        return 4 * d
    if kind == "fp16":
        return 2 * d
    if kind == "int8":
        return d + scales
    if kind == "nf4":
        return math.ceil(d / 2) + scales
    k = sent_count(d, density)
    return 4 * k + min(4 * k, math.ceil(d / 8))  # values + the cheaper of int32 indices and a bitmap


def _check_residual(layout: FlatLayout, residual: NamedTensors) -> None:
    """A residual must have the delta's names and shapes: anything else is a client-state bug, named here."""
    for name in residual:
        if name not in layout.shapes:
            raise ValueError(f"compression residual has tensor {name!r}, which the delta does not have")
    for name, shape in layout.shapes.items():
        if name not in residual:
            raise ValueError(f"compression residual lacks tensor {name!r} of the delta")
        if residual[name].shape != shape:
            raise ValueError(f"compression residual tensor {name!r} has shape {tuple(residual[name].shape)}, "
                             f"the delta's has {tuple(shape)}")


def _topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest |x|, ties at the threshold going to the lowest indices.

    ``torch.topk`` fixes the k-th largest magnitude (its values are well defined even when its indices
    are not); everything strictly above is kept, and the remaining places go to the first equal ones.
    O(d), unlike a full stable sort.
    """
    mag = x.abs()
    if k >= x.numel():
        return torch.ones_like(x, dtype=torch.bool)
    threshold = torch.topk(mag, k, sorted=False).values.min()
    mask = mag > threshold
    ties = torch.nonzero(mag == threshold).flatten()[: k - int(mask.sum())]
    mask[ties] = True
    return mask


def _int8(x: torch.Tensor) -> torch.Tensor:
    """Per-64-block absmax int8 round trip (the last block zero-padded); an all-zero block stays zero."""
    d = x.numel()
    blocks = F.pad(x, (0, (-d) % BLOCK)).view(-1, BLOCK)
    scale = blocks.abs().amax(dim=1, keepdim=True)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block quantizes to 0 anyway
    q = torch.round(blocks / scale * 127).clamp_(-127, 127)
    return (q * scale / 127).reshape(-1)[:d]


def _nf4(x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 round trip, 64-value blocks, no double quantization.

    Imported here: bitsandbytes takes seconds to import and only this kind needs it. It quantizes float32
    CPU tensors (checked with 0.50); ``dequantize_4bit`` may hand a 1-D input back as (1, d), hence reshape.
    """
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    packed, state = quantize_4bit(x.contiguous(), blocksize=BLOCK, compress_statistics=False, quant_type="nf4")
    return dequantize_4bit(packed, state).to(torch.float32).reshape(-1)


def compress(delta: NamedTensors, kind: str, density: float = 1.0, residual: NamedTensors | None = None,
             error_feedback: bool = True, seed: int = 0) -> tuple[NamedTensors, NamedTensors | None]:
    """Encode ``delta`` with ``kind`` and return (what the server receives, the client's new residual or None).

    The received tensors are float32 CPU, with the delta's names and shapes. The new residual is returned
    only for sparse kinds with ``error_feedback`` (``residual`` None counts as zeros); otherwise ``residual``
    is ignored and None returned. ``seed`` drives randk's positions only (the caller derives it per
    (round, client)). Inputs are never modified; outputs are fresh tensors that share no storage with each
    other (so they can be saved with safetensors or shipped one by one), except that ``none`` returns the
    delta's own tensors when they already are float32 CPU.
    """
    _check(kind, density)
    if kind == "none":
        return {name: t.detach().to("cpu", torch.float32) for name, t in delta.items()}, None

    layout = FlatLayout(delta)
    d = layout.numel
    x = layout.flatten(delta, torch.empty(d, dtype=torch.float32))  # a fresh copy: safe to work in place

    def unflat(flat: torch.Tensor) -> NamedTensors:
        return {name: layout.view(flat, name).clone() for name in layout.shapes}

    if kind == "fp16":
        return unflat(x.half().float()), None
    if kind == "int8":
        return unflat(_int8(x)), None
    if kind == "nf4":
        return unflat(_nf4(x) if d else x), None

    if error_feedback and residual is not None:
        _check_residual(layout, residual)
        x += layout.flatten(residual, torch.empty(d, dtype=torch.float32))
    k = sent_count(d, density)
    if kind == "topk":
        mask = _topk_mask(x, k)
    else:
        generator = torch.Generator().manual_seed(seed)
        mask = torch.zeros(d, dtype=torch.bool)
        mask[torch.randperm(d, generator=generator)[:k]] = True
    sent = torch.where(mask, x, torch.zeros_like(x))
    if not error_feedback:
        if kind == "randk" and k:
            sent *= d / k  # unbiased: each coordinate is sent with probability k/d
        return unflat(sent), None
    return unflat(sent), unflat(x.masked_fill_(mask, 0.0))  # x - sent, exactly: kept places become 0
