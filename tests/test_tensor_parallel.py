"""Tensor parallelism on the numpy backend (issue 17): sharded weights + the shared-memory
communicator give TP=1's logits (within 1e-4) and greedy tokens, on threads (the math) and on
worker processes (the whole engine); a dead worker ends the engine with a clear error."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import _tiny_loaded, free_port, sharpen, tiny_model_config

from engine.core.outputs import EngineDeadError
from engine.core.sampling_params import SamplingParams
from engine.engine import LLMEngine
from engine.executor import workers
from engine.executor.distributed import CommunicatorError, ShmCommunicator
from engine.executor.ops import AttentionMetadata
from engine.executor.ops.numpy_ops import NumpyOps
from engine.executor.tensor_parallel import (
    TensorParallelOps,
    check_tensor_parallel,
    shard_config,
    shard_weights,
)
from engine.executor.transformer import Transformer
from engine.llm import LLM
from engine.model.config import ConfigError, EngineConfig, ModelConfig
from engine.model.loader import dummy_weights
from engine.model.quantized import QuantizedWeight

# ---- the math, ranks as threads -----------------------------------------------------------------


def _forward(config: ModelConfig, weights, ops, num_kv_heads: int):
    """Logits of every row of a 2-sequence prefill (5 and 3 tokens), (8, vocab)."""
    cache = NumpyOps().alloc_kv_cache(config.num_layers, 4, num_kv_heads, 4, config.head_dim)
    meta = AttentionMetadata(slot_mapping=np.array([0, 1, 2, 3, 4, 8, 9, 10], np.int32),
                             query_start_loc=np.array([0, 5, 8], np.int32),
                             context_lens=np.array([5, 3], np.int32),
                             block_tables=np.array([[0, 1], [2, -1]], np.int32),
                             max_query_len=5, max_context_len=5)
    ids = np.array([5, 17, 3, 60, 22, 9, 41, 1], np.int32)
    positions = np.array([0, 1, 2, 3, 4, 0, 1, 2], np.int32)
    return Transformer(config, weights, ops, 64).forward(ids, positions, cache, meta, None)


def _ranks_as_threads(size: int, work, slot_bytes: int = ShmCommunicator.SLOT_BYTES,
                      timeout_s: float = 30.0) -> list:
    root = ShmCommunicator(None, 0, size, slot_bytes=slot_bytes, timeout_s=timeout_s)
    comms = [root] + [ShmCommunicator(root.name, r, size, slot_bytes=slot_bytes,
                                      timeout_s=timeout_s) for r in range(1, size)]
    results = [None] * size

    def run(r):
        try:
            results[r] = work(comms[r])
        except Exception as e:
            results[r] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    root.unlink()
    for c in comms:
        c.close()
    return results


def _tp_logits(config: ModelConfig, weights, size: int) -> list:
    def rank(comm):
        ops = TensorParallelOps(NumpyOps(), comm, comm.rank, size, config.vocab_size)
        part = shard_config(config, size)
        return _forward(part, shard_weights(weights, config, comm.rank, size), ops,
                        part.num_kv_heads)

    results = _ranks_as_threads(size, rank)
    assert not [r for r in results if isinstance(r, Exception)], results
    return results


@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("arch,overrides", [
    ("LlamaForCausalLM", {}),  # 2 KV heads: split at N=2, replicated at N=4
    ("Qwen2ForCausalLM", {"attention_bias": True}),
    ("Qwen3ForCausalLM", {"qk_norm": True, "tie_word_embeddings": True}),
])
def test_tp_logits_match_one_rank(size, arch, overrides):
    config = tiny_model_config(vocab_size=128, architecture=arch, **overrides)
    weights = sharpen(dummy_weights(config, NumpyOps(), seed=1))
    for layer in weights.layers:
        if layer.qkv_bias is not None:
            layer.qkv_bias += 0.5
    want = _forward(config, weights, NumpyOps(), config.num_kv_heads)
    got = _tp_logits(config, weights, size)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-4)
    assert all(g is None for g in got[1:])  # only rank 0 holds the logits
    assert np.abs(want).max() > 1  # not trivially small


def test_kv_heads_fewer_than_ranks_are_replicated_to_the_right_ranks():
    config = tiny_model_config(num_heads=4, num_kv_heads=2)
    weights = dummy_weights(config, NumpyOps(), seed=0)
    d, q = config.head_dim, config.q_size
    for rank, kv_head in ((0, 0), (1, 0), (2, 1), (3, 1)):
        qkv = shard_weights(weights, config, rank, 4).layers[0].qkv  # (d + 2d, hidden)
        full = weights.layers[0].qkv
        np.testing.assert_array_equal(qkv[:d], full[rank * d : (rank + 1) * d])
        np.testing.assert_array_equal(qkv[d : 2 * d], full[q + kv_head * d : q + (kv_head + 1) * d])


def test_collectives_larger_than_a_slot_go_through_in_chunks():
    size = 3

    def work(comm):
        r = comm.rank
        x = np.arange(1000, dtype=np.float32).reshape(10, 100) * (r + 1)
        ids = np.arange(77, dtype=np.int32) if r == 0 else np.zeros(77, np.int32)
        return (comm.all_reduce(x), comm.gather(x[:, :30] + r), comm.broadcast(ids))

    results = _ranks_as_threads(size, work, slot_bytes=64)  # 16 floats a chunk
    base = np.arange(1000, dtype=np.float32).reshape(10, 100)
    for r, (summed, gathered, ids) in enumerate(results):
        np.testing.assert_array_equal(summed, base * 6)
        np.testing.assert_array_equal(ids, np.arange(77))
        if r:
            assert gathered is None
    want = np.concatenate([base[:, :30] * (r + 1) + r for r in range(size)], axis=1)
    np.testing.assert_array_equal(results[0][1], want)


def test_a_rank_that_never_joins_times_out_naming_it():
    def work(comm):
        if comm.rank == 1:
            return None
        return comm.all_reduce(np.ones(4, np.float32))

    results = _ranks_as_threads(2, work, timeout_s=0.3)
    assert isinstance(results[0], CommunicatorError)
    assert "rank(s) [1] did not join a collective within 0.3 s" in str(results[0])


def test_a_rank_that_cannot_see_rank_0s_shared_memory_says_it_must_run_on_that_host():
    """The cpu backend's ranks share memory: a rank started on another host finds no segment.
    That is no missing model file (a bare FileNotFoundError, which rank 0 reported as the
    rank's failure, read like one)."""
    with pytest.raises(CommunicatorError, match=r"segment 'psm_elsewhere' is not on this host: "
                                                r"on the cpu backend every tensor-parallel rank "
                                                r"runs on rank 0's host"):
        ShmCommunicator("psm_elsewhere", 1, 2)


# ---- errors at start-up --------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,size,field", [
    ({}, 3, "num_attention_heads (4)"),
    ({"intermediate_size": 100}, 8, None),  # 8 does not divide 4 heads either: heads first
    ({"intermediate_size": 130}, 4, "intermediate_size (130)"),
    ({"vocab_size": 510}, 4, "vocab_size (510)"),
    ({"num_heads": 12, "num_kv_heads": 3}, 2, "num_key_value_heads (3)"),
])
def test_sizes_that_do_not_divide_are_refused(overrides, size, field):
    config = tiny_model_config(**overrides)
    with pytest.raises(ConfigError, match=r"tensor_parallel_size \(\d\)") as e:
        check_tensor_parallel(config, size)
    if field:
        assert field in str(e.value)


