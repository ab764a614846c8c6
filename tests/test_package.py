"""Packaging promises: light imports, kernels inside the wheel, the documented console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_importing_engine_and_server_loads_neither_cupy_nor_torch():
    code = (
        "import sys, engine, engine.engine, engine.llm, engine.loader, server.app, server.cli\n"
        "heavy = sorted(m for m in ('cupy', 'torch') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""


def test_wheel_ships_the_cuda_sources(tmp_path):
    builder_mod = pytest.importorskip("hatchling.builders.wheel")
    builder = builder_mod.WheelBuilder(str(ROOT))
    wheel = next(iter(builder.build(directory=str(tmp_path), versions=["standard"])))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {n.removeprefix("engine/cuda/") for n in names if n.startswith("engine/cuda/")}
    sources = {p.name for p in (ROOT / "cuda").iterdir() if p.suffix in (".cu", ".cuh")}
    assert sources and sources <= shipped
    assert "engine/presets/qwen3-0.6b.json" in names
    assert any(n.endswith("entry_points.txt") for n in names)
