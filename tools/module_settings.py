"""Module settings of engine.executor.ops changed for one measurement, then restored.

The A/B tools take a spec such as `cuda_quant_gguf.GEMV3_GRID=fill,cuda_fp8.CLUSTER_MAX_ROWS=64`
(b1_gap.py --variant, kernel_check.py --set): each item names a module of engine.executor.ops,
one of its attributes, and a Python literal (else a string) to hold while the block runs.

    with settings("cuda_kernels.PDL=False"):
        ...  # kernels launched here see PDL off
"""

from __future__ import annotations

import contextlib

# cuda_quant_gguf's grids, cached per shape: cleared around a change, since they follow the settings
CACHES = ("_gemv2_config", "_gemv3_config", "_gemv3_split_config")


def parse_variant(spec: str) -> list[tuple[str, str, object]]:
    """'cuda_quant_gguf.GEMV3_GRID=fill,cuda_quant_gguf.GEMV3_X2=True' -> [(module, attribute,
    value)]: modules of engine.executor.ops; values Python literals, else strings."""
    import ast

    out, depth, items, start = [], 0, [], 0
    for i, ch in enumerate(spec):  # commas inside brackets belong to a value: (16, 2)
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    items.append(spec[start:])
    for item in items:
        target, _, text = item.partition("=")
        module, _, attr = target.strip().rpartition(".")
        if not module or not attr or not text:
            raise SystemExit(f"{spec!r}: expected module.ATTR=value[,...]")
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            value = text.strip()
        out.append((module, attr, value))
    return out


@contextlib.contextmanager
def settings(spec: str):
    """parse_variant(spec)'s settings inside (cuda_quant_gguf's cached grids cleared around)."""
    import importlib

    from engine.executor.ops import cuda_quant_gguf

    saved = []
    try:
        for module, attr, value in parse_variant(spec):
            m = importlib.import_module(f"engine.executor.ops.{module}")
            if not hasattr(m, attr):
                raise SystemExit(f"{spec!r}: engine.executor.ops.{module} has no {attr}")
            saved.append((m, attr, getattr(m, attr)))
            setattr(m, attr, value)
        for cached in CACHES:
            getattr(cuda_quant_gguf, cached).cache_clear()  # their grids follow the settings
        yield
    finally:
        for m, attr, value in reversed(saved):
            setattr(m, attr, value)
        for cached in CACHES:
            getattr(cuda_quant_gguf, cached).cache_clear()
