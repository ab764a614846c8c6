"""The `pagedserve` command: `serve` an OpenAI-compatible API, `generate` one completion, or
`trace` a teaching workload for the dashboard (`worker`: one tensor-parallel rank of a group
whose rank 0 runs on another host).

Flag names follow vLLM's, so a vLLM command line mostly works unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from engine.core.liveness import Liveness
from engine.executor.ops import DeviceError, resolve_device
from engine.executor.worker import add_worker_flags, run_worker_args
from engine.logs import configure_logging, model_line
from engine.model.config import (
    DTYPES,
    PRESETS_DIR,
    ConfigError,
    EngineConfig,
    generation_config_problem,
)
from engine.model.gguf_quants import KINDS as GGUF_KINDS
from server import package_version
from server.reasoning import KINDS as REASONING_KINDS

log = logging.getLogger("pagedserve.cli")
# --max-num-batched-tokens' defaults. On the cpu backend a step of 1,024 prompt tokens of the
# default model takes ~5 s on one core; a 3,000-token prompt prefilled in such steps took 14.7 s
# against 14.3 in one step (2026-12-05, 2-core machine), and between the steps other requests
# decode and aborts take effect.
GPU_STEP_TOKENS, CPU_STEP_TOKENS = 8192, 1024


class StartupError(RuntimeError):
    """The server cannot start (port taken); the message says why."""


def _checked(cast, what: str, bounds: str, ok):
    """An argparse type: `cast` the text (else "expected WHAT"), then ok(value) (else "must be
    BOUNDS")."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value

    return parse


_positive_int = _checked(int, "an integer", ">= 1", lambda v: v >= 1)
_non_negative_int = _checked(int, "an integer", ">= 0", lambda v: v >= 0)
_fraction = _checked(float, "a number", "in (0, 1]", lambda v: 0 < v <= 1)
_port = _checked(int, "a port number", "in [0, 65535]", lambda v: 0 <= v <= 65535)


# vLLM's human-readable integers: decimal k/m/g/t (25.6k = 25,600) and binary K/M/G/T (whole
# numbers: 32K = 32,768).
_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
             "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _human_int(text: str) -> int:
    """An integer, or one written as 4k, 25.6k or 32K; ValueError if it is none of those or a
    decimal suffix leaves a fraction (1.0001k)."""
    match = re.fullmatch(r"(\d+)(?:\.(\d+))?([kmgtKMGT])", text.strip())
    if match is None:
        return int(text)  # a plain integer (or the ValueError)
    whole, fraction, suffix = match.groups()
    if fraction is not None and suffix.isupper():
        raise ValueError(text)  # binary suffixes take whole numbers only
    fraction = fraction or ""
    value, rest = divmod(int(whole + fraction) * _SUFFIXES[suffix], 10 ** len(fraction))
    if rest:
        raise ValueError(text)
    return value


_token_count = _checked(_human_int, "an integer (or 4k = 4,000, 32K = 32,768)", ">= 1",
                        lambda v: v >= 1)


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _chat_template(text: str) -> str:
    """--chat-template: a file's path, or the template itself (vLLM's rule: a file if one is
    there, else text with a brace or a line break is a template, its escapes such as \\n read
    as the characters); the template's source, checked to be valid jinja."""
    import codecs

    import jinja2

    from engine.model.chat_template import compile_template

    path = Path(text)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a template longer than a path may be, or with a NUL
        is_file = False
    if is_file or not any(c in text for c in "{}\n"):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise argparse.ArgumentTypeError(
                f"{text!r} is neither a readable UTF-8 file ({getattr(e, 'strerror', None) or e})"
                " nor a template (a template has {% ... %} or {{ ... }})") from None
        where = f"{text}: "
    else:
        source, where = text, ""
        if "\\" in text:
            source = codecs.decode(text.encode("latin-1", "backslashreplace"), "unicode_escape")
    try:
        compile_template(source)
    except jinja2.TemplateError as e:
        raise argparse.ArgumentTypeError(f"{where}not a valid jinja template: {e}") from None
    return source


def _generation_config(text: str) -> str:
    problem = generation_config_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _engine_flags() -> argparse.ArgumentParser:
    """The flags serve, generate and trace share: EngineConfig's, and --log-level."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("engine")
    g.add_argument("--device", choices=("auto", "cuda", "cpu", "numpy"), default="auto",
                   help="where the model runs: cuda (CuPy kernels), cpu (the numpy reference; "
                        "numpy is another name for it), or auto = cuda when an NVIDIA GPU and "
                        "CuPy are present (default: auto)")
    g.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weight and activation dtype (half = float16, float = float32); cuda "
                        "computes in float16 or bfloat16, cpu in float32 (others are refused); "
                        "auto = float16 for an fp16 checkpoint, else bfloat16 on cuda, float32 "
                        "on cpu")
    g.add_argument("--max-model-len", type=_token_count, default=None, metavar="N",
                   help="longest sequence (prompt + output) in tokens, e.g. 4096, 4k (4,000) or "
                        "32K (32,768) (default: the model's max_position_embeddings, lowered to "
                        "what the KV cache holds)")
    g.add_argument("--max-num-seqs", type=_positive_int, default=256, metavar="N",
                   help="most sequences in one batch (default: 256)")
    g.add_argument("--max-num-batched-tokens", type=_token_count, default=None, metavar="N",
                   help="token budget of one engine step; longer prompts are prefilled in chunks "
                        f"(default: {GPU_STEP_TOKENS} on cuda, {CPU_STEP_TOKENS} on cpu, where a "
                        "step of 8192 prompt tokens would hold every other request, and an "
                        "abort, for tens of seconds)")
    g.add_argument("--block-size", type=_positive_int, default=16, metavar="N",
                   help="tokens per KV-cache block (default: 16)")
    g.add_argument("--num-kv-blocks", type=_positive_int, default=None, metavar="N",
                   help="KV-cache blocks to allocate (default: sized from free memory)")
    g.add_argument("--gpu-memory-utilization", type=_fraction, default=0.9, metavar="F",
                   help="fraction of GPU memory that weights + KV cache may use (default: 0.9)")
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV blocks of prompts that share a prefix (default: on)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="never capture CUDA graphs; run every decode step eagerly")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch step N+1 while step N runs on the device; "
                        "--no-async-scheduling keeps the synchronous loop (default: on for "
                        "cuda, off for cpu)")
    g.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="auto = read the weights; dummy = random weights at the model's shapes "
                        "(benchmarks without a checkpoint; MODEL may then be a preset name) "
                        "(default: auto)")
    g.add_argument("--quantization", "-q", default=None,
                   choices=("fp8", *(k.lower() for k in GGUF_KINDS)),
                   help="fp8: the linear layers (qkv, o, gate_up, down) run W8A8 in FP8 E4M3, a "
                        "bf16/fp16 checkpoint quantized at load (per-channel weight scales, "
                        "per-token activation scales); the embedding and lm_head stay 16-bit "
                        "(PAGEDSERVE_FP8_LM_HEAD=1 makes the lm_head FP8 too). A "
                        "checkpoint stored in FP8 loads as FP8 without it. A GGUF block format "
                        "(q4_k, q8_0, ...): dummy weights drawn as random blocks of that format "
                        "(with --load-format dummy; a .gguf file's formats come from the file). "
                        "Default: none")
    g.add_argument("--gguf-dequantize", action=argparse.BooleanOptionalAction, default=None,
                   help="dequantize a .gguf file's Q8_0/Q4_0/Q4_1/Q4_K/Q5_K/Q6_K tensors at load "
                        "(the old path: 16-bit weights on the GPU, a converted cache on disk); "
                        "--no-gguf-dequantize keeps them quantized on cpu too (default: kept "
                        "quantized on cuda, dequantized on cpu)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of the engine's random numbers (dummy weights, unseeded sampling) "
                        "(default: 0)")
    g.add_argument("--cpu-threads", type=_positive_int, default=1, metavar="N",
                   help="BLAS threads of the cpu backend (and the host side of cuda); 1 is "
                        "fastest on a small, busy machine (default: 1)")
    g.add_argument("--max-logprobs", type=int, default=20, metavar="N",
                   help="most logprobs a request may ask per token (a request asks 0..20, or "
                        "-1 for the whole vocabulary, which needs -1 here or at least the "
                        "vocabulary's size) (default: 20, as vLLM)")
    g.add_argument("--generation-config", type=_generation_config, default="auto",
                   metavar="auto|vllm|FOLDER",
                   help="sampling defaults for the fields a request leaves unset (temperature, "
                        "top_p, top_k, min_p, repetition_penalty, and max_new_tokens as "
                        "max_tokens): auto = the model folder's generation_config.json, as the "
                        "model's creator recommends them (a .gguf file has none); vllm = none "
                        "(the neutral defaults); or a folder holding a generation_config.json "
                        "(default: auto)")
    g.add_argument("--speculative-config", type=_json_object, default=None, metavar="JSON",
                   help='n-gram speculative decoding, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 3, "prompt_lookup_max": 4, '
                        '"prompt_lookup_min": 2, "disable_by_batch_size": 32}\' (default: off)')
    t = p.add_argument_group("tensor parallel (README: Several GPUs)")
    t.add_argument("--tensor-parallel-size", "-tp", type=_positive_int, default=1, metavar="N",
                   help="split every layer over N GPUs (N processes on cpu); this process is "
                        "rank 0 (default: 1)")
    t.add_argument("--tp-local-ranks", type=_positive_int, default=None, metavar="K",
                   help="ranks 0..K-1 run on this host; start the others on their hosts with "
                        "`pagedserve worker --rank R` (default: all N here)")
    t.add_argument("--master-addr", default=None, metavar="ADDR",
                   help="address rank 0 listens on for the other ranks (default: "
                        "$PAGEDSERVE_MASTER_ADDR, else 127.0.0.1)")
    t.add_argument("--master-port", type=_port, default=None, metavar="PORT",
                   help="its port (default: $PAGEDSERVE_MASTER_PORT, else any free port)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="taken for vLLM command lines: no code of a model is ever run (a model "
                        "whose architecture this engine lacks is refused as it loads)")
    g.add_argument("--log-level", default=None,
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="logging verbosity (default: info for serve, warning for generate)")
    return p


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def _host_names(text: str) -> list[str]:
    """--allowed-hosts: names as the Host header has them, without the port (any port is served):
    a name with a port or a scheme never matched, and the 421 listed it among those served."""
    from server.guards import host_name

    names = _names(text)
    for name in names:
        if name != "*" and ("/" in name or host_name(name) != name.lower()
                            or (":" in name and not name.startswith("["))):
            raise argparse.ArgumentTypeError(
                f"a Host name without a port or a scheme (any port is served; an IPv6 address "
                f"in brackets), got {name!r}")
    return names


def _origins(text: str) -> list[str]:
    """--allowed-origins: each as a browser's Origin header spells it (CORS compares them whole):
    "https://app.example/" or "app.example" let no page in."""
    origins = _names(text)
    for origin in origins:
        # "null": the Origin of a file:// page, which Starlette compares as any other
        if origin not in ("*", "null") and not re.fullmatch(
                r"[a-z][a-z0-9+.-]*://[^/?#\sA-Z]+", origin):
            raise argparse.ArgumentTypeError(
                f"an origin as browsers send it, SCHEME://HOST[:PORT] in lower case with no "
                f"path or trailing '/' (e.g. https://app.example), got {origin!r}")
    return origins


def _model_name(text: str) -> str:
    if not text.strip():  # clients must be able to send it
        raise argparse.ArgumentTypeError("the served model name must not be empty")
    return text


def _api_key_problem(key: str) -> str | None:
    """What makes `key` no API key, or None. Empty: `--api-key "$KEY"` with KEY unset would leave
    the server open; whitespace around it: a header's value is stripped, so no client could send
    it (every call a 401)."""
    if not key.strip():
        return "must not be empty (it would leave the API open)"
    if key != key.strip():
        return "must not start or end with whitespace (no client could send it)"
    return None


def _api_key(text: str) -> str:
    if (problem := _api_key_problem(text)) is not None:
        raise argparse.ArgumentTypeError(f"the API key {problem}")
    return text


def _root_path(text: str) -> str:
    if text and not text.startswith("/"):
        raise argparse.ArgumentTypeError(f"a path that starts with '/', got {text!r}")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (main's promise), not the usage (20-30
    lines for serve) above it; --help still shows the usage. Subcommands inherit the class."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pagedserve",
        description="pagedserve: an LLM serving engine with PagedAttention and continuous "
                    "batching, on CuPy + CUDA kernels or numpy.")
    parser.add_argument("--version", action="version", version=f"pagedserve {package_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    engine_flags = _engine_flags()

    s = sub.add_parser("serve", parents=[engine_flags], help="serve an OpenAI-compatible HTTP API",
                       description="Serve MODEL over an OpenAI-compatible HTTP API "
                                   "(/v1/completions, /v1/chat/completions, /metrics, ...).")
    s.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="an HF model folder, a Hugging Face id (ORG/NAME: the local HF cache, "
                        "else a download), a .gguf file, a preset name (with --load-format "
                        "dummy), or nothing for the default model (SmolLM2-135M-Instruct)")
    s.add_argument("--model", dest="model_flag", default=None, metavar="MODEL",
                   help="MODEL as a flag (vLLM's older spelling); not with MODEL as well")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind; use 0.0.0.0 to accept other machines (default: "
                        "127.0.0.1, this machine only)")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (default: 8000)")
    s.add_argument("--api-key", type=_api_key, default=None,
                   help="require `Authorization: Bearer KEY` on every endpoint except /health, "
                        "/metrics and the /dashboard page (its feed needs the key) (default: "
                        "$PAGEDSERVE_API_KEY, else vLLM's $VLLM_API_KEY: `ps` shows neither)")
    s.add_argument("--allowed-hosts", type=_host_names, action="extend", default=[], metavar="H,..",
                   help="Host header names to serve besides localhost, 127.0.0.1 and [::1] "
                        "(any port; '*' = any). Bound to a loopback address, other names get "
                        "421, which stops DNS-rebinding web pages (default: none added; "
                        "bound elsewhere, any Host unless this is given)")
    s.add_argument("--allowed-origins", type=_origins, action="extend", default=[], metavar="O,..",
                   help="web origins (e.g. https://app.example) that CORS lets call the API from "
                        "a browser; '*' = any (default: CORS off)")
    s.add_argument("--chat-content-special-tokens", action="store_true",
                   help="tokenize special tokens inside chat message content (and tools, "
                        "documents, chat_template_kwargs) as control tokens (HF's behaviour; "
                        "lets a client forge turns). Default: they stay text")
    s.add_argument("--chat-template", type=_chat_template, default=None, metavar="FILE|TEMPLATE",
                   help="a jinja chat template, a file or the template itself, that renders "
                        "every chat (tools included) in place of the model's (default: the "
                        "model's, from chat_template.jinja, tokenizer_config.json or the GGUF)")
    s.add_argument("--served-model-name", type=_model_name, nargs="+", default=None,
                   metavar="NAME",
                   help="the model name clients send and /v1/models lists (default: MODEL); "
                        "several: requests may send any, answers name the first")
    s.add_argument("--data-parallel-size", "-dp", type=_positive_int, default=1, metavar="N",
                   help="run N engine cores, each a full copy of the model on its own GPU (core i "
                        "on GPU i of CUDA_VISIBLE_DEVICES), behind this one API process; each "
                        "request goes to the core with the least unfinished work, or, with "
                        "prefix caching, to the core that ran its prompt's first blocks "
                        "(default: 1)")
    s.add_argument("--max-waiting-requests", type=_positive_int, default=None, metavar="N",
                   help="answer 429 while N requests already wait for their first token "
                        "(default: no limit)")
    s.add_argument("--enable-server-load-tracking", action="store_true",
                   help="count generation calls in flight, read at GET /load (vLLM's flag)")
    s.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name tokens 'token_id:N' unless a request sets "
                        "return_tokens_as_token_ids false (vLLM's flag)")
    s.add_argument("--root-path", type=_root_path, default="", metavar="/PREFIX",
                   help="the prefix a reverse proxy serves the API under: requests are served "
                        "with it or without it (vLLM's flag) (default: none)")
    s.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="serve GET /tokenizer_info: the special tokens, the chat template and "
                        "the length limit (vLLM's flag; off: it shows the chat template)")
    s.add_argument("--enable-per-request-metrics", action="store_true",
                   help="answers (a stream: its closing usage chunk) carry the request's timings "
                        "in 'metrics': queue, time to first token, decode time, mean inter-token "
                        "latency, tokens per second (vLLM's flag)")
    s.add_argument("--enable-force-include-usage", action="store_true",
                   help="every stream ends with usage and carries it on every chunk, as if each "
                        "request asked stream_options include_usage and continuous_usage_stats "
                        "(vLLM's flag)")
    s.add_argument("--reasoning-parser", choices=REASONING_KINDS, default=None,
                   help="chat answers of a thinking model: what it writes inside <think> ... "
                        "</think> goes out as message.reasoning (and reasoning_content), the "
                        "rest as content; deepseek_r1: the answer starts inside the block, "
                        "qwen3: where it opens <think> or the chat template left the block "
                        "open (vLLM's flag) (default: off, all of it is content)")
    s.add_argument("--max-stored-responses", type=_non_negative_int, default=256, metavar="N",
                   help="keep the last N answers of POST /v1/responses (store: true) in memory, "
                        "for GET /v1/responses/{id} and previous_response_id; each holds its "
                        "whole conversation. 0 = keep none (default: 256)")
    s.add_argument("--no-dashboard", dest="dashboard", action="store_false",
                   help="turn off the live dashboard at /dashboard (and its feed)")
    s.add_argument("--engine-heartbeat-timeout", type=float, default=10, metavar="S",
                   help="fail the engine core, as if it had died, when nothing (not even its "
                        "heartbeat, sent every 0.5 s by a thread of its own) comes from it for S "
                        "seconds: a stopped or wedged process. In-flight requests get a 500, "
                        "/health 503, the core is killed and the server exits 1. 0 = never; "
                        "else at least 2 (default: 10)")
    s.add_argument("--engine-step-timeout", type=float, default=300, metavar="S",
                   help="fail the engine core the same way when its loop makes no progress for S "
                        "seconds while requests are in flight (heartbeats come, but no step "
                        "ends: a hung kernel, a deadlock). Raise it if one step of a large model "
                        "on the cpu takes longer. 0 = never; else at least 1 (default: 300)")
    s.add_argument("--disable-log-stats", action="store_true",
                   help="no throughput line every 10 s while busy (vLLM's flag)")
    s.add_argument("--uvicorn-log-level", default=None,
                   choices=("critical", "error", "warning", "info", "debug", "trace"),
                   help="uvicorn's loggers (its start-up and error lines, the access line of "
                        "each HTTP request) at this level (vLLM's flag) (default: --log-level's, "
                        "uvicorn's start-up lines only at debug)")
    s.add_argument("--disable-uvicorn-access-log", action="store_true",
                   help="no access line per HTTP request (vLLM's flag)")
    s.add_argument("--disable-log-requests", action="store_true",
                   help="taken for vLLM command lines: no request is logged anyway, besides "
                        "uvicorn's access line (--disable-uvicorn-access-log)")

    g = sub.add_parser("generate", parents=[engine_flags], help="complete one prompt and print "
                       "it with the speed", description="Complete PROMPT once and print the text, "
                       "then the token counts and the speed.")
    g.add_argument("prompt", metavar="PROMPT", help="the prompt text")
    g.add_argument("--model", default=None,
                   help="an HF model folder, a Hugging Face id (ORG/NAME), a .gguf file, or a "
                        "preset name (with --load-format dummy); default: SmolLM2-135M-Instruct")
    g.add_argument("--max-tokens", type=_positive_int, default=None, metavar="N",
                   help="most tokens to generate (default: --generation-config's "
                        "max_new_tokens, else 64)")
    g.add_argument("--temperature", type=float, default=None, metavar="T",
                   help="sampling temperature; 0 = greedy (default: --generation-config's, "
                        "else 0)")
    g.add_argument("--chat", action="store_true",
                   help="wrap PROMPT as a user message in the model's chat template")
    w = sub.add_parser("worker", help="run one tensor-parallel rank for a rank 0 on another host",
                       description="Join the tensor-parallel group whose rank 0 (pagedserve "
                                   "serve / generate with --tensor-parallel-size and "
                                   "--tp-local-ranks) listens at --master-addr:--master-port; "
                                   "the model and settings come from rank 0. "
                                   "$PAGEDSERVE_TP_SECRET must hold rank 0's secret (every "
                                   "message is signed with it).")
    add_worker_flags(w)

    t = sub.add_parser("trace", parents=[engine_flags], help="record every step of a small "
                       "workload to JSON, for the dashboard to replay",
                       description="Run a teaching workload and record each step's schedule and "
                                   "block-table changes; open /dashboard and load the file.")
    t.add_argument("workload", choices=("shared-prefix", "preemption"),
                   help="shared-prefix: three requests share a cached prefix; preemption: a "
                        "tiny KV pool runs out and the newest request is preempted")
    t.add_argument("--model", default=None, help="as for generate (default: SmolLM2-135M-Instruct)")
    t.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the trace (default: WORKLOAD.trace.json)")
    return parser


def step_tokens(args: argparse.Namespace) -> int:
    """--max-num-batched-tokens, or its default for the device the engine will run on."""
    if args.max_num_batched_tokens is not None:
        return args.max_num_batched_tokens
    return GPU_STEP_TOKENS if resolve_device(args.device) == "cuda" else CPU_STEP_TOKENS


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    config = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=step_tokens(args),
        block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=args.enable_prefix_caching, enforce_eager=args.enforce_eager,
        async_scheduling=args.async_scheduling, load_format=args.load_format, seed=args.seed,
        quantization=args.quantization, gguf_dequantize=args.gguf_dequantize,
        cpu_threads=args.cpu_threads, speculative_config=args.speculative_config,
        tensor_parallel_size=args.tensor_parallel_size, tp_local_ranks=args.tp_local_ranks,
        master_addr=args.master_addr, master_port=args.master_port,
        max_logprobs=args.max_logprobs, generation_config=args.generation_config)
    config.validate()
    return config


def main(argv: list[str] | None = None) -> int:
    """Exit status: 0, 2 for a bad flag or input, 1 when the server or the model cannot start;
    every failure is one line on stderr (--log-level debug adds the traceback)."""
    started = time.perf_counter()
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's error: its --help lists its flags (the top level's does not)
        _subcommand(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "serve":
        _serve_model(_subcommand(parser, "serve"), args)
    if args.command == "worker":
        return run_worker_args(args)
    configure_logging(args.log_level or ("info" if args.command == "serve" else "warning"))
    if args.command == "serve":
        _serve_logging(args)
    try:
        config = engine_config_from_args(args)
        if args.command == "serve":
            return serve(args, config, started)
        if args.command == "trace":
            from server.trace import trace

            return trace(args, config, _given_dests(argv, "trace"))
        return generate(args, config)
    except KeyboardInterrupt as e:  # 128 + the signal's number, as the shell reports it
        return 128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        # Mistakes a user can make (bad path, unknown preset, prompt too long): one clear line.
        return _fail(_in_flag_names(parser, args.command, str(e)), 2)
    except (StartupError, DeviceError) as e:
        return _fail(f"{e}", 1)
    except Exception as e:  # anything else that stops the model from loading, still one line
        return _fail(f"{type(e).__name__}: {e}", 1)


def _serve_logging(args: argparse.Namespace) -> None:
    """serve's logging flags, over configure_logging's levels."""
    if args.disable_log_stats:
        logging.getLogger("pagedserve.stats").setLevel(logging.WARNING)
    if args.uvicorn_log_level is not None:
        level = 5 if args.uvicorn_log_level == "trace" else args.uvicorn_log_level.upper()
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            logging.getLogger(name).setLevel(level)
    if args.disable_uvicorn_access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.CRITICAL + 1)


def _subcommand(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _serve_model(serve_parser: argparse.ArgumentParser, args) -> None:
    """args.model from MODEL or --model (one of them). --served-model-name takes every word
    after it (vLLM's rule): a model written after its names would be served as a name, and the
    default model under it, so a name that names a model is refused."""
    if args.model_flag is not None:
        if args.model is not None:
            serve_parser.error(f"give the model once: MODEL ({args.model}) or --model "
                               f"({args.model_flag}), not both")
        args.model = args.model_flag
    if args.model is not None:
        return
    for name in (args.served_model_name or [])[1:]:
        if name.endswith(".gguf") or Path(name).exists() or (PRESETS_DIR / f"{name}.json").exists():
            serve_parser.error(f"--served-model-name took {name!r}, which names a model: give "
                               "MODEL before the flag (the names take every word after it)")


def _given_dests(argv: list[str] | None, command: str) -> set[str]:
    """The dests of the flags `argv` gives `command` itself (a default's value included): the
    parse again with no defaults, so that only what was given is set."""
    parser = build_parser()
    for action in _subcommand(parser, command)._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _in_flag_names(parser: argparse.ArgumentParser, command: str, message: str) -> str:
    """An engine setting's error in the names of the command's flags."""
    flags = {}
    for action in _subcommand(parser, command)._actions:
        names = [o for o in action.option_strings if o.startswith("--")]
        if names and action.dest not in ("help", "model"):
            flags[action.dest] = names[0]
    return in_flag_names(message, flags)


def in_flag_names(message: str, flags: dict[str, str]) -> str:
    """`message` with the engine settings it names written as their flags (`flags`: setting ->
    flag): "max_logprobs must be" -> "--max-logprobs must be", "give more num_kv_blocks" ->
    "give more --num-kv-blocks"."""
    for dest, flag in flags.items():
        if "_" in dest:  # a name no sentence uses as a plain word
            message = re.sub(rf"\b{dest}\b", flag, message)
        elif message.startswith(f"{dest} "):
            message = flag + message[len(dest):]
    return message


def _fail(message: str, status: int) -> int:
    log.debug("the traceback", exc_info=True)
    print(f"pagedserve: error: {message}", file=sys.stderr)
    return status


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening address, taken before the model loads so a busy port fails in a second."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP,
    # and without it every response waits ~40 ms on Nagle + delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def load_engine(config: EngineConfig):
    from engine.engine import LLMEngine

    return LLMEngine(config)


# After the engine core dies: the server stops taking requests at once, gives the answers in
# flight this long to drain, and the process ends by this deadline whatever is still open.
DRAIN_S = 2.0
DRAIN_END_AT = 0.75  # of DRAIN_S: requests still running then end with "abort"
EXIT_DEADLINE_S = 4.0


def serve(args: argparse.Namespace, config: EngineConfig, started: float) -> int:
    """The API process: binds the port, spawns the engine-core process and waits for its model,
    then serves. Exit status 1 if the core dies while serving."""
    import uvicorn

    from server.app import DEFAULT_MODEL_NAME

    # serve's own engine flag (several cores need this API process; argparse checked it >= 1)
    config.data_parallel_size = args.data_parallel_size
    sock = bind_socket(args.host, args.port)
    died: list[str] = []

    def on_fatal(cause: str):
        # A supervisor restarts a server that exits non-zero; one that stayed up with a dead
        # core would only answer 503s.
        died.append(cause)
        server.should_exit = True
        deadline = threading.Timer(EXIT_DEADLINE_S, os._exit, (1,))
        deadline.daemon = True  # a clean shutdown before it exits at once
        deadline.start()

    from server.guards import is_loopback

    app = app_from_args(args, config, on_fatal=on_fatal)
    if app.state.settings.api_key is None and not is_loopback(args.host):
        log.warning("serving on %s without --api-key: anyone who can reach the port can use the "
                    "model", args.host)
    engine = app.state.engine

    def stop_loading(signum, frame):  # uvicorn's handler comes later: end as Ctrl-C would,
        raise Terminated  # through load()'s clean-up (the core, the socket folder)

    main_thread = threading.current_thread() is threading.main_thread()  # (tests: a thread)
    previous = signal.signal(signal.SIGTERM, stop_loading) if main_thread else None
    try:
        summary = engine.load()  # raises what loading raised, in the core process
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    try:
        name = config.model or f"{DEFAULT_MODEL_NAME} (default)"
        for line in (model_line(engine.engine.model_config, name), *summary,
                     f"ready in {time.perf_counter() - started:.1f} s"):
            log.info(line)
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        feed = getattr(app.state, "dashboard", None)
        server = _server_class()(uvicorn.Config(app, log_config=None, log_level=None,
                                                timeout_graceful_shutdown=DRAIN_S), url,
                                 on_shutdown=engine.end_all,
                                 on_stopping=feed.close if feed is not None else None)
        server.run(sockets=[sock])
    finally:
        engine.client.shutdown()  # a no-op after the lifespan's; here if uvicorn never started
    if died:
        log.error("the engine core died: %s", died[0])
        return 1
    return 0 if server.started else 1


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn, saying "serving on URL" once it accepts connections."""

        def __init__(self, config, url: str, on_shutdown=None, on_stopping=None):
            super().__init__(config)
            self.url, self.on_shutdown, self.on_stopping = url, on_shutdown, on_stopping

        async def shutdown(self, sockets=None):
            if self.on_stopping is not None:  # responses that never end by themselves (feeds)
                self.on_stopping()
            # Requests in flight may finish during the drain; those still running near its end
            # are ended with their last output (finish_reason "abort"), so that their streams
            # close properly (a last chunk, [DONE]) instead of being cut off when it runs out.
            if self.on_shutdown is not None:
                asyncio.get_running_loop().call_later(DRAIN_S * DRAIN_END_AT, self._end_all)
            await super().shutdown(sockets)

        def handle_exit(self, sig, frame):
            # The shutdown is bounded (a drain of DRAIN_S, then the engine's close): a signal
            # once it runs (Ctrl-C again, SIGTERM after Ctrl-C, or either after the engine core
            # died) changes nothing. uvicorn's forces the exit, which leaves the app's lifespan
            # task to be cancelled mid-wait, and re-raises each signal it took: tracebacks, not
            # a faster stop.
            if not self.should_exit:
                super().handle_exit(sig, frame)

        def _end_all(self):
            ended = self.on_shutdown()
            if ended:
                log.info("shutting down: %d request(s) in flight ended with 'abort'", ended)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                log.info("HTTP on %s", http_stack(self.config))
                log.info("serving on %s", self.url)

    return Server


def http_stack(config) -> str:
    """What uvicorn serves on, read inside its loop: "uvloop + httptools" where they are
    installed (dependencies: less CPU per streamed chunk, README: Performance), asyncio and h11
    in place of whichever is missing."""
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]  # uvloop or asyncio
    http = "httptools" if config.http_protocol_class.__name__ == "HttpToolsProtocol" else "h11"
    return f"{loop} + {http}"


def api_key_from(args: argparse.Namespace) -> str | None:
    """--api-key, else $PAGEDSERVE_API_KEY, else vLLM's $VLLM_API_KEY (an empty one is unset).
    A variable's key with whitespace around it (an env file's trailing space, a secret's newline)
    is refused as the flag's is: the header's value is stripped, so every call was a 401."""
    if args.api_key is not None:
        return args.api_key
    for name in ("PAGEDSERVE_API_KEY", "VLLM_API_KEY"):
        key = os.environ.get(name)
        if key:
            if (problem := _api_key_problem(key)) is not None:
                raise ValueError(f"${name} {problem}")
            return key
    return None


def app_from_args(args: argparse.Namespace, config: EngineConfig, make_core=None, on_fatal=None):
    """The app `serve` runs (create_app says what make_core and on_fatal are)."""
    from server.app import create_app
    from server.guards import allowed_hosts_for

    return create_app(config, served_model_name=args.served_model_name,
                      api_key=api_key_from(args),
                      max_waiting_requests=args.max_waiting_requests, make_core=make_core,
                      on_fatal=on_fatal,
                      allowed_hosts=allowed_hosts_for(args.host, args.allowed_hosts),
                      allowed_origins=args.allowed_origins or None,
                      chat_content_special_tokens=args.chat_content_special_tokens,
                      dashboard=args.dashboard,
                      enable_server_load_tracking=args.enable_server_load_tracking,
                      return_tokens_as_token_ids=args.return_tokens_as_token_ids,
                      force_include_usage=args.enable_force_include_usage,
                      root_path=args.root_path,
                      enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
                      enable_per_request_metrics=args.enable_per_request_metrics,
                      max_stored_responses=args.max_stored_responses,
                      reasoning_parser=args.reasoning_parser, chat_template=args.chat_template,
                      liveness=Liveness(args.engine_heartbeat_timeout, args.engine_step_timeout))


class Terminated(KeyboardInterrupt):
    """SIGTERM while the model loads (a supervisor stopping a server that is starting)."""


def generate(args: argparse.Namespace, config: EngineConfig) -> int:
    from engine.core.sampling_params import SamplingParams
    from engine.model.loader import generation_defaults

    # the flags first: a bad --temperature is refused before the model loads; the model's
    # generation config under them, as a server request that leaves them out gets it
    flags = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    params = SamplingParams(**{"max_tokens": 64, "temperature": 0.0,
                               **generation_defaults(config),
                               **{k: v for k, v in flags.items() if v is not None}})
    t_load = time.perf_counter()
    engine = load_engine(config)
    load_s = time.perf_counter() - t_load
    if engine.tokenizer is None:
        raise ValueError("this model has no tokenizer, so `pagedserve generate` cannot read a "
                         "text prompt (serve it and send token ids: `pagedserve serve`)")
    if args.chat:
        messages = [{"role": "user", "content": args.prompt}]
        prompt = {"prompt_token_ids": engine.tokenizer.apply_chat_template(messages)}
    else:
        prompt = args.prompt
    start = time.perf_counter()
    first_token_s = None
    engine.add_request("generate-0", prompt, params)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            completion = out.outputs[0]
            if first_token_s is None and completion.token_ids:
                first_token_s = time.perf_counter() - start
            print(completion.delta_text, end="", flush=True)
            final = out
    elapsed = time.perf_counter() - start
    print()
    num_prompt = len(final.prompt_token_ids)
    num_generated = len(final.outputs[0].token_ids)
    # Decode speed excludes the prefill, the number one compares with other engines.
    decode_s = elapsed - (first_token_s or 0.0)
    decode_rate = (num_generated - 1) / decode_s if num_generated > 1 and decode_s > 0 else 0.0
    print(f"[{_count(num_prompt, 'prompt token')}, {num_generated} generated in {elapsed:.2f} s: "
          f"{num_generated / elapsed:.1f} tok/s overall, {decode_rate:.1f} tok/s decode, "
          f"first token {1000 * (first_token_s or 0):.0f} ms; model loaded in {load_s:.1f} s; "
          f"finish: {final.outputs[0].finish_reason}]", file=sys.stderr)
    return 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


if __name__ == "__main__":  # python -m server.cli, where the console script is not installed
    sys.exit(main())