def test_quantized_weights_are_refused():
    config = tiny_model_config()
    weights = dummy_weights(config, NumpyOps(), seed=0)
    weights.layers[0].o = QuantizedWeight("Q8_0", (64, 64), np.zeros(4, np.uint8))
    with pytest.raises(ConfigError, match="quantized weights"):
        shard_weights(weights, config, 0, 2)


def test_quantized_weights_are_refused_before_any_rank_starts(monkeypatch):
    """Each rank would load (or be sent) the whole model only to fail splitting it."""
    import types

    from engine.model.gguf_weights import dummy_quantized_weights

    def spawned(*args):
        raise AssertionError("a rank was started")

    monkeypatch.setattr(workers, "_spawn_worker", spawned)
    config = tiny_model_config(hidden_size=256, intermediate_size=512, head_dim=64)
    loaded = types.SimpleNamespace(config=config, tokenizer=None,
                                   weights=dummy_quantized_weights(config, NumpyOps(), "Q8_0", 0))
    with pytest.raises(ConfigError, match="tensor_parallel_size > 1 does not support quantized"):
        LLMEngine(EngineConfig(device="numpy", tensor_parallel_size=2), loaded_model=loaded)


def test_bad_tp_settings_name_the_field():
    with pytest.raises(ConfigError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0).validate()
    with pytest.raises(ConfigError, match="tp_local_ranks"):
        EngineConfig(tensor_parallel_size=2, tp_local_ranks=3).validate()


