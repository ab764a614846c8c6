"""GGUF block formats kept quantized: their numpy dequantization, which defines them.

A weight in one of these formats is a QuantizedWeight whose data is the file's raw block bytes,
(rows, bytes_per_row) uint8: each row is its own run of blocks, so rows can be permuted,
concatenated and gathered without touching a block. The cuda kernels (cuda/gguf.cu) are held to
the functions below bit for bit in float32.

NOTE: the arithmetic follows gguf.quants (and llama.cpp) step by step, each product and sum
rounded to float32 on its own: scales d (and mins m) are float16, values are
    Q8_0  q * d                      Q4_0  d * (q - 8)           Q4_1  d * q + m
    Q4_K / Q5_K  (d * sc) * q - (dmin * mn)                      Q6_K  (d * sc) * (q - 32)
with 6-bit sc/mn per 32 values (K-quants) or int8 sc per 16 values (Q6_K).
"""

from __future__ import annotations

import numpy as np

from engine.model.quantized import QuantizedWeight, register_format

QK_K = 256
# kind -> (values per block, bytes per block)
BLOCKS = {
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q4_K": (QK_K, 144),
    "Q5_K": (QK_K, 176),
    "Q6_K": (QK_K, 210),
}
KINDS = tuple(BLOCKS)


# byte offsets in a block of its float16 scales (d; then dmin, or Q4_1's m)
SCALES_AT = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2),
             "Q6_K": (208,)}


def nonfinite_scale(kind: str, data: np.ndarray) -> tuple[int, int, float] | None:
    """(row, block in the row, value) of the first float16 scale that is inf or NaN in blocks
    data (rows, bytes_per_row), else None. Such a block has no values (inf * 0 is NaN) and the
    kernels' factored products and the twin's disagree on it (inf or NaN): the loaders refuse
    it once, as llama.cpp's ggml_validate_row_data, instead of the products checking."""
    nbytes = BLOCKS[kind][1]
    blocks = np.asarray(data).reshape(-1, nbytes)
    bad = np.zeros(len(blocks), bool)
    for at in SCALES_AT[kind]:
        bad |= (blocks[:, at + 1] & 0x7C) == 0x7C  # the exponent bits of the high byte all set
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    per_row = np.asarray(data).shape[-1] // nbytes
    value = next(v for v in (float(_f16(blocks[i:i + 1], at)[0, 0]) for at in SCALES_AT[kind])
                 if not np.isfinite(v))
    return i // per_row, i % per_row, value


def row_bytes(kind: str, cols: int) -> int:
    """Bytes of one packed row of `cols` values."""
    values, nbytes = BLOCKS[kind]
    if cols % values:
        raise ValueError(f"{kind} rows hold multiples of {values} values, got {cols}")
    return cols // values * nbytes


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """(n, 1) float32 from the float16 at byte `at` of each block."""
    return np.ascontiguousarray(blocks[:, at : at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, group: int) -> np.ndarray:
    """(n, bytes) -> (n, 2 * bytes) uint8: per run of `group` bytes, its low nibbles then its
    high nibbles (the order GGUF packs 4-bit values in)."""
    n = qs.shape[0]
    runs = qs.reshape(n, -1, 1, group) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (runs & np.uint8(0x0F)).reshape(n, -1)


def _q8_0(b: np.ndarray) -> np.ndarray:
    q = np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)  # (n, 32)
    return q * _f16(b, 0)


def _q4_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 2:], 16).astype(np.float32) - np.float32(8)  # (n, 32), exact
    return _f16(b, 0) * q


def _q4_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 4:], 16).astype(np.float32)
    return _f16(b, 0) * q + _f16(b, 2)


def k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 packed bytes of a Q4_K/Q5_K block -> (sc, mn), (n, 8) uint8 each, 6 bits:
    sub-block j < 4 takes the low 6 bits of bytes j (sc) and j + 4 (mn); j >= 4 takes the nibbles
    of byte j + 4 as low bits and the top 2 bits of bytes j - 4 (sc) and j (mn) as high bits."""
    s = scales.astype(np.uint8)
    lo, hi, mix = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (mix & 0x0F) | ((lo >> 6) << 4)], axis=1)
    mn = np.concatenate([hi & 0x3F, (mix >> 4) | ((hi >> 6) << 4)], axis=1)
    return sc, mn


def _k_affine(b: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(d * sc) * q - (dmin * mn) for Q4_K/Q5_K blocks; q (n, 8, 32) float32."""
    n = b.shape[0]
    sc, mn = k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc.astype(np.float32))[:, :, None]  # (n, 8, 1)
    dm = (_f16(b, 2) * mn.astype(np.float32))[:, :, None]
    return (d * q - dm).reshape(n, QK_K)


