"""Where models come from: Hugging Face ids through the local HF cache, and what the GGUF cache
keeps (float16 for quantized tensors, float32 where float32 is the source)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import GOLDEN_DIR

from engine.model import gguf_loader

ROOT = Path(__file__).resolve().parents[1]
REPO = "testorg/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hf_home(tmp_path) -> Path:
    """An HF_HOME whose hub cache holds REPO (the golden tiny llama plus a word-level tokenizer),
    laid out as huggingface_hub writes it: models--ORG--NAME/{refs/main, snapshots/<commit>/}."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    home = tmp_path / "hf"
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(GOLDEN_DIR / "llama", snapshot, ignore=shutil.ignore_patterns("*.npz"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(320)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(snapshot / "tokenizer.json"))
    return home


def _run(*argv, env):
    return subprocess.run([sys.executable, "-m", "server.cli", *argv], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=60)


def test_hf_id_loads_from_the_local_cache(tmp_path):
    env = {"HF_HOME": str(_hf_home(tmp_path))}
    result = _run("generate", "--model", REPO, "--device", "cpu", "--max-tokens", "3", "w5 w6",
                  env=env)
    assert result.returncode == 0, result.stderr
    assert "[2 prompt tokens, 3 generated" in result.stderr


def test_hf_id_not_found_offline_says_where_it_looked(tmp_path):
    home = _hf_home(tmp_path)
    result = _run("generate", "--model", "testorg/absent", "hi",
                  env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1, result.stderr
    assert "'testorg/absent'" in lines[0] and str(home / "hub") in lines[0]
    assert "HF_HUB_OFFLINE=1" in lines[0]


def test_hf_id_pattern():
    from engine.model.loader import is_hf_id

    assert is_hf_id("HuggingFaceTB/SmolLM2-135M-Instruct") and is_hf_id("Qwen/Qwen3-0.6B")
    assert not is_hf_id("qwen3-0.6b") and not is_hf_id("/abs/path") and not is_hf_id("a/b/c")
    assert not is_hf_id(str(GOLDEN_DIR / "llama")) and not is_hf_id(None)


class _FakeHub:
    """huggingface_hub.snapshot_download over a repo held in memory (name -> bytes) and a local
    snapshot folder; records the files each download fetched."""

    def __init__(self, remote: dict[str, bytes], local: Path):
        self.remote, self.local, self.fetched = remote, local, []

    def __call__(self, repo_id, local_files_only=False, allow_patterns=None, **kw):
        import fnmatch

        from huggingface_hub.errors import LocalEntryNotFoundError

        if local_files_only:
            if not self.local.is_dir():
                raise LocalEntryNotFoundError("not cached")
            return str(self.local)
        for name, data in self.remote.items():
            if allow_patterns is None or any(fnmatch.fnmatchcase(name, p)
                                             for p in allow_patterns):
                path = self.local / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if not path.is_file():
                    path.write_bytes(data)
                    self.fetched.append(name)
        return str(self.local)


def _fake_hub(monkeypatch, tmp_path, remote) -> _FakeHub:
    import huggingface_hub
    from huggingface_hub import constants

    from engine.model import loader

    hub = _FakeHub(remote, tmp_path / "snapshot")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    loader.resolve_hf_id.cache_clear()
    return hub


def test_a_download_fetches_the_chat_template_files(monkeypatch, tmp_path):
    """Newer HF repos keep the chat template in chat_template.jinja (and named ones in
    additional_chat_templates/NAME.jinja) rather than in tokenizer_config.json."""
    from engine.model import loader

    remote = {"config.json": b"{}", "model.safetensors": b"w", "tokenizer.json": b"{}",
              "chat_template.jinja": b"T", "additional_chat_templates/tool_use.jinja": b"U"}
    hub = _fake_hub(monkeypatch, tmp_path, remote)
    folder = loader.resolve_hf_id("org/new")
    assert sorted(hub.fetched) == sorted(remote)
    assert (folder / "chat_template.jinja").read_text() == "T"


def test_a_partial_snapshot_in_the_cache_is_completed_not_taken(monkeypatch, tmp_path):
    """A snapshot another tool cached in part (AutoTokenizer fetches the config and tokenizer
    files only) is no model: the weights are downloaded, not reported missing."""
    from engine.model import loader

    remote = {"config.json": b"{}", "tokenizer.json": b"{}",
              "model.safetensors.index.json": b'{"weight_map": {"a": "model-1.safetensors"}}',
              "model-1.safetensors": b"w"}
    hub = _fake_hub(monkeypatch, tmp_path, remote)
    hub.local.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors.index.json"):
        (hub.local / name).write_bytes(remote[name])
    folder = loader.resolve_hf_id("org/partial")
    assert hub.fetched == ["model-1.safetensors"] and (folder / "model-1.safetensors").is_file()
    loader.resolve_hf_id.cache_clear()
    hub.fetched.clear()
    assert loader.resolve_hf_id("org/partial") == folder and hub.fetched == []  # now complete


def test_a_download_fetches_only_the_weights_a_load_reads(monkeypatch, tmp_path):
    """Mistral's repos hold consolidated.safetensors (its own format, the model's size again)
    beside the HF shards the index lists: only the shards come."""
    from engine.model import loader

    remote = {"config.json": b"{}", "tokenizer.json": b"{}", "params.json": b"{}",
              "model.safetensors.index.json":
                  b'{"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}',
              "model-1.safetensors": b"w", "model-2.safetensors": b"w",
              "consolidated.safetensors": b"big"}
    hub = _fake_hub(monkeypatch, tmp_path, remote)
    loader.resolve_hf_id("mistralai/x")
    assert "consolidated.safetensors" not in hub.fetched
    assert sorted(hub.fetched) == sorted(set(remote) - {"consolidated.safetensors"})


def _write_gguf(path, tensors: dict):
    """name -> (float32 array, GGML type) written as that type."""
    import gguf
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), "llama")
    for name, (array, qtype) in tensors.items():
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, array)
        else:
            w.add_tensor(name, quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_cache_keeps_quantized_tensors_in_float16(tmp_path):
    import gguf
    from gguf.quants import dequantize

    Q = gguf.GGMLQuantizationType
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((8, 64)).astype(np.float32)
    norm = (1 + rng.standard_normal(64) * 1e-3).astype(np.float32)  # needs float32's precision
    _write_gguf(tmp_path / "m.gguf", {"q8.weight": (matrix, Q.Q8_0), "q41.weight":
                                      (matrix, Q.Q4_1), "norm.weight": (norm, Q.F32)})
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    out = gguf_loader._dequantize(reader, tmp_path / "m.gguf")
    assert out["norm.weight"].dtype == np.float32
    np.testing.assert_array_equal(out["norm.weight"], norm)
    for t in reader.tensors:
        if t.tensor_type == Q.F32:
            continue
        exact = dequantize(t.data, t.tensor_type).reshape(matrix.shape)
        assert out[t.name].dtype == np.float16
        # float16 rounding (2^-11 relative) is far below the quantization step
        np.testing.assert_allclose(out[t.name], exact, rtol=2**-11, atol=1e-7)
        assert np.abs(exact - matrix).max() > 10 * np.abs(out[t.name] - exact).max()


@pytest.mark.parametrize("outlier", [None, 7e4])  # all large, or one value past float16's max
def test_gguf_values_beyond_float16_stay_float32(tmp_path, outlier):
    import gguf
    from gguf.quants import dequantize

    big = (np.random.default_rng(1).standard_normal((4, 32)) * 1e5).astype(np.float32)
    if outlier is not None:
        big = (big * 1e-5).astype(np.float32)  # a small tensor but for one value
        big[2, 5] = outlier
    _write_gguf(tmp_path / "b.gguf", {"big.weight": (big, gguf.GGMLQuantizationType.Q8_0)})
    reader = gguf.GGUFReader(tmp_path / "b.gguf")
    out = gguf_loader._dequantize(reader, tmp_path / "b.gguf")
    assert out["big.weight"].dtype == np.float32 and np.isfinite(out["big.weight"]).all()
    exact = dequantize(reader.tensors[0].data, reader.tensors[0].tensor_type).reshape(big.shape)
    np.testing.assert_array_equal(out["big.weight"], exact)
    assert np.abs(exact).max() > np.finfo(np.float16).max