def test_engine_refuses_a_size_that_does_not_divide_before_spawning():
    with pytest.raises(ConfigError, match=r"tensor_parallel_size \(3\) must divide"):
        LLMEngine(EngineConfig(device="numpy", tensor_parallel_size=3),
                  loaded_model=_tiny_loaded(512, False))


# ---- the engine with worker processes ------------------------------------------------------------

PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 47)), [7] * 20, [300, 200, 100]]


def _generate(llm: LLM, **params):
    params = {"max_tokens": 10, "temperature": 0.0, "logprobs": 3, **params}
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], SamplingParams(**params),
                        use_tqdm=False)
    return [[(c.token_ids, c.logprobs) for c in o.outputs] for o in outs]


def _llm(size: int, **fields) -> LLM:
    fields = dict(device="numpy", tensor_parallel_size=size, max_num_batched_tokens=32, **fields)
    return LLM.from_engine(LLMEngine(EngineConfig(**fields), loaded_model=_tiny_loaded(512, False)))


def _assert_same(got, want):
    for g_seqs, w_seqs in zip(got, want, strict=True):
        for (g_ids, g_lp), (w_ids, w_lp) in zip(g_seqs, w_seqs, strict=True):
            assert g_ids == w_ids
            for g, w in zip(g_lp, w_lp, strict=True):
                assert g.keys() == w.keys()
                np.testing.assert_allclose(list(g.values()), list(w.values()), atol=1e-4)


@pytest.fixture(scope="module")
def tp1_outputs():
    with _llm(1) as llm:
        return _generate(llm), _generate(llm, n=2, temperature=0.8, seed=3)


@pytest.mark.parametrize("size,fields", [
    (2, {"async_scheduling": False, "speculative_config": {"num_speculative_tokens": 3}}),
    (4, {"async_scheduling": True}),
])
def test_tp2_and_tp4_generate_what_tp1_generates(size, fields, tp1_outputs):
    """Chunked prefills (32-token budget), a mixed batch, forks (n=2); at TP=2 n-gram drafts
    verified in the forward (greedy output unchanged by them); at TP=4 async scheduling, whose
    placeholders the workers resolve from rank 0's broadcast ids."""
    want, want_n = tp1_outputs
    with _llm(size, **fields) as llm:
        pids = llm.engine.core.workers.worker_pids
        assert sorted(pids) == list(range(1, size))
        _assert_same(_generate(llm), want)
        _assert_same(_generate(llm, n=2, temperature=0.8, seed=3), want_n)
    for pid in pids.values():  # close() stopped them
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_killing_a_worker_ends_the_engine_with_a_clear_error():
    with _llm(2) as llm:
        _generate(llm)
        pid = llm.engine.core.workers.worker_pids[1]
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=r"rank 1 \(pid \d+\) was killed by SIGKILL"):
            _generate(llm)
        assert time.monotonic() - start < 5
        with pytest.raises(EngineDeadError):  # and stays dead
            _generate(llm)



