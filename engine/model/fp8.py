"""FP8 (E4M3) weights and W8A8 matrix products: the numpy definition the cuda kernels are held to.

E4M3 ("float8_e4m3fn"): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities, one NaN code
per sign (S.1111.111); largest finite 448, smallest subnormal 2^-9.

    encode(x)        round to nearest even; |x| beyond 448 (and +-inf) saturates to +-448; NaN ->
                     0x7F (what CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3) does)
    quantize_rows(x) per row: s = absmax / 448 (NaN left out of absmax; s = 1 where that is 0 or
                     subnormal: an all-zero row, or one so tiny that 1 / s would overflow to inf
                     and 0 * inf give NaN codes), q = encode(x * (1 / s))
                     (the reciprocal rounded, then one rounded product: vLLM's order, and a
                     multiply, not a division, per value on the GPU); for weights a row is an
                     output channel, for activations a token
    fp8_linear(x, w) y[t, o] = (sum_i dec(qx[t, i]) * dec(qw[o, i])) * sx[t] * sw[o],
                     products of decoded values exact in float32, sums accumulated in float32

The four matrix products of each layer (qkv, o, gate_up, down) are FP8; the lm_head stays in the
compute dtype unless PAGEDSERVE_FP8_LM_HEAD=1 (LM_HEAD below), and so does the embedding.
"""

from __future__ import annotations

import os

import numpy as np

from engine.model.quantized import QuantizedWeight, register_format

E4M3_MAX = 448.0
NAN_CODE = 0x7F
MAX_CODE = 0x7E  # 448
# The lm_head stays in the compute dtype under --quantization fp8, as vLLM's FP8 leaves it: its
# FP8 copy (W8A8 like the layers; model/loader.fp8_lm_head) is one more FP8 product on the logits
# themselves: the tiny models' logits move by 3.4% and their top token differs from the 16-bit
# lm_head's at up to 3% of positions (tests/test_fp8.py). PAGEDSERVE_FP8_LM_HEAD=1 opts in: on the
# H200 it takes Llama-3-8B batch-1 decode from 2.85 to 2.74 ms/token (1 GB less read per token).
LM_HEAD = os.environ.get("PAGEDSERVE_FP8_LM_HEAD", "0") == "1"


def _decode_table() -> np.ndarray:
    """(256,) float32: the value of every E4M3 code."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp, man = (codes >> 3) & 0xF, codes & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = np.where((codes & 0x7F) == NAN_CODE, np.nan, sign * value)
    return value.astype(np.float32)


DECODE = _decode_table()


def decode(q: np.ndarray) -> np.ndarray:
    """uint8 E4M3 codes -> float32, exactly."""
    return DECODE[q]


def encode(x: np.ndarray) -> np.ndarray:
    """float32 -> uint8 E4M3 codes: round to nearest even, saturating at +-448, NaN -> 0x7F."""
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32)
    sign = ((bits >> 24) & 0x80).astype(np.uint8)
    mag = bits & 0x7FFFFFFF
    # Normal E4M3 (|x| >= 2^-6): keep 3 of float32's 23 mantissa bits, rounding to nearest even by
    # adding just under half an ulp plus the lowest kept bit, then rebias the exponent 127 -> 7.
    rounded = (mag + 0x7FFFF + ((mag >> 20) & 1)) >> 20
    normal = rounded.astype(np.int64) - (120 << 3)
    # Subnormal E4M3 (|x| < 2^-6): multiples of 2^-9; rint rounds halves to even. A value that
    # rounds up to 2^-6 gives code 8, the smallest normal, as it should.
    sub = np.rint(np.fmin(np.abs(x), 1.0) * np.float32(512.0)).astype(np.int64)  # fmin: NaN -> 1
    code = np.where(mag < 0x3C800000, sub, normal)  # 0x3C800000 = 2^-6
    code = np.minimum(code, MAX_CODE).astype(np.uint8)  # saturate (infinities too)
    code = np.where(np.isnan(x), np.uint8(NAN_CODE), code | sign)
    return code.astype(np.uint8)


def quantize_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (rows, K) float -> (codes (rows, K) uint8, scales (rows,) float32); x ~ dec(q) * s."""
    x = np.asarray(x, np.float32)
    # fmax: a NaN is left out of the absmax, as the kernels' fmaxf leaves it (it encodes as the
    # NaN code, and the product is NaN either way); np.max made the scale NaN and every code NaN
    absmax = np.fmax.reduce(np.abs(x), axis=1, initial=np.float32(0))
    scale = (absmax / np.float32(E4M3_MAX)).astype(np.float32)
    # an all-zero row (e.g. padding): any scale encodes it as zeros. A subnormal scale (absmax
    # below 448 * 2^-126) is taken as 1 too: its reciprocal can overflow to inf, and 0 * inf
    # would encode the row's zeros as NaN; at scale 1 such a row encodes as zeros
    scale[scale < np.finfo(np.float32).tiny] = 1.0
    # x times the scale's reciprocal (one rounding each), as vLLM's quantization kernels do: a
    # multiply a value, not a division, on the GPU
    inv = (np.float32(1.0) / scale).astype(np.float32)
    return encode(x * inv[:, None]), scale


