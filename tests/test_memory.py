"""Memory the hammer (tools/hammer.py, issue 9) must read right: the numpy KV cache is resident
from its allocation, and the server's RSS includes the engine-core child process."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

from tools.hammer import process_tree, rss_mib


def test_numpy_kv_cache_is_resident_when_allocated():
    """In a fresh process: in this one, memory that earlier tests freed may already be
    resident and be handed out again, and the RSS would not grow (a CI run saw 0.0 MiB)."""
    code = (
        "import re\n"
        "from engine.executor.ops.numpy_ops import NumpyOps\n"
        "def rss():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return int(re.search(r'VmRSS:\\s+(\\d+)', f.read()).group(1))\n"
        "before = rss()\n"
        "# 8 layers x k,v x 256 blocks x 4 heads x 16 tokens x 64 dims x 4 bytes = 64 MiB\n"
        "cache = NumpyOps().alloc_kv_cache(8, 256, 4, 16, 64)\n"
        "print(cache.nbytes, int(cache.any()), (rss() - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(
                             __file__))}).stdout.split()
    nbytes, nonzero, grown_mib = int(out[0]), int(out[1]), float(out[2])
    assert nbytes == 64 << 20 and not nonzero
    assert grown_mib > 56, grown_mib  # np.zeros would map its pages only on first write


def test_rss_sums_the_process_and_its_children():
    # A child that makes 64 MiB resident, as the engine core holds the weights and KV cache.
    child = subprocess.Popen([sys.executable, "-c",
                              "import sys; b = bytearray(64 << 20); print(1, flush=True); "
                              "sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"1\n"
        assert child.pid in process_tree(os.getpid())
        rss = rss_mib(os.getpid())
        assert rss["children"] > 64, rss
        # each figure is rounded to 0.1 MiB: the parts' sum may miss the total by 0.1 + float error
        assert abs(rss["total"] - rss["server"] - rss["children"]) <= 0.1 + 1e-6, rss
    finally:
        child.communicate(b"")
    assert child.returncode == 0


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no huge-page advice here")
def test_numpy_kv_cache_lives_in_its_own_mapping_advised_for_huge_pages():
    """The cache is anonymous memory of its own (advised MADV_HUGEPAGE, so the fill that makes it
    resident faults 2 MiB pages instead of 4 KiB ones: the default model's 1 GiB cache made a
    2-core server's start 1.6-3.1 s instead of 2.8-4.0), zeroed and writable like np.zeros'."""
    from engine.executor.ops.numpy_ops import NumpyOps

    cache = NumpyOps().alloc_kv_cache(2, 8, 2, 16, 64)
    assert cache.shape == (2, 2, 8, 2, 16, 64) and cache.dtype == np.float32
    assert cache.flags.c_contiguous and cache.flags.writeable and not cache.any()
    base = cache
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)
    assert len(base.obj) == cache.nbytes
    cache[1, 1, 7] = 1.0
    assert cache.sum() == 2 * 16 * 64