def test_an_llm_built_in_a_thread_that_ends_keeps_its_workers(tp1_outputs):
    """PR_SET_PDEATHSIG fires when the thread that started a worker ends, not the process: an
    LLM built in a thread pool must keep its ranks once that thread is gone."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        llm = pool.submit(_llm, 2).result()
    with llm:
        time.sleep(0.5)  # the pool's thread has ended
        _assert_same(_generate(llm), tp1_outputs[0])


def test_a_group_dropped_without_close_takes_its_workers_with_it():
    """An LLM let go without close() (a notebook cell run again): its engine shuts down, and
    its local ranks end rather than wait for steps as long as this process lives (the engine's
    objects are frozen out of the garbage collector's reach: only the LLM's own release does it)."""
    fields = dict(device="numpy", tensor_parallel_size=2, max_num_batched_tokens=32)
    llm = LLM.from_engine(LLMEngine(EngineConfig(**fields), loaded_model=_tiny_loaded(512, False)),
                          own=True)  # as LLM(...) builds it
    procs = list(llm.engine.core.workers.procs.values())
    assert procs and all(p.poll() is None for p in procs)
    del llm
    deadline = time.monotonic() + 10
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.poll() is not None for p in procs)


def test_workers_import_rank_0s_engine_not_one_in_the_working_directory(tmp_path, monkeypatch,
                                                                        tp1_outputs):
    """`engine` is a generic name: a user's own `engine` package in the directory pagedserve
    starts from must not stand in for it in the spawned ranks (`python -c` puts that directory
    first on their sys.path), as it does not in rank 0."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text('raise ImportError("not pagedserve")\n')
    monkeypatch.chdir(tmp_path)
    with _llm(2) as llm:
        _assert_same(_generate(llm), tp1_outputs[0])


def test_a_rank_started_by_hand_joins_through_the_master_address(monkeypatch, tp1_outputs):
    """The several-hosts path on one host: rank 1 is `pagedserve worker`, not spawned."""
    port = free_port()
    monkeypatch.setenv("PAGEDSERVE_MASTER_PORT", str(port))
    monkeypatch.setenv(workers.SECRET_ENV, "the hosts' secret")
    code = "import sys; from engine.executor.worker import worker_main; sys.exit(worker_main())"
    proc = subprocess.Popen([sys.executable, "-c", code, "--rank", "1",
                             "--master-addr", "127.0.0.1"])
    try:
        want = tp1_outputs[0]
        with _llm(2, tp_local_ranks=1) as llm:
            assert llm.engine.core.workers.worker_pids == {}
            _assert_same(_generate(llm), want)
        assert proc.wait(10) == 0  # stopped by rank 0
    finally:
        proc.kill()


def test_a_rank_that_cannot_load_the_model_fails_the_start_with_its_reason(tmp_path,
                                                                           monkeypatch):
    """A model path that exists on rank 0's host only (here: relative to another directory)."""
    from test_two_process import ROOT, tiny_model_folder

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    tiny_model_folder(tmp_path / "a" / "tiny", with_tokenizer=False)
    monkeypatch.chdir(tmp_path / "a")
    monkeypatch.setenv(workers.SECRET_ENV, "the hosts' secret")
    port = free_port()
    code = "import sys; from engine.executor.worker import worker_main; sys.exit(worker_main())"
    # stderr to a file, not a pipe: a pipe nobody reads until the end could fill and block the
    # worker before it reports.
    with open(tmp_path / "worker.err", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", code, "--rank", "1", "--master-addr",
                                 "127.0.0.1", "--master-port", str(port)], cwd=tmp_path / "b",
                                env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=err)
    try:
        with pytest.raises(CommunicatorError, match=r"rank 1 failed: .*tiny"):
            LLMEngine(EngineConfig(model="tiny", load_format="dummy", device="numpy",
                                   tensor_parallel_size=2, tp_local_ranks=1, master_port=port))
        assert proc.wait(10) == 1
        assert b"pagedserve worker rank 1: error:" in (tmp_path / "worker.err").read_bytes()
    finally:
        proc.kill()


# Rank 1 as a stand-in: joins, takes its CONFIG, then dies as SIGKILL would leave it (no FAILED).
_DIES_WHILE_LOADING = """
import json, os, sys, zmq
from engine.executor.workers import Signer
signer = Signer(os.environ["PAGEDSERVE_TP_SECRET"].encode(), rank_0=False)
sock = zmq.Context().socket(zmq.DEALER)
sock.connect(f"tcp://127.0.0.1:{sys.argv[1]}")
sock.send_multipart(signer.seal([b"H", json.dumps({"rank": 1}).encode()]))
sock.recv_multipart()
os._exit(9)
"""


