"""Weights kept in a quantized format, as the loaders hand them to the backends.

A QuantizedWeight stands for one float matrix (out_features, in_features) stored the way its format
stores it: FP8 values with per-output-channel scales, or GGUF's packed blocks. Its exact meaning is
the format's numpy dequantization, registered below by the module that owns the format; both
backends are held to it (numpy dequantizes per call, the cuda backend runs fused kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class QuantizedWeight:
    kind: str  # "fp8", or a GGUF type name: "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"
    shape: tuple[int, int]  # (out_features, in_features) of the float matrix it stands for
    data: object  # the packed values, laid out as the format stores them (host or device array)
    scale: object | None = None  # formats with scales outside the blocks (fp8: (out,) float32)
    # GGUF formats with an int8-activation product (gguf_dot.KINDS): whether products with this
    # weight quantize x (False: the lm_head, gguf_dot.lm_head)
    quantize_x: bool = True

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes) + (0 if self.scale is None else int(self.scale.nbytes))


_DEQUANTIZE: dict[str, Callable[[QuantizedWeight], np.ndarray]] = {}


def register_format(kind: str, dequantize: Callable[[QuantizedWeight], np.ndarray]) -> None:
    """Called once by the module that owns `kind`: its numpy dequantization defines the format."""
    _DEQUANTIZE[kind] = dequantize


def dequantize(weight: QuantizedWeight) -> np.ndarray:
    """(out_features, in_features) float32 on the host."""
    try:
        fn = _DEQUANTIZE[weight.kind]
    except KeyError:
        raise ValueError(f"no dequantization registered for weight kind {weight.kind!r}") from None
    return fn(weight)
