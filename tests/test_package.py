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


FLOOR_1 = ["config", "sequence", "sampling_params", "block_manager", "scheduler", "stopping",
           "outputs"]


@pytest.mark.parametrize("module", FLOOR_1)
def test_floor_one_imports_only_stdlib_numpy_and_floor_one(module):
    """The logic floor (DESIGN.md) never reaches up into the model, the backends or cupy."""
    import ast

    tree = ast.parse((ROOT / "engine" / f"{module}.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "engine":
                assert name.split(".")[1] in FLOOR_1, f"{module} imports {name}"
            else:
                assert top in sys.stdlib_module_names or top in ("numpy", "__future__"), \
                    f"{module} imports {name}"