@contextlib.contextmanager
def _fake_rank(code: str, port: int):
    """A hand-written rank: `code` run with rank 0's port as its argument, the checkout on its
    path; the process, killed on leaving."""
    from test_two_process import ROOT

    proc = subprocess.Popen([sys.executable, "-c", code, str(port)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        yield proc
    finally:
        proc.kill()


def test_a_remote_rank_that_dies_while_loading_fails_the_start_at_once(monkeypatch):
    """Rank 0 cannot see another host's process: the closed connection tells it."""
    monkeypatch.setenv(workers.SECRET_ENV, "the hosts' secret")
    port = free_port()
    with _fake_rank(_DIES_WHILE_LOADING, port) as proc:
        start = time.monotonic()
        with pytest.raises(CommunicatorError, match=r"connection to rank 0 .* closed"):
            _llm(2, tp_local_ranks=1, master_port=port)
        assert time.monotonic() - start < 30  # LOAD_TIMEOUT_S is an hour
        assert proc.wait(10) == 9


@pytest.mark.parametrize("rank, says", [(5, "tensor_parallel_size is 2: the ranks that join "
                                                "are 1..1"), (0, "tensor_parallel_size is 2")])
def test_a_rank_out_of_range_fails_the_start_saying_so(monkeypatch, rank, says):
    """A worker started by hand with a --rank the group does not have: the error names the
    rank and the group's size (it read as a message "out of turn" before)."""
    monkeypatch.setenv(workers.SECRET_ENV, "the hosts' secret")
    port = free_port()
    code = _DIES_WHILE_LOADING.replace('{"rank": 1}', f'{{"rank": {rank}}}')
    assert f'"rank": {rank}' in code
    with _fake_rank(code, port), pytest.raises(CommunicatorError,
                                               match=rf"rank {rank} joined rank 0 .*{says}"):
        _llm(2, tp_local_ranks=1, master_port=port)


def test_a_missing_rank_fails_the_start_naming_it(monkeypatch):
    monkeypatch.setattr(workers, "RENDEZVOUS_TIMEOUT_S", 0.5)
    monkeypatch.setenv(workers.SECRET_ENV, "the hosts' secret")
    with pytest.raises(CommunicatorError, match=r"rank\(s\) \[1\] did not join.*pagedserve worker"):
        _llm(2, tp_local_ranks=1, master_port=free_port())
    with pytest.raises(ConfigError, match="master_port"):
        _llm(2, tp_local_ranks=1)


def test_ranks_on_other_hosts_need_the_shared_secret(monkeypatch):
    monkeypatch.delenv(workers.SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match="PAGEDSERVE_TP_SECRET"):
        _llm(2, tp_local_ranks=1, master_port=free_port())
    code = "import sys; from engine.executor.worker import worker_main; sys.exit(worker_main())"
    done = subprocess.run([sys.executable, "-c", code, "--rank", "1", "--master-addr",
                           "127.0.0.1", "--master-port", str(free_port())],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "PAGEDSERVE_TP_SECRET" in done.stderr


# A master at the worker's address that does not know the secret, sending a pickle that would
# leave a file behind if it were ever unpickled.
_FAKE_MASTER = """
import os, pickle, sys, zmq
sock = zmq.Context().socket(zmq.ROUTER)
sock.bind(f"tcp://127.0.0.1:{sys.argv[1]}")
identity, *_ = sock.recv_multipart()
sock.send_multipart([identity, b"C", pickle.dumps(eval(sys.argv[2])), b"no tag of ours"])
sock.recv_multipart(); sys.exit(0)
"""


class _Trap:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_worker_never_unpickles_a_message_without_the_groups_signature(tmp_path, monkeypatch):
    from test_two_process import ROOT

    trap = tmp_path / "ran"
    port = free_port()
    payload = f"__import__('test_tensor_parallel')._Trap({str(trap)!r})"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           workers.SECRET_ENV: "the hosts' secret"}
    master = subprocess.Popen([sys.executable, "-c", _FAKE_MASTER, str(port), payload], env=env)
    code = "import sys; from engine.executor.worker import worker_main; sys.exit(worker_main())"
    try:
        done = subprocess.run([sys.executable, "-c", code, "--rank", "1", "--master-addr",
                               "127.0.0.1", "--master-port", str(port)], env=env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 1, done.stderr
        assert "no valid signature" in done.stderr
        assert master.wait(10) == 0  # it got the worker's FAILED
        assert not trap.exists()
    finally:
        master.kill()


def test_rank_0_drops_a_stranger_that_claims_a_rank(monkeypatch):
    """Unsigned, its HELLO is dropped: the rank stays missing."""
    monkeypatch.setattr(workers, "RENDEZVOUS_TIMEOUT_S", 1.0)
    monkeypatch.setenv(workers.SECRET_ENV, "the hosts' secret")
    port = free_port()
    stranger = _DIES_WHILE_LOADING.replace("os.environ[\"PAGEDSERVE_TP_SECRET\"]", "'guess'")
    assert "'guess'" in stranger
    with _fake_rank(stranger, port), pytest.raises(CommunicatorError,
                                                   match=r"rank\(s\) \[1\] did not join"):
        _llm(2, tp_local_ranks=1, master_port=port)


# ---- the server ----------------------------------------------------------------------------------


@pytest.mark.parametrize("busy", [True, False])
def test_killing_a_worker_ends_the_server_with_a_clear_error(tmp_path, busy):
    """Mid-request: the stream ends with the error; idle: the core notices within a second.
    Either way the server exits non-zero within seconds, and no process of it stays behind."""
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from test_two_process import Served, _children, _descendants

    served = Served(tmp_path, extra=("--tensor-parallel-size", "2"))
    try:
        below = _descendants(served.proc.pid)
        workers = [p for p, cmd in _children(served.core_pid).items() if "worker_main" in cmd]
        assert len(workers) == 1
        model = httpx.get(served.url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": [[5, 6, 7]], "max_tokens": 1000, "ignore_eos": True,
                "stream": True}
        if busy:
            with httpx.stream("POST", served.url + "/v1/completions", json=body,
                              timeout=30) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: {")
                os.kill(workers[0], signal.SIGKILL)
                killed = time.monotonic()
                events = [line for line in lines if line]
            assert "rank 1" in events[-2] and "SIGKILL" in events[-2], events[-2]
        else:
            os.kill(workers[0], signal.SIGKILL)
            killed = time.monotonic()
        assert served.proc.wait(timeout=10) != 0
        assert time.monotonic() - killed < 5.0
        assert "tensor-parallel worker rank 1" in served.output()
        _assert_gone(below)
    finally:
        served.close()


def _assert_gone(pids: dict[int, str], timeout_s: float = 10.0) -> None:
    from test_two_process import _is_running

    deadline = time.monotonic() + timeout_s
    while left := {p: cmd for p, cmd in pids.items() if _is_running(p)}:
        assert time.monotonic() < deadline, f"left behind: {left}"
        time.sleep(0.05)


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("size", [1, 2])
def test_a_signal_to_the_process_group_drains_as_with_one_rank(tmp_path, size, signum, code):
    """Ctrl-C in a terminal, systemd's stop (KillMode=control-group) and `kill -- -PGID` signal
    the workers too. They leave it to the API process, as the core does (they inherit the core's
    SIG_IGN): the streams drain, the server exits as with one rank (by the SIGTERM uvicorn
    caught, or 130 after Ctrl-C) and no process of the group stays behind."""
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    from test_two_process import Served, _descendants, assert_drained, start_streams

    served = Served(tmp_path, extra=("--tensor-parallel-size", str(size)), new_session=True)
    try:
        below = _descendants(served.proc.pid)
        assert sum("worker_main" in cmd for cmd in below.values()) == size - 1, below
        model = httpx.get(served.url + "/v1/models").json()["data"][0]["id"]
        body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 1000, "ignore_eos": True,
                "stream": True}
        sinks, threads = start_streams(served.url, body, 4)
        os.killpg(served.proc.pid, signum)
        assert all(sink[-1] != "data: [DONE]" for sink in sinks), "a stream ended unsignalled"
        assert served.proc.wait(timeout=20) == code, served.output()[-1500:]
        assert_drained(sinks, threads)
        _assert_gone(below)
        assert "died" not in served.output() and "Traceback" not in served.output(), (
            served.output()[-1500:])
    finally:
        served.close()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_rank_started_by_hand_stops_on_sigterm_and_ctrl_c(signum):
    """Only the ranks rank 0 starts inherit its ignoring them: a user's `pagedserve worker`
    stops on either, as any command does (Ctrl-C quietly, 130, as `serve` does)."""
    import zmq
    from test_two_process import ROOT

    port = free_port()
    ctx = zmq.Context()
    master = ctx.socket(zmq.ROUTER)
    master.bind(f"tcp://127.0.0.1:{port}")
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "worker", "--rank", "1",
                             "--master-addr", "127.0.0.1", "--master-port", str(port)],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT),
                                 workers.SECRET_ENV: "the hosts' secret"})
    try:
        assert master.poll(30_000), "the worker never said HELLO"
        master.recv_multipart()  # it waits for CONFIG now
        proc.send_signal(signum)
        assert proc.wait(timeout=10) == (130 if signum == signal.SIGINT else -signum)
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        master.close(linger=0)
        ctx.term()


