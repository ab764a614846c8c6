"""Compiles the kernels in cuda/*.cu with NVRTC (cupy.RawModule), each variant once.

A kernel is asked for by file and C++ name, e.g. kernel("rms_norm.cu", "rms_norm_kernel<__half>").
All the template instances a file needs are compiled together on first use and cached.
"""

from __future__ import annotations

import functools
from pathlib import Path

# numpy storage dtype name -> the C++ element type the kernels are instantiated with
CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
HEAD_DIMS = (64, 128)
DECODE_GROUPS = (1, 2, 4, 8)  # query heads per decode block (template G); larger groups take passes
DECODE_UNROLL = 2  # 16-byte K and V loads per lane in flight (U); 2 beat 4 and 8 on the H200


def cuda_dir() -> Path:
    """The .cu sources: engine/cuda/ inside an installed wheel, else the checkout's cuda/."""
    here = Path(__file__).resolve().parents[2]  # the engine package
    for candidate in (here / "cuda", here.parent / "cuda"):
        if (candidate / "common.cuh").is_file():
            return candidate
    raise FileNotFoundError(
        f"CUDA kernel sources not found in {here / 'cuda'} or {here.parent / 'cuda'}")


def kernel_names(file: str, ctype: str) -> list[str]:
    """Every kernel instance of `file` for the compute type `ctype`."""
    if file == "gather.cu":
        return ["gather_rows_kernel", "resolve_placeholders_kernel", f"from_float_kernel<{ctype}>"]
    if file == "activation.cu":
        return [f"silu_and_mul_kernel<{ctype}>", f"add_bias_kernel<{ctype}>"]
    if file == "rms_norm.cu":
        return [f"rms_norm_kernel<{ctype}>"] + [f"qk_norm_kernel<{ctype}, {d}>" for d in HEAD_DIMS]
    if file == "rope.cu":
        return [f"rope_kernel<{ctype}, {ctype}>", f"rope_kernel<{ctype}, float>"]
    if file == "qk_rope_kv.cu":
        return [f"qk_norm_rope_kv_kernel<{ctype}, {cs}, {d}>" for cs in (ctype, "float")
                for d in HEAD_DIMS]
    if file == "gemv.cu":
        return ([f"gemv_kernel<{ctype}, {m}, false>" for m in range(1, 9)]
                + [f"gemv_kernel<{ctype}, {m}, true>" for m in range(1, 5)]
                + [f"norm_gemv_kernel<{ctype}, {m}>" for m in range(1, 5)])
    if file == "fp8.cu":
        return ([f"fp8_{k}_kernel<{ctype}>" for k in ("quantize", "silu_quantize",
                                                      "norm_quantize", "scale")]
                + [f"fp8_gemv_kernel<{ctype}, {m}>" for m in range(1, 9)])
    if file == "fp8_fused.cu":
        return [f"fp8_fused_gemv_kernel<{ctype}, {p}, 8>" for p in range(3)]
    if file == "kv_cache.cu":
        return [f"write_kv_cache_kernel<{ctype}>"]
    if file == "attention.cu":
        return ([f"decode_attention_kernel<{ctype}, {d}, {g}, {DECODE_UNROLL}>"
                 for d in HEAD_DIMS for g in DECODE_GROUPS]
                + [f"decode_reduce_kernel<{ctype}, {d}>" for d in HEAD_DIMS])
    if file == "attention_prefill.cu":
        return [f"prefill_attention_kernel<{ctype}, {d}>" for d in HEAD_DIMS]
    if file == "bitmask.cu":
        return [f"apply_token_bitmask_kernel<{t}>" for t in CTYPES.values()]
    if file == "sampling.cu":
        return (["penalty_counts_kernel", "add_logit_bias_kernel"]
                + [f"adjust_logits_kernel<{t}>" for t in CTYPES.values()]
                + [f"sample_kernel<{t}>" for t in CTYPES.values()])
    if file == "sampling_bisect.cu":
        return [f"sample_bisect_kernel<{t}>" for t in CTYPES.values()]
    raise KeyError(file)


@functools.cache
def _module(file: str, ctype: str):
    """(cupy.RawModule, its kernel names); cupy is imported here, so kernel_names works without."""
    import cupy

    folder = cuda_dir()
    names = kernel_names(file, ctype)
    module = cupy.RawModule(
        code=(folder / file).read_text(),
        options=("-std=c++17", f"-I{folder}"),
        name_expressions=names,
    )
    module.compile()
    return module, frozenset(names)


@functools.cache
def kernel(file: str, name: str, ctype: str = "float"):
    """The compiled kernel `name` from cuda/`file`; ctype picks the module's instantiation set."""
    module, names = _module(file, ctype)
    if name not in names:
        raise ValueError(f"kernel {name!r} is not a compiled variant of {file}: {sorted(names)}")
    return module.get_function(name)
