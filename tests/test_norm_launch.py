"""cuda_norm's launch shapes (CPU: no kernel runs): which rows the 16-byte RMSNorm takes, with
how many words a thread, and the gather's block."""

from __future__ import annotations

import types

import pytest

from engine.executor.ops import cuda_norm


def _array(ptr: int = 256):
    return types.SimpleNamespace(data=types.SimpleNamespace(ptr=ptr))


@pytest.mark.parametrize("hidden, want", [
    (1024, (1, 128)),    # Qwen3-0.6B: a word a thread
    (4096, (1, 512)),    # Llama-3-8B
    (2056, (1, 288)),    # 257 words: the last warp partly idle
    (5120, (2, 320)),    # Qwen3-14B
    (8192, (2, 512)),    # Llama-3-70B
    (16384, (4, 512)),
    (24, (1, 32)),
    (16392, None),       # more than 4 words a thread of 512
    (1004, None),        # not a multiple of 8
])
def test_vec_launch_shapes(hidden, want):
    assert cuda_norm.vec_launch(hidden, _array(), None, _array()) == want


def test_unaligned_row_takes_the_scalar_kernel():
    assert cuda_norm.vec_launch(4096, _array(), _array(258), None) is None


def test_gather_block():
    assert cuda_norm.gather_threads(512, vec=False) == 128
    assert [cuda_norm.gather_threads(w, vec=True) for w in (1, 33, 512, 1025)] == [32, 64, 512,
                                                                                   512]


def test_norm_flags_follow_the_switch(monkeypatch):
    monkeypatch.setattr(cuda_norm, "NORM_VEC", False)
    assert cuda_norm.norm_flags(True) == 0 and cuda_norm.gather_threads(512) == 128
    monkeypatch.setattr(cuda_norm, "NORM_VEC", True)
    assert cuda_norm.norm_flags(True) == cuda_norm.NORM_W_EARLY == 2
    assert cuda_norm.norm_flags(False) == 0  # GEMVs without the fused norm
    assert cuda_norm.gather_threads(512) == 512


def test_common_header_and_python_agree_on_the_flag():
    from engine.executor.ops.cuda_kernels import cuda_dir

    assert f"constexpr int NORM_W_EARLY = {cuda_norm.NORM_W_EARLY};" in (
        cuda_dir() / "common.cuh").read_text()


def test_early_triggers_turn_pdl_early_on_inside_only(monkeypatch):
    """DecodeGraphs captures its short-context graphs inside early_triggers(PDL_EARLY_SHORT):
    PDL_EARLY on there, restored after (an exception too); off stays as configured."""
    from engine.executor.ops import cuda_kernels

    monkeypatch.setattr(cuda_kernels, "PDL_EARLY", False)
    with cuda_kernels.early_triggers(True):
        assert cuda_kernels.PDL_EARLY is True
        assert cuda_kernels.early_flag() == 1  # common.cuh's PDL_EARLY bit, what kernels take
    assert cuda_kernels.PDL_EARLY is False and cuda_kernels.early_flag() == 0
    with pytest.raises(RuntimeError), cuda_kernels.early_triggers(True):
        raise RuntimeError("capture failed")
    assert cuda_kernels.PDL_EARLY is False
    monkeypatch.setattr(cuda_kernels, "PDL_EARLY", True)  # PAGEDSERVE_PDL_EARLY=1
    with cuda_kernels.early_triggers(False):
        assert cuda_kernels.PDL_EARLY is True