def quantize_weight(w: np.ndarray) -> QuantizedWeight:
    """(out, in) float -> an "fp8" QuantizedWeight with per-output-channel scales."""
    data, scale = quantize_rows(w)
    return QuantizedWeight("fp8", tuple(w.shape), data, scale)


def fp8_linear(x: np.ndarray, weight: QuantizedWeight) -> np.ndarray:
    """x (T, in) float -> (T, out) float32: W8A8 with per-token dynamic activation scales."""
    qx, sx = quantize_rows(x)
    acc = decode(qx) @ decode(weight.data).T  # float32 products and sums
    return acc * sx[:, None] * np.asarray(weight.scale, np.float32)[None, :]


def dequantize_fp8(weight: QuantizedWeight) -> np.ndarray:
    return decode(weight.data) * np.asarray(weight.scale, np.float32)[:, None]


register_format("fp8", dequantize_fp8)


def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Weights fused by rows (q/k/v, gate/up): codes and per-channel scales concatenated."""
    data = np.concatenate([p.data for p in parts])
    scale = np.concatenate([p.scale for p in parts])
    return QuantizedWeight("fp8", (len(data), parts[0].shape[1]), data, scale)


def from_checkpoint(name: str, data: np.ndarray, scale: np.ndarray) -> QuantizedWeight:
    """A weight stored as float8_e4m3fn (its bytes as uint8) with its `weight_scale`: one scale per
    tensor (shape () or (1,)) or per output channel ((out,) or (out, 1))."""
    out = data.shape[0]
    scale = np.asarray(scale, np.float32)
    # a 2-D scale other than (out, 1) is block-wise (out / B, in / B), even when it happens to
    # hold `out` values (in = 128 * B): read as per-channel it would scale the wrong rows
    blockwise = scale.ndim > 2 or (scale.ndim == 2 and scale.shape[1] != 1 and scale.size != 1)
    scale = scale.reshape(-1)
    if not np.isfinite(scale).all():  # checked once here: the kernels multiply it as it is
        row = int(np.argmin(np.isfinite(scale)))
        raise ValueError(f"{name}_scale holds {scale[row]} (value {row}): a damaged checkpoint "
                         "(every token's output on its rows would be NaN or inf)")
    if scale.size == 1:
        scale = np.full(out, scale[0], np.float32)
    elif scale.size != out or blockwise:
        raise ValueError(f"{name}_scale has {scale.size} values; an FP8 weight of {out} rows "
                         "takes 1 (per tensor) or one per row, (out,) or (out, 1) (block-wise "
                         "scales are not supported)")
    return QuantizedWeight("fp8", tuple(data.shape), np.ascontiguousarray(data, np.uint8),
                           np.ascontiguousarray(scale))
