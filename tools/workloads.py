"""The benchmark workloads (README, Performance) and their roofline, shared by the bench tools.

W1 (offline throughput) is 256 requests with prompt and output lengths drawn uniformly from
[100, 1024] by `numpy.random.default_rng(0)`; outputs are forced to their length (ignore EOS), for
148,756 output tokens in all. `w1_requests()` reproduces it draw for draw: P, then O, then each
prompt in order.

`roofline()` is the best time any implementation could reach on that work, from two ceilings of the
H200 test GPU (800 TFLOP/s, 4.27 TB/s):

    FLOPs = 2 x linear params (lm_head incl.) x (prompt + output tokens)
          + 4 x layers x heads x head_dim x sum over every token of the context it attends to
    bytes = decode steps x weight bytes
          + sum over output tokens of (context length x KV bytes per token)
          + (prompt + output tokens) x KV bytes per token (written once)
    bound = max(FLOPs / peak FLOP/s, bytes / bandwidth)

The readings that give the ~37,100 (Qwen3-0.6B) and ~18,400 (Llama-3-8B) output tok/s, written
down because the formula leaves them open:
- "weight bytes" is every parameter of the checkpoint x dtype bytes: the layers, the norms, the
  lm_head and, when untied, the input embedding too (Llama-3-8B's 1.05 GB embedding is what moves
  its bound from ~19,000 to ~18,400; Qwen3-0.6B ties it, so it counts once).
- "decode steps" is the number of model steps while any request still generates: every running
  request emits one token per step (its first from its prefill step), at most `max_num_seqs` run at
  once, a finished request's slot goes to the next waiting one in submission order, and prefill is
  never held back by the token budget. With 256 requests and max_num_seqs=256 it is max(O) = 1021.
- output token k (k = 0 .. O-1) of a request with prompt length p is produced by a step whose query
  attends p + k cached tokens, so it reads (p + k) x KV bytes per token.
- token j (0-based) of a sequence attends to j + 1 tokens; "all tokens" are p + O per request.
- KV bytes per token = 2 (K and V) x layers x kv_heads x head_dim x dtype bytes.
These give 37,130 and 18,380 output tok/s; both are bandwidth-bound.
"""

from __future__ import annotations

import argparse
import heapq
from pathlib import Path

import numpy as np

W1_NUM_PROMPTS = 256
W1_MIN_LEN, W1_MAX_LEN = 100, 1024
W1_VOCAB = 10000  # prompt token ids are drawn from [0, W1_VOCAB)
W1_OUTPUT_TOKENS = 148_756  # sum of O for the default draw
H200_FLOPS = 800e12
H200_BANDWIDTH = 4.27e12


def _int_at_least(text: str, low: int) -> int:
    value = int(text)
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def count_arg(text: str) -> int:
    """argparse type of a count (--num-prompts, --output-len, ...): an integer >= 1, so that a bad
    one is refused at parse, naming its flag, and not after the model has loaded."""
    return _int_at_least(text, 1)


def scale_arg(text: str) -> float:
    """argparse type of --scale: scale_requests' (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def rate_arg(text: str) -> float:
    """argparse type of --request-rate: > 0 requests a second, or inf."""
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (or inf), got {value}")
    return value


def count_list_arg(text: str) -> list[int]:
    """argparse type of a comma-separated list of counts (--batch-sizes 1,64,256): each an
    integer >= 1, refused at parse with the flag's name like count_arg."""
    items = text.split(",")
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    bad = [v for v in values if v < 1]
    if bad:
        raise argparse.ArgumentTypeError(f"must all be >= 1, got {bad[0]} in {text!r}")
    return values


def add_only_flag(ap: argparse.ArgumentParser, sections) -> None:
    """--only SECTION[,SECTION...]: a tool's sections to run, checked against `sections`."""
    ap.add_argument("--only", type=name_list_arg(sections), default=None,
                    metavar="SECTION[,SECTION...]",
                    help=f"run only these sections, of: {', '.join(sections)} (default: all)")


def name_list_arg(names):
    """argparse type of a comma-separated list of names from `names` (--only attn,w1): the list,
    or an error naming the unknown one and the valid names."""
    def parse(text: str) -> list[str]:
        items = text.split(",")
        for item in items:
            if item not in names:
                raise argparse.ArgumentTypeError(
                    f"unknown {item!r} in {text!r}; choose from {', '.join(names)}")
        return items
    return parse


def nonnegative_arg(text: str) -> int:
    """argparse type of an integer that may be 0 but not negative (--num-warmups, --repeat, ...)."""
    return _int_at_least(text, 0)


def positive_arg(text: str) -> float:
    """argparse type of a finite number > 0 (seconds, megabytes, watts)."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {value}")
    return value


def existing_file_arg(text: str) -> str:
    """argparse type of a file the tool reads (a saved trace, ...): it must be there."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    return text


