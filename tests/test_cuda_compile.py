"""Every cuda/*.cu compiles with nvcc for sm_80 and sm_90 (no GPU needed; skipped without nvcc).

The files are templates that CuPy instantiates by name at run time; PAGEDSERVE_NVCC_CHECK turns on
explicit instantiations so that nvcc compiles real code here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parent.parent / "cuda"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")


def test_sources_exist():
    names = {p.name for p in SOURCES}
    assert {"attention.cu", "sampling.cu", "rms_norm.cu", "rope.cu", "kv_cache.cu"} <= names


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_compiles(source, arch, tmp_path):
    result = subprocess.run(
        [NVCC, "-std=c++17", f"-arch={arch}", "-DPAGEDSERVE_NVCC_CHECK", "-ptx",
         "-o", str(tmp_path / "out.ptx"), str(source)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_every_named_instance_compiles(source, tmp_path):
    """The exact instances CuPy asks NVRTC for (cuda_kernels.kernel_names, fp16 and bf16)
    compile for sm_90: taking each one's address instantiates it, so a name that matches no
    template fails here."""
    from engine.executor.ops.cuda_kernels import kernel_names

    names = dict.fromkeys(
        n for c in ("__half", "__nv_bfloat16") for n in kernel_names(source.name, c))
    body = "".join(f"  (void)&{name};\n" for name in names)
    unit = tmp_path / "unit.cu"
    unit.write_text(f'#include "{source}"\nvoid pagedserve_instances() {{\n{body}}}\n')
    result = subprocess.run(
        [NVCC, "-std=c++17", "-arch=sm_90", f"-I{CUDA_DIR}", "-ptx", "-o",
         str(tmp_path / "u.ptx"), str(unit)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("name", ["attention_prefill_sm90.cu", "gemm_sm90.cu"])
def test_wgmma_kernels_compile_for_sm90a(name, tmp_path):
    """A wgmma kernel's body exists only for sm_90a: compile it there through ptxas, which
    checks the wgmma operands, and hold it to what its design needs: no spills, and no wgmma
    that ptxas serialized (its warnings C7510..C7515), no register reallocation it ignored."""
    result = subprocess.run(
        [NVCC, "-std=c++17", "-arch=sm_90a", "-DPAGEDSERVE_NVCC_CHECK", "-Xptxas", "-v",
         "-cubin", "-o", str(tmp_path / "out.cubin"), str(CUDA_DIR / name)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    spills = [line for line in result.stderr.splitlines() if "spill stores" in line]
    assert spills and all(" 0 bytes spill stores" in line for line in spills), result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr  # e.g. C7508: setmaxnreg ignored
    assert "C751" not in result.stderr, result.stderr  # e.g. C7515: wgmma serialized


def test_source_key_changes_with_a_header(tmp_path):
    """CuPy caches kernels by source text: the text handed to it carries a digest of cuda/*.cuh,
    so a changed header alone recompiles."""
    from engine.executor.ops.cuda_kernels import source

    (tmp_path / "k.cu").write_text('#include "h.cuh"\n')
    (tmp_path / "h.cuh").write_text("#define A 1\n")
    before = source(tmp_path, "k.cu")
    assert before.startswith('#include "h.cuh"\n')
    assert source(tmp_path, "k.cu") == before
    (tmp_path / "h.cuh").write_text("#define A 2\n")
    assert source(tmp_path, "k.cu") != before


def test_decode_mma_names_take_the_transposed_tiles_for_8_heads(monkeypatch):
    """cuda_kernels.DECODE_MMA_TR picks the instance the engine launches and the one compiled;
    the transposed tiles exist only for blocks of 8 query heads."""
    from engine.executor.ops import cuda_kernels as ck

    bf16 = "__nv_bfloat16"
    monkeypatch.setattr(ck, "DECODE_MMA_TR", "2")
    monkeypatch.setattr(ck, "DECODE_MMA_TMA", "0")  # (the stages by cp.async: names below)
    assert ck.decode_mma_name(bf16, 128, 8, 6, 2) == f"decode_mma_kernel<{bf16}, 128, 8, 6, 2, 2>"
    assert ck.decode_mma_name(bf16, 128, 16, 6, 2) == f"decode_mma_kernel<{bf16}, 128, 16, 6, 2>"
    names = ck.kernel_names("attention_decode_mma.cu", bf16)
    assert f"decode_mma_kernel<{bf16}, 64, 8, 4, 2, 2>" in names
    assert f"decode_mma_kernel<{bf16}, 64, 8, 4, 2>" not in names
    monkeypatch.setattr(ck, "DECODE_MMA_TR", "0")
    assert ck.decode_mma_name(bf16, 64, 8, 4, 3) == f"decode_mma_kernel<{bf16}, 64, 8, 4, 3>"


def test_decode_mma_names_of_the_tma_form(monkeypatch):
    """The TMA form is a kernel of its own (it takes the tensor maps), with the tiles' layout
    (TR) named explicitly, and the one compiled when DECODE_MMA_TMA asks for it on an sm_90 GPU
    (before sm_90, the cp.async form)."""
    from engine.executor.ops import cuda_kernels as ck

    bf16 = "__nv_bfloat16"
    monkeypatch.setattr(ck, "DECODE_MMA_TR", "2")
    assert (ck.decode_mma_name(bf16, 128, 8, 4, 3, tma=True)
            == f"decode_mma_tma_kernel<{bf16}, 128, 8, 4, 3, 2>")
    assert (ck.decode_mma_name(bf16, 128, 16, 4, 3, tma=True)
            == f"decode_mma_tma_kernel<{bf16}, 128, 16, 4, 3, 0>")
    monkeypatch.setattr(ck, "DECODE_MMA_TMA", "0")
    monkeypatch.setattr(ck, "sm90_device", lambda: True)
    names = ck.kernel_names("attention_decode_mma.cu", bf16)
    assert not any("tma" in n for n in names)
    count = len(ck.HEAD_DIMS) * 2 * len(ck.DECODE_MMA_CONFIGS)
    monkeypatch.setattr(ck, "DECODE_MMA_TMA", "1")
    tma = ck.kernel_names("attention_decode_mma.cu", bf16)
    assert sum("decode_mma_tma_kernel<" in n for n in tma) == count
    # and the split grids' cluster-merged form (DECODE_CLUSTER_MERGE), TR where 8 heads a block
    merged = [n for n in tma if n.startswith("decode_mma_cluster_tma_kernel<")]
    assert len(tma) == len(names) + len(merged)
    assert len(merged) == (len(ck.HEAD_DIMS) * 2 * len(ck.MERGE_CLUSTERS)
                           if ck.DECODE_CLUSTER_MERGE else 0)
    assert (ck.decode_mma_cluster_tma_name(bf16, 128, 8, 4, 2, 4)
            == f"decode_mma_cluster_tma_kernel<{bf16}, 128, 8, 4, 2, 4, 2>")
    monkeypatch.setattr(ck, "DECODE_CLUSTER_MERGE", False)
    assert len(ck.kernel_names("attention_decode_mma.cu", bf16)) == len(names)
    monkeypatch.setattr(ck, "sm90_device", lambda: False)  # a GPU before sm_90 runs cp.async's
    assert ck.kernel_names("attention_decode_mma.cu", bf16) == names


def test_decode_mma_configs_named_twice_compile_once(monkeypatch):
    """PAGEDSERVE_DECODE_MMA_CONFIGS=4x2/4x2 (one (warps, stages) for split and one-split grids)
    compiles each instance once: NVRTC takes a name expression once."""
    from engine.executor.ops import cuda_kernels as ck

    monkeypatch.setattr(ck, "DECODE_MMA_CONFIGS", ((4, 2), (4, 2)))
    names = ck.kernel_names("attention_decode_mma.cu", "float")
    assert len(names) == len(set(names))
    assert sum(", 4, 2" in n and "cluster" not in n for n in names) == len(ck.HEAD_DIMS) * 2


@pytest.mark.parametrize("text,want", [("4x2/6x3", ((4, 2), (6, 3))),
                                       ("8x2/4x4/2x8", ((8, 2), (4, 4), (2, 8)))])
def test_decode_mma_configs_from_the_environment(text, want):
    from engine.executor.ops.cuda_kernels import _configs_from_env

    assert _configs_from_env(text) == want


@pytest.mark.parametrize("text", ["4x2", "4x2,6x2", "4x2/6", "4x1/6x2", "0x2/4x2", "a/b"])
def test_decode_mma_configs_from_the_environment_refuse_bad_text(text):
    from engine.executor.ops.cuda_kernels import _configs_from_env

    with pytest.raises(ValueError, match="PAGEDSERVE_DECODE_MMA_CONFIGS"):
        _configs_from_env(text)
