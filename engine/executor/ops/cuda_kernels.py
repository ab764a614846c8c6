"""Compiles the kernels in cuda/*.cu with NVRTC (cupy.RawModule), each variant once.

A kernel is asked for by file and C++ name, e.g. kernel("rms_norm.cu", "rms_norm_kernel<__half>").
All the template instances a file needs are compiled together on first use and cached.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

# numpy storage dtype name -> the C++ element type the kernels are instantiated with
CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
HEAD_DIMS = (64, 128)
DECODE_GROUPS = (1, 2, 4, 8)  # query heads per decode block (template G); larger groups take passes
DECODE_UNROLL = 2  # 16-byte K and V loads per lane in flight (U); 2 beat 4 and 8 on the H200
# attention_prefill_gqa.cu's (MI, NW, BN) variants, which cuda_prefill.prefill_plan picks among
PREFILL_CONFIGS = ((2, 8, 64), (2, 4, 64), (1, 8, 64), (1, 4, 64))
# attention_prefill_sm90.cu's (MI, NW, BN, ST, PVW: P V on wgmma too), experimental
SM90_CONFIGS = ((2, 8, 64, 2, 1), (1, 8, 64, 2, 1), (2, 8, 64, 3, 1), (2, 8, 64, 2, 0),
                (1, 8, 64, 2, 0))
# attention_prefill_sm90p.cu's (pipelined, experimental), in the same form: only NW varies
SM90P_CONFIGS = ((1, 8, 64, 4, 1), (1, 12, 64, 4, 1))
# wgmma needs sm_90a, an arch CuPy's RawModule cannot ask NVRTC for: these compile by _sm90a_module
SM90A_FILES = ("attention_prefill_sm90.cu", "attention_prefill_sm90p.cu")


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
    if file == "kv_cache.cu":
        return [f"write_kv_cache_kernel<{ctype}>"]
    if file == "attention.cu":
        return ([f"decode_attention_kernel<{ctype}, {d}, {g}, {DECODE_UNROLL}>"
                 for d in HEAD_DIMS for g in DECODE_GROUPS]
                + [f"decode_reduce_kernel<{ctype}, {d}>" for d in HEAD_DIMS])
    if file == "attention_prefill.cu":
        return [f"prefill_attention_kernel<{ctype}, {d}>" for d in HEAD_DIMS]
    if file == "attention_prefill_gqa.cu":
        return [f"prefill_gqa_kernel<{ctype}, {d}, {', '.join(map(str, c))}>" for d in HEAD_DIMS
                for c in PREFILL_CONFIGS]
    if file == "attention_prefill_sm90.cu":
        return [f"prefill_sm90_kernel<{ctype}, {d}, {', '.join(map(str, c))}>" for d in HEAD_DIMS
                for c in SM90_CONFIGS]
    if file == "attention_prefill_sm90p.cu":
        return [f"prefill_sm90p_kernel<{ctype}, {d}, {c[1]}>" for d in HEAD_DIMS
                for c in SM90P_CONFIGS]
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
    if file in SM90A_FILES:
        return _sm90a_module(folder, file, names), frozenset(names)
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


class _LoweredModule:
    """A cubin loaded as a cupy.RawModule whose kernels are found by their NVRTC lowered names."""

    def __init__(self, module, lowered: dict[str, str]):
        self.module, self.lowered = module, lowered

    def get_function(self, name: str):
        return self.module.get_function(self.lowered[name])


def _sm90a_module(folder: Path, file: str, names: list[str]) -> _LoweredModule:
    """NVRTC straight from CuPy's bindings with -arch=sm_90a (RawModule appends the device's plain
    sm_90), with the include options RawModule would pass."""
    import cupy

    nvrtc = cupy.cuda.nvrtc  # CuPy's NVRTC bindings (cupy_backends.cuda.libs.nvrtc)
    options = ("-std=c++17", f"-I{folder}", "-ftz=true")
    try:
        from cupy._core.core import assemble_cupy_compiler_options

        options = assemble_cupy_compiler_options(options)
    except ImportError:  # an older CuPy: the toolkit's headers
        options += (f"-I{Path(cupy.cuda.get_cuda_path() or '/usr/local/cuda') / 'include'}",)
    prog = nvrtc.createProgram((folder / file).read_text(), file, (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, options + ("-arch=sm_90a",))
        except nvrtc.NVRTCError as e:
            raise RuntimeError(f"NVRTC (sm_90a) failed on {file}:\n"
                               f"{nvrtc.getProgramLog(prog)}") from e
        cubin = nvrtc.getCUBIN(prog)
        lowered = {name: nvrtc.getLoweredName(prog, name) for name in names}
    finally:
        nvrtc.destroyProgram(prog)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        module = cupy.RawModule(path=f.name)
        module.get_function(lowered[names[0]])  # loads the file now
    finally:
        os.unlink(f.name)
    return _LoweredModule(module, lowered)
