"""pytest plugin: vLLM's own OpenAI-server tests, unmodified, against `pagedserve serve` on the CPU.

tools/vllm_compat.py loads it (`-p tools.vllm_compat_plugin`). Only the tests' surroundings are
ours: `tests.utils.RemoteOpenAIServer` starts our server instead of `vllm serve` (their CLI flags
translated, their model name served as an alias of ours), and `vllm.tokenizers.get_tokenizer` /
`vllm.config.ModelConfig(...).get_vocab_size()` answer for the model our server runs. Every other
name a test imports from vllm (or torch, or fastapi) is a placeholder: a test that uses one is
skipped, the reason naming it, since it tests vLLM's internals rather than its HTTP API.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import openai
import pytest
import requests

# The served model (a path, or "" for the default one); tools/vllm_compat.py sets it.
MODEL = os.environ.get("VLLM_COMPAT_MODEL", "")
STUBBED = ("vllm", "torch", "fastapi")

# vLLM `serve` flags -> ours. Kept: the same flag means the same thing here.
KEPT_WITH_VALUE = {"--max-model-len", "--max-num-seqs", "--max-num-batched-tokens",
                   "--block-size", "--seed", "--port", "--host", "--api-key", "--max-logprobs",
                   "--root-path", "--reasoning-parser"}
KEPT = {"--enable-server-load-tracking", "--enable-prefix-caching", "--no-enable-prefix-caching",
        "--return-tokens-as-token-ids", "--enable-force-include-usage",
        "--enable-tokenizer-info-endpoint", "--enable-per-request-metrics", "--trust-remote-code"}
# Dropped: GPU-only tuning, or a vLLM opt-in for what we always do.
DROPPED_WITH_VALUE = {
    "--dtype": "the cpu backend computes in float32",
    "--gpu-memory-utilization": "no GPU here",
    "--tool-call-parser": "calls in the Hermes, Llama 3 JSON and Mistral forms are always read",
    # LoRA: the tests that ask for an adapter's model name are skipped (pytest_collection_...).
    "--lora-modules": "no LoRA", "--max-lora-rank": "no LoRA", "--max-cpu-loras": "no LoRA",
    "--max-loras": "no LoRA",
    "--limit-mm-per-prompt": "no multimodal inputs (their tests are skipped: local_asset_server)",
}
DROPPED = {
    "--enforce-eager": "no CUDA graphs on the cpu backend",
    "--enable-prompt-tokens-details": "usage.prompt_tokens_details is always sent",
    "--disable-frontend-multiprocessing": "the API process and the engine core are always two",
    "--enable-auto-tool-choice": "tool calls are always parsed when a request has tools",
    "--enable-lora": "no LoRA",
    "--enable-chunked-prefill": "prefill is always chunked",
}

# Tests that cannot pass whatever the server does, by issue 19's categories (and why).
MODEL_TEXT = ("a specific model's text: the test needs the model to end its answer by itself "
              "(EOS) or to write a tool call; the tiny model writes noise up to max_tokens")
MODEL_ANSWER = ("a specific model's text: the test needs the model to answer a question right "
                "(1+1 = 2)")
KV_TRANSFER = "disaggregated prefill: kv_transfer_params (a KV connector's fields)"
SKIPS = {
    # the cases with the right key need the model to end its answer (finish_reason "stop");
    # the wrong-key cases (0, 1) run
    "test_chat_session_root_path_with_api_key[test_case2]": MODEL_TEXT,
    "test_chat_session_root_path_with_api_key[test_case3]": MODEL_TEXT,
    "test_kv_transfer_prompt_token_ids_round_trip": KV_TRANSFER,
    "test_kv_transfer_prompt_token_ids_streaming": KV_TRANSFER,
    "test_load_prompt_embeds": "prompt embeddings (vLLM's torch loader)",
    "test_disable_prompt_embeds": "prompt embeddings (vLLM's torch loader)",
    "test_show_version": "vLLM internals: compares GET /version with vLLM's own version number",
    "test_chat_session_with_echo_and_continue_final_message": MODEL_TEXT,
    "test_chat_completion_with_tool_use": MODEL_TEXT,
    "test_chat_completion_with_emoji_and_token_ids": MODEL_TEXT,
    "test_response_format_json_object": MODEL_ANSWER,
    "test_response_format_json_schema": MODEL_ANSWER,
    "test_complex_message_content": MODEL_ANSWER,
    "test_structured_outputs_json_chat": "a specific model's text: the model must close its "
                                         "JSON within 1000 tokens (the grammar allows a string "
                                         "to run on, and the tiny model's do)",
    "test_single_chat_session": "a specific model's tokens: usage must be exactly 37 prompt "
                                "tokens, zephyr's chat template around the messages",
    "test_more_than_one_prompt_logprobs_chat": "a specific model's predictions: a prompt token "
                                               "the model ranks first (its entry has k, not k+1, "
                                               "tokens)",
}


def translate_args(args: list[str]) -> list[str]:
    """vLLM serve flags -> pagedserve serve flags; an unknown flag is an error naming it."""
    out, i = [], 0
    while i < len(args):
        flag, value = args[i], None
        if "=" in flag and flag.startswith("--"):
            flag, value = flag.split("=", 1)
        takes_value = flag in KEPT_WITH_VALUE or flag in DROPPED_WITH_VALUE
        if takes_value and value is None:
            i += 1
            value = args[i]
        i += 1
        if flag in KEPT_WITH_VALUE:
            out += [flag, value]
        elif flag in KEPT:
            out.append(flag)
        elif flag not in DROPPED and flag not in DROPPED_WITH_VALUE:
            raise ValueError(f"vLLM serve flag {flag!r} has no pagedserve equivalent here "
                             "(add it to tools/vllm_compat_plugin.py's tables)")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RemoteOpenAIServer:
    """`tests.utils.RemoteOpenAIServer` for vLLM's tests: `pagedserve serve` in a subprocess,
    serving our model under the name the test asks for."""

    DUMMY_API_KEY = "token-abc123"

    def __init__(self, model: str, vllm_serve_args: list[str], *, env_dict=None, seed=0,
                 auto_port=True, max_wait_seconds=None, override_hf_configs=None):
        if override_hf_configs is not None:
            pytest.skip("needs vLLM internals (--hf-overrides)")
        args = translate_args(list(vllm_serve_args))
        if auto_port and "--port" not in args:
            args += ["--port", str(_free_port())]
        if seed is not None and "--seed" not in args:
            args += ["--seed", str(seed)]
        self.host = args[args.index("--host") + 1] if "--host" in args else "127.0.0.1"
        self.port = int(args[args.index("--port") + 1])
        cmd = [sys.executable, "-m", "server.cli", "serve", *([MODEL] if MODEL else []),
               "--device", "cpu", "--no-dashboard", "--served-model-name", model, *args]
        env = {**os.environ, **(env_dict or {})}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="pagedserve-", suffix=".log",
                                               delete=False)
        print(f"starting: {' '.join(cmd)} (log {self.log.name})")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + (max_wait_seconds or 240)
        while True:
            try:
                if requests.get(self.url_for("health"), timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"pagedserve did not start: {Path(self.log.name).read_text()}")
            time.sleep(0.3)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    @property
    def url_root(self) -> str:
        return f"http://{self.host}:{self.port}"

    def url_for(self, *parts: str) -> str:
        return "/".join([self.url_root, *(p.strip("/") for p in parts if p)])

    def get_client(self, **kwargs):
        kwargs.setdefault("timeout", 600)
        return openai.OpenAI(base_url=self.url_for("v1"), api_key=self.DUMMY_API_KEY,
                             max_retries=0, **kwargs)

    def get_async_client(self, **kwargs):
        kwargs.setdefault("timeout", 600)
        return openai.AsyncOpenAI(base_url=self.url_for("v1"), api_key=self.DUMMY_API_KEY,
                                  max_retries=0, **kwargs)


# ---- the served model's facts, under the names vLLM's tests ask them by ----------------------

@functools.cache
def _served_tokenizer():
    from engine.model.loader import load_tokenizer

    return load_tokenizer(MODEL or None)


class _HFStyleTokenizer:
    """The served model's tokenizer with the HF call signatures the tests use."""

    def __init__(self):
        self._tok = _served_tokenizer()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, conversation, tokenize=True, **kwargs):
        return self._tok.apply_chat_template(conversation, tokenize=tokenize, **kwargs)

    def convert_ids_to_tokens(self, ids):
        return [self._tok.id_to_token(i) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def get_tokenizer(tokenizer_name=None, *args, **kwargs):
    return _HFStyleTokenizer()


class ModelConfig:
    """Only get_vocab_size(): the served model's vocabulary, whatever `model` the test names."""

    def __init__(self, *args, **kwargs):
        pass

    def get_vocab_size(self) -> int:
        return _served_tokenizer().vocab_size


# ---- placeholders for everything else ------------------------------------------------------

_RUNNING = [False]  # inside a test's setup/call/teardown (not importing modules)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _RUNNING[0] = True
    yield
    _RUNNING[0] = False


class _Internal:
    """A vLLM (torch, fastapi) name with no HTTP meaning: using it skips the test."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Internal(f"{self._name}.{attr}")

    def __getattribute__(self, attr: str):
        if attr == "__new__":  # SomeVllmClass.__new__(SomeVllmClass): a placeholder too
            return _Internal(f"{object.__getattribute__(self, '_name')}.__new__")
        return object.__getattribute__(self, attr)

    def __call__(self, *args, **kwargs):
        if not _RUNNING[0]:  # at import time (a module-level constant): skip only when used
            return _Internal(f"{self._name}(...)")
        # allow_module_level: a module that calls one at import time is skipped whole
        pytest.skip(f"needs vLLM internals ({self._name})", allow_module_level=True)

    def __mro_entries__(self, bases):
        # subclassed (class P(SomeVllmParser)): the subclass skips when instantiated
        name = self._name

        class _InternalBase:
            def __init__(self, *args, **kwargs):
                pytest.skip(f"needs vLLM internals ({name})")

        return (_InternalBase,)

    def _used(self, *args, **kwargs):
        pytest.skip(f"needs vLLM internals ({self._name})", allow_module_level=True)

    # Compared, counted or tested for truth, it is used: the test needs vLLM itself.
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _used
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __bool__ = __iter__ = _used
    __hash__ = object.__hash__

    def __dir__(self):  # Mock(spec=SomeVllmClass): the test mocks vLLM's internals
        if _RUNNING[0]:
            self._used()
        return []

    def __or__(self, other):  # a type annotation (SomeVllmClass | None)
        return self

    __ror__ = __or__

    def __getitem__(self, key):  # a module-level helper's result, indexed: still a placeholder
        if _RUNNING[0]:
            self._used()
        return _Internal(f"{self._name}[{key!r}]")

    def __repr__(self):
        return self._name


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr.endswith(("Error", "Exception")):  # pytest.raises(VLLMValidationError) needs
            name = f"{self.__name__}.{attr}"  # a real class; raising one skips the test

            def __init__(self, *args, **kwargs):
                pytest.skip(f"needs vLLM internals ({name})")

            return type(attr, (Exception,), {"__module__": self.__name__, "__init__": __init__})
        return _Internal(f"{self.__name__}.{attr}")


# Names that are the served model's facts (above), or plain constants, not vLLM behaviour.
PROVIDED = {
    "vllm.tokenizers": {"get_tokenizer": get_tokenizer},
    "vllm.config": {"ModelConfig": ModelConfig},
    "torch": {"long": np.int64, "iinfo": np.iinfo},  # int64 bounds for the seed-range test
}


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        module.__dict__.update(PROVIDED.get(spec.name, {}))
        return module

    def exec_module(self, module):
        pass


@pytest.fixture
def caplog_vllm(caplog):
    """vLLM's conftest fixture (caplog at INFO); its tests mock vLLM's engine."""
    import logging

    with caplog.at_level(logging.INFO):
        yield caplog


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    """LoRA adapters' download fixtures: a placeholder path (their tests are skipped)."""
    if fixturedef.argname.endswith("_lora_files"):
        fixturedef.cached_result = ("(no LoRA)", fixturedef.cache_key(request), None)
        return "(no LoRA)"
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.originalname if hasattr(item, "originalname") else item.name
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any("lora" in str(v) for v in params.values()):
            item.add_marker(pytest.mark.skip(reason="LoRA (the model name is an adapter's)"))
        elif "local_asset_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.skip(reason="multimodal (image inputs)"))
        elif name in SKIPS or item.name in SKIPS:  # a whole test, or one of its cases
            item.add_marker(pytest.mark.skip(reason=SKIPS.get(name) or SKIPS[item.name]))


def pytest_configure(config):
    sys.meta_path.insert(0, _StubFinder())
    utils = types.ModuleType("tests.utils")  # their module imports vllm everywhere
    utils.RemoteOpenAIServer = RemoteOpenAIServer
    sys.modules["tests.utils"] = utils
    config.addinivalue_line("markers", "asyncio: run by pytest-asyncio")
    config.addinivalue_line("markers", "skip_global_cleanup: vLLM's (no meaning here)")