def _q4_k(b: np.ndarray) -> np.ndarray:
    q = _nibbles(b[:, 16:], 32).reshape(-1, 8, 32).astype(np.float32)
    return _k_affine(b, q)


def _q5_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    low = _nibbles(b[:, 48:], 32).reshape(n, 8, 32)
    # bit j of qh byte l is the fifth bit of value l of sub-block j
    high = (b[:, None, 16:48] >> np.arange(8, dtype=np.uint8)[None, :, None]) & np.uint8(1)
    return _k_affine(b, (low | (high << np.uint8(4))).astype(np.float32))


def q6_k_quants(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K blocks (n, 210) -> (q - 32 (n, 256) int8, scales (n, 16) int8, one per 16 values)."""
    n = b.shape[0]
    # two halves of 128 values; in half h value v has its low 4 bits in ql byte 64h + v % 64
    # (low nibble for v < 64) and its high 2 bits at bit 2 * (v // 32) of qh byte 32h + v % 32
    low = _nibbles(b[:, :128], 64).reshape(n, 2, 128)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    high = (qh & np.uint8(3)).reshape(n, 2, 128)
    q = (low | (high << np.uint8(4))).astype(np.int8) - np.int8(32)
    return q.reshape(n, QK_K), np.ascontiguousarray(b[:, 192:208]).view(np.int8)


def _q6_k(b: np.ndarray) -> np.ndarray:
    n = b.shape[0]
    q, sc = q6_k_quants(b)
    d = (_f16(b, 208) * sc.astype(np.float32))[:, :, None]  # (n, 16, 1): one scale per 16 values
    return (d * q.astype(np.float32).reshape(n, 16, 16)).reshape(n, QK_K)


_BLOCK_FNS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1,
              "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize_gguf(weight: QuantizedWeight) -> np.ndarray:
    """(rows, cols) float32 from (rows, bytes_per_row) uint8 blocks."""
    rows, cols = weight.shape
    data = np.asarray(weight.data)
    if data.dtype != np.uint8 or data.shape != (rows, row_bytes(weight.kind, cols)):
        raise ValueError(f"{weight.kind} weight {weight.shape}: data must be uint8 of shape "
                         f"{(rows, row_bytes(weight.kind, cols))}, got {data.dtype} {data.shape}")
    nbytes = BLOCKS[weight.kind][1]
    blocks = np.ascontiguousarray(data).reshape(-1, nbytes)
    return _BLOCK_FNS[weight.kind](blocks).reshape(rows, cols)


def gather_rows(weight: QuantizedWeight, ids: np.ndarray) -> np.ndarray:
    """(len(ids), cols) float32: only the rows asked for are dequantized (embeddings)."""
    data = np.asarray(weight.data)[ids]
    return dequantize_gguf(QuantizedWeight(weight.kind, (len(data), weight.shape[1]), data))


def random_blocks(kind: str, shape: tuple[int, int], std: float, rng: np.random.Generator,
                  random_scales: bool = False) -> np.ndarray:
    """(rows, bytes_per_row) uint8 of random blocks whose values spread about like N(0, std):
    random quant bits, with the float16 scales set so the values stay finite (dummy weights).
    random_scales: each block's scales drawn at random too (finite; twin tests)."""
    rows, cols = shape
    values, nbytes = BLOCKS[kind]
    n = rows * cols // values
    b = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)

    def put(at: int, scale: float):
        spread = rng.uniform(-2, 2, (n, 1)) if random_scales else np.ones((n, 1))
        b[:, at : at + 2] = (spread * scale).astype(np.float16).view(np.uint8)

    # the spread of the quants times d is about std: q uniform over 2^bits levels
    if kind == "Q8_0":
        put(0, std / 74)
    elif kind in ("Q4_0", "Q4_1"):
        put(0, std / 4.6)
        if kind == "Q4_1":
            put(2, -7.5 * std / 4.6)
    elif kind in ("Q4_K", "Q5_K"):
        levels = 16 if kind == "Q4_K" else 32
        d = std / (levels * 0.29 * 56)  # 6-bit sc and mn average ~32
        put(0, d)
        put(2, d * (levels - 1) / 2)  # centres the values
    else:  # Q6_K: int8 scales, kept small and positive unless random_scales
        if not random_scales:
            b[:, 192:208] = rng.integers(8, 24, (n, 16), dtype=np.uint8)
        put(208, std / (18.5 * 16 * 1.15))
    return b.reshape(rows, -1)


for _kind in KINDS:
    register_format(_kind, dequantize_gguf)