# Rank 0 with rank 1 started by hand: one step, then it waits to be killed.
_RANK_0 = """
import sys, time
from conftest import _tiny_loaded
from engine.core.sampling_params import SamplingParams
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.model.config import EngineConfig
config = EngineConfig(device="numpy", tensor_parallel_size=2, tp_local_ranks=1,
                      master_port=int(sys.argv[1]))
llm = LLM.from_engine(LLMEngine(config, loaded_model=_tiny_loaded(512, False)))
llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3), use_tqdm=False)
print("stepped", flush=True)
time.sleep(600)
"""


def test_a_rank_started_by_hand_ends_when_rank_0_is_killed():
    """No parent takes a hand-started rank along: it sees rank 0's connection close, rather
    than wait for steps (holding its GPU) as long as it lives."""
    from test_two_process import ROOT

    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
           workers.SECRET_ENV: "the hosts' secret"}
    code = "import sys; from engine.executor.worker import worker_main; sys.exit(worker_main())"
    worker = subprocess.Popen([sys.executable, "-c", code, "--rank", "1", "--master-addr",
                               "127.0.0.1", "--master-port", str(port)],
                              env=env, stderr=subprocess.PIPE, text=True)
    rank_0 = subprocess.Popen([sys.executable, "-c", _RANK_0, str(port)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert rank_0.stdout.readline() == "stepped\n"
        rank_0.kill()
        assert worker.wait(timeout=10) == 1
        assert "the connection to rank 0 closed" in worker.stderr.read()
    finally:
        for proc in (rank_0, worker):
            proc.kill()
            proc.wait()


def test_ctrl_c_stops_an_offline_run_and_its_ranks_quietly(tmp_path):
    """`pagedserve generate` with two ranks, Ctrl-C mid-run (SIGINT to the terminal's process
    group, the rank rank 0 started included): 130, no traceback from any process, none left."""
    from test_two_process import ROOT, _descendants, tiny_model_folder

    model = tiny_model_folder(tmp_path / "tiny", True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "generate", "hello there", "--model", str(model),
         "--device", "numpy", "--load-format", "dummy", "--max-model-len", "1024",
         "--max-tokens", "1000", "--tensor-parallel-size", "2"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                     "OPENBLAS_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while True:
            below = _descendants(proc.pid)
            if any("worker_main" in cmd for cmd in below.values()):
                break
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        time.sleep(0.5)  # loading or generating: 1,000 tokens take seconds
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, out[-1500:]
        assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-1500:]
        _assert_gone(below)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_cli_refuses_a_size_that_does_not_divide_in_one_line(tmp_path, capsys):
    from test_two_process import tiny_model_folder

    from server.cli import main

    model = tiny_model_folder(tmp_path / "tiny", with_tokenizer=False)
    code = main(["generate", "hi", "--model", str(model), "--device", "cpu", "--load-format",
                 "dummy", "--tensor-parallel-size", "3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == ["pagedserve: error: --tensor-parallel-size (3) must divide the model's "
                   "num_attention_heads (4)"]


def test_all_reduce_sums_a_deferred_product_first():
    """A backend may hand back a product still in split-K partial sums (cuda's PendingSum,
    linear(..., defer_sum=True)): the collective gets the whole product, not that object."""

    class Pending:
        def resolve(self):
            return np.full((2, 3), 7.0, np.float32)

    class Comm:
        def all_reduce(self, x):
            return x * 2

    ops = TensorParallelOps(NumpyOps(), Comm(), 0, 2, 64)
    np.testing.assert_array_equal(ops.all_reduce(Pending()), np.full((2, 3), 14.0, np.float32))


@pytest.mark.parametrize("value", ["abc", "-5", "0", "inf"])
def test_a_bad_rendezvous_timeout_is_named_when_a_rendezvous_starts(monkeypatch, value):
    """Read when tensor parallelism starts (it was read on import: every command, --help
    included, died with a traceback)."""
    from engine.executor import workers

    monkeypatch.setenv("PAGEDSERVE_RENDEZVOUS_TIMEOUT", value)
    with pytest.raises(ValueError, match=r"\$PAGEDSERVE_RENDEZVOUS_TIMEOUT must be a number of "
                                         r"seconds > 0"):
        workers.rendezvous_timeout()
    monkeypatch.setenv("PAGEDSERVE_RENDEZVOUS_TIMEOUT", "2.5")
    assert workers.rendezvous_timeout() == 2.5


def test_a_worker_loads_the_weights_as_rank_0_does():
    """--gguf-dequantize with a .gguf on cuda: rank 0 dequantizes the blocks at load, and so must
    every worker (each loaded with only the model and format, kept the blocks quantized, and its
    weight slicing then refused them: the group never started). Both load through one helper;
    a numpy backend named "cuda" (all the loader looks at) stands in for the GPU."""
    from engine.executor import worker
    from engine.executor.ops.numpy_ops import NumpyOps
    from engine.model.config import EngineConfig
    from engine.model.loader import load_engine_model
    from engine.model.quantized import QuantizedWeight

    class CudaNamed(NumpyOps):
        name = "cuda"

    ops = CudaNamed()
    ec = EngineConfig(device="cuda", tensor_parallel_size=2, gguf_dequantize=True)
    _, weights = worker._load(ec, ops)
    rank0 = load_engine_model(ec, ops).weights
    for got, want in ((weights.layers[0].qkv, rank0.layers[0].qkv),
                      (weights.layers[-1].down, rank0.layers[-1].down)):
        assert not isinstance(got, QuantizedWeight) and not isinstance(want, QuantizedWeight)
        np.testing.assert_array_equal(got, want)
    kept = EngineConfig(device="cuda", tensor_parallel_size=2, gguf_dequantize=False)
    assert isinstance(worker._load(kept, ops)[1].layers[0].qkv, QuantizedWeight)


def test_the_signature_covers_every_frame_the_secret_and_the_direction():
    rank_0, worker = workers.Signer(b"s", rank_0=True), workers.Signer(b"s", rank_0=False)
    frames = [workers.STEP, b"header", np.arange(5, dtype=np.int32)]
    sealed = rank_0.seal(frames)
    opened = worker.open([bytes(memoryview(f).cast("B")) for f in sealed])
    assert opened is not None and opened[:2] == frames[:2]
    assert np.array_equal(np.frombuffer(opened[2], np.int32), frames[2])
    assert rank_0.open(sealed) is None  # rank 0's own message, sent back to it
    assert workers.Signer(b"other", rank_0=False).open(sealed) is None
    assert worker.open([workers.STEP, b"headex", *sealed[2:]]) is None
    assert worker.open(sealed[:-1]) is None and worker.open([]) is None