def require_gpu(tool: str) -> None:
    """For a GPU-only tool, once its command line is read: one line and exit status 1 where CuPy
    or a GPU is missing (engine.executor.ops.check_cuda says which), not an import traceback."""
    from engine.executor.ops import DeviceError, check_cuda

    try:
        check_cuda()
    except DeviceError as e:
        raise SystemExit(f"{tool} runs on a GPU: {e}") from None


def w1_requests(num: int = W1_NUM_PROMPTS, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """W1's prompts (token id lists) and forced output lengths, drawn in order: P, O, prompts."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    rng = np.random.default_rng(seed)
    prompt_lens = rng.integers(W1_MIN_LEN, W1_MAX_LEN + 1, num)  # (num,)
    output_lens = rng.integers(W1_MIN_LEN, W1_MAX_LEN + 1, num)  # (num,)
    prompts = [rng.integers(0, W1_VOCAB, int(p)).tolist() for p in prompt_lens]
    return prompts, [int(o) for o in output_lens]


def scale_requests(
    prompts: list[list[int]], output_lens: list[int], scale: float, vocab_size: int | None = None
) -> tuple[list[list[int]], list[int]]:
    """Shrink every prompt and output length by `scale` (at least 1 token each) for tiny runs.

    Token ids are folded into `vocab_size` when given, so a tiny test model can embed them.
    """
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    new_prompts = []
    for p in prompts:
        ids = p[: max(1, round(len(p) * scale))]
        new_prompts.append([t % vocab_size for t in ids] if vocab_size else list(ids))
    return new_prompts, [max(1, round(o * scale)) for o in output_lens]


def kv_bytes_per_token(config, dtype_bytes: int = 2) -> int:
    """K and V of one token across all layers."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype_bytes


def weight_bytes(config, dtype_bytes: int = 2) -> int:
    """Every parameter of the checkpoint: linear layers, lm_head, untied embedding, norms."""
    c = config
    embed = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    norms = c.num_layers * 2 * c.hidden_size + c.hidden_size
    if c.qk_norm:
        norms += c.num_layers * 2 * c.head_dim
    bias = c.num_layers * (c.q_size + 2 * c.kv_size) if c.attention_bias else 0
    return (c.num_linear_params() + embed + norms + bias) * dtype_bytes


def decode_steps(output_lens: list[int], max_num_seqs: int) -> int:
    """Steps to emit all outputs when at most `max_num_seqs` requests run at once (see above)."""
    if max_num_seqs < 1:
        raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
    # A min-heap of the step at which each busy slot frees up; requests start in submission order.
    free_at = [0] * min(max_num_seqs, len(output_lens))
    for o in output_lens:
        start = heapq.heappop(free_at)
        heapq.heappush(free_at, start + int(o))
    return max(free_at, default=0)


def roofline(
    model_config,
    prompt_lens: list[int],
    output_lens: list[int],
    dtype_bytes: int = 2,
    max_num_seqs: int = 256,
    flops: float = H200_FLOPS,
    bandwidth: float = H200_BANDWIDTH,
) -> dict:
    """Lower bound on the time of a batch of requests, and the output tok/s it allows."""
    if len(prompt_lens) != len(output_lens):
        raise ValueError(
            f"prompt_lens ({len(prompt_lens)}) and output_lens ({len(output_lens)}) differ"
        )
    c = model_config
    p = np.asarray(prompt_lens, dtype=np.int64)  # (num,)
    o = np.asarray(output_lens, dtype=np.int64)  # (num,)
    total = p + o  # (num,)
    num_tokens = int(total.sum())
    num_output = int(o.sum())

    attended = int((total * (total + 1) // 2).sum())  # sum over tokens j of (j + 1)
    linear_flops = 2 * c.num_linear_params() * num_tokens
    attn_flops = 4 * c.num_layers * c.num_heads * c.head_dim * attended
    total_flops = linear_flops + attn_flops

    kv_tok = kv_bytes_per_token(c, dtype_bytes)
    steps = decode_steps(list(o), max_num_seqs)
    read_ctx = int((o * p + o * (o - 1) // 2).sum())  # sum over k < O of (p + k)
    weights = weight_bytes(c, dtype_bytes)
    total_bytes = steps * weights + read_ctx * kv_tok + num_tokens * kv_tok

    compute_s = total_flops / flops
    memory_s = total_bytes / bandwidth
    bound_s = max(compute_s, memory_s)
    return {
        "flops": total_flops,
        "bytes": total_bytes,
        "decode_steps": steps,
        "weight_bytes": weights,
        "kv_bytes_per_token": kv_tok,
        "compute_time_s": compute_s,
        "memory_time_s": memory_s,
        "bound_time_s": bound_s,
        "bound": "memory" if memory_s >= compute_s else "compute",
        "output_tokens": num_output,
        "total_tokens": num_tokens,
        "output_tok_s": num_output / bound_s if bound_s else float("inf"),
        "total_tok_s": num_tokens / bound_s if bound_s else float("inf"),
    }
