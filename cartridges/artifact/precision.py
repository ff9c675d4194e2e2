"""How an artifact stores its prefix on disk: float32 (the default, what PEFT loads as is), float16,
or int8 with one scale per channel (a column of the flattened prefix: one layer's K or V, one head,
one dimension), dequantised on load. The manifest's `dtype` names the precision; whatever it is,
a loaded cartridge's prefix is float32 and the runtime casts it to the model's dtype.
"""

import torch

from cartridges.artifact.integrity import SCALE_SUFFIX, dequantize
from cartridges.artifact.manifest import PRECISIONS, Precision
from cartridges.errors import CartridgeError

__all__ = ["PRECISIONS", "Precision", "decode", "encode"]


def encode(key: str, prefix: torch.Tensor, precision: str) -> dict[str, torch.Tensor]:
    """The tensors that store `prefix` [tokens, channels] under `key` at `precision`."""
    if precision not in PRECISIONS:
        raise CartridgeError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    prefix = prefix.detach().to("cpu")  # a float16 prefix stored at float16 is not copied through float32
    if precision == "int8":
        prefix = prefix.to(torch.float32)
        scale = prefix.abs().amax(dim=0).clamp_min(torch.finfo(torch.float32).tiny) / 127.0
        quantized = torch.round(prefix / scale).clamp(-127, 127).to(torch.int8)
        return {key: quantized.contiguous(), key + SCALE_SUFFIX: scale.contiguous()}
    return {key: prefix.to(getattr(torch, precision)).contiguous()}


def decode(key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 prefix that `encode` stored (the dequantisation `integrity` checks on load)."""
    stored = tensors[key]
    scales = tensors[key + SCALE_SUFFIX].numpy() if stored.dtype == torch.int8 else None
    return torch.from_numpy(dequantize(stored.numpy(), scales))
