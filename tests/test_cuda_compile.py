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
