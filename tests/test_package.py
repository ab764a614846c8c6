"""Packaging promises: light imports, kernels inside the wheel, the documented console script."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_importing_engine_and_server_loads_neither_cupy_nor_torch():
    code = (
        "import sys, engine, engine.engine, engine.llm, engine.model.loader, server.app\n"
        "import server.cli\n"
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
    assert "engine/model/presets/qwen3-0.6b.json" in names
    # The dashboard page and its example traces, served from the installed package.
    assert {"server/static/dashboard.html", "server/static/traces/shared-prefix.json",
            "server/static/traces/preemption.json"} <= set(names)
    assert any(n.endswith("entry_points.txt") for n in names)


def test_an_installed_wheel_finds_every_file_the_code_reads(tmp_path):
    """Unpacked as pip installs it and imported from outside the checkout, the wheel holds every
    non-Python file of the packages, and the folders the code computes (cuda_kernels.cuda_dir,
    config.PRESETS_DIR, dashboard.STATIC) point into it and hold what the checkout holds."""
    builder_mod = pytest.importorskip("hatchling.builders.wheel")
    wheel = next(iter(builder_mod.WheelBuilder(str(ROOT)).build(directory=str(tmp_path / "dist"),
                                                                versions=["standard"])))
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    data = {p.relative_to(ROOT).as_posix() for pkg in ("engine", "server")
            for p in (ROOT / pkg).rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    missing = sorted(d for d in data if not (site / d).is_file())
    assert not missing, f"the wheel lacks {missing}"
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(site)!r})\n"
        "from engine.executor.ops.cuda_kernels import cuda_dir\n"
        "from engine.model.config import PRESETS_DIR\n"
        "from server.dashboard import STATIC\n"
        "dirs = {'cuda': cuda_dir(), 'presets': PRESETS_DIR, 'static': STATIC}\n"
        "print(json.dumps({k: [str(v), sorted(str(p.relative_to(v)) for p in v.rglob('*')\n"
        "                                     if p.is_file())] for k, v in dirs.items()}))\n"
    )
    import json

    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    for key, source in (("cuda", ROOT / "cuda"), ("presets", ROOT / "engine/model/presets"),
                        ("static", ROOT / "server/static")):
        at, files = found[key]
        assert Path(at).is_relative_to(site), (key, at)
        want = sorted(str(p.relative_to(source)) for p in source.rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts)
        assert want and set(want) <= set(files), key


# DESIGN.md's floors: a module may import its own floor and the floors below it, never above.
FLOORS = ["engine.core", "engine.model", "engine.executor", "engine"]
# Third-party packages each floor may use besides the standard library.
THIRD_PARTY = {
    "engine.core": set(),
    "engine.model": {"numpy", "tokenizers", "jinja2", "gguf", "safetensors", "tqdm",
                     "huggingface_hub"},
    # zmq: tensor-parallel ranks receive each step's inputs over it (executor/workers.py)
    "engine.executor": {"numpy", "cupy", "threadpoolctl", "zmq"},
    "engine": {"numpy", "zmq", "msgspec", "tqdm", "llguidance"},
}


def _floor(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if ".".join(parts[:2]) in FLOORS else "engine"


def _engine_modules():
    for path in sorted((ROOT / "engine").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield ".".join(rel.parts).removesuffix(".__init__"), path


@pytest.mark.parametrize("module,path", list(_engine_modules()), ids=lambda v: str(v))
def test_imports_point_only_down_the_floors(module, path):
    """No module reaches up a floor (DESIGN.md), and core imports nothing but the stdlib."""
    import ast

    floor = _floor(module)
    allowed_floors = FLOORS[: FLOORS.index(floor) + 1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top == "engine":
                target = _floor(name)
                assert target in allowed_floors, f"{module} ({floor}) imports {name} ({target})"
            else:
                assert top in sys.stdlib_module_names or top == "__future__" \
                    or top in THIRD_PARTY[floor], f"{module} ({floor}) imports {name}"


def test_cuda_extras_bring_the_cuda_libraries():
    """A machine with only the NVIDIA driver: CuPy's `ctk` extra installs the CUDA runtime,
    NVRTC and cuBLAS wheels the kernels need; README names the driver each extra wants."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert [r.split(">=")[0] for r in extras["cuda12"]] == ["cupy-cuda12x[ctk]",
                                                            "nvidia-nccl-cu12"]
    assert [r.split(">=")[0] for r in extras["cuda13"]] == ["cupy-cuda13x[ctk]",
                                                            "nvidia-nccl-cu13"]
    readme = (ROOT / "README.md").read_text()
    assert "525.60.13" in readme and "580.65.06" in readme
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {d.split(">=")[0] for d in dependencies} >= {"threadpoolctl", "huggingface_hub"}


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode != 0,
                    reason="no make")
def test_make_serve_installs_only_when_pyproject_changed(tmp_path):
    """After one install, `make serve` runs no pip (no network) until pyproject.toml changes."""
    import os
    import time

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()

    def dry_run(target):
        return subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout

    assert "pip install" in dry_run("serve")
    stamps = {p: venv / f".installed{p}" for p in ("", "-test")}
    future = time.time() + 3600  # newer than pyproject.toml and the Makefile
    for stamp in stamps.values():
        stamp.touch()
        os.utime(stamp, (future, future))
    for target in ("serve", "test"):
        assert "pip" not in dry_run(target), target
    assert "pagedserve serve" in dry_run("serve")
    os.utime(stamps[""], (0, 0))  # pyproject.toml is newer again
    assert "pip install" in dry_run("serve") and "pip install" in dry_run("test")
