"""The token buckets mixed_graphs.py captures, checked without a GPU: without CuPy the module is
imported over a stand-in for it (only its pure-Python bucketing runs), and the modules imported
so are dropped again afterwards."""

import importlib.util
import sys
from unittest import mock

import pytest


@pytest.fixture
def mixed_graphs(monkeypatch):
    if importlib.util.find_spec("cupy") is not None:
        from engine.executor import mixed_graphs

        yield mixed_graphs
        return
    before = set(sys.modules)
    monkeypatch.setitem(sys.modules, "cupy", mock.MagicMock())
    from engine.executor import mixed_graphs

    yield mixed_graphs
    for name in set(sys.modules) - before:
        if name.startswith("engine."):
            module = sys.modules.pop(name)
            parent, _, child = name.rpartition(".")
            if getattr(sys.modules.get(parent), child, None) is module:
                delattr(sys.modules[parent], child)


def test_each_bucket_is_captured_once(mixed_graphs):
    """The default token budget (8192) is past the last bucket: that bucket once, not twice (a
    second capture of the largest graphs, and a bucket too many in the start-up log)."""
    buckets = mixed_graphs.BUCKETS
    assert mixed_graphs.bucket_sizes(8192) == list(buckets)
    assert mixed_graphs.bucket_sizes(buckets[-1]) == list(buckets)
    assert mixed_graphs.bucket_sizes(buckets[-1] + 1) == list(buckets)
    assert mixed_graphs.bucket_sizes(40, (16, 32, 64)) == [16, 32, 40]
    assert mixed_graphs.bucket_sizes(32, (16, 32, 64)) == [16, 32]
    assert mixed_graphs.bucket_sizes(8, (16, 32, 64)) == [8]

