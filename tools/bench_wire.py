"""The engine core's per-step message on the wire: msgspec (msgpack) against pickle protocol 5.

One EngineCoreOutputs of `--num-seqs` SeqOutputs (one token each; with --logprobs, the sampled
token and two alternatives), encoded and decoded `--repeat` times; prints bytes and microseconds.
The core encodes once per step and the API process decodes once, so encode + decode is what a
step pays for the wire.

Usage:
    python tools/bench_wire.py                  # 256 sequences
    python tools/bench_wire.py --logprobs
"""

from __future__ import annotations

import argparse
import pickle
import sys
import time
from pathlib import Path

import msgspec

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.core.outputs import EngineCoreOutputs, EngineStats, SeqOutput  # noqa: E402
from tools.workloads import count_arg  # noqa: E402


def step_message(num_seqs: int, logprobs: bool) -> EngineCoreOutputs:
    outputs = [SeqOutput(f"cmpl-0123456789abcdef0123456789abcdef-{i}", 0, [1000 + i],
                         [{1000 + i: -0.5, 7: -1.5, 9: -2.5}] if logprobs else None,
                         -12.5, None, None) for i in range(num_seqs)]
    return EngineCoreOutputs(outputs, stats=EngineStats(*range(12)))


def timed(fn, arg, repeat: int) -> tuple[object, float]:
    out = fn(arg)
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn(arg)
    return out, (time.perf_counter() - start) / repeat * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-seqs", type=count_arg, default=256,
                        help="sequences in one step's outputs (default 256)")
    parser.add_argument("--logprobs", action="store_true",
                        help="each output carries logprobs too: the sampled token and two others")
    parser.add_argument("--repeat", type=count_arg, default=2000,
                        help="encodes and decodes timed (default 2000)")
    args = parser.parse_args(argv)
    message = step_message(args.num_seqs, args.logprobs)
    codecs = {
        "msgspec": (msgspec.msgpack.Encoder().encode,
                    msgspec.msgpack.Decoder(EngineCoreOutputs).decode),
        "pickle5": (lambda m: pickle.dumps(m, protocol=5), pickle.loads),
    }
    for name, (encode, decode) in codecs.items():
        data, encode_us = timed(encode, message, args.repeat)
        back, decode_us = timed(decode, data, args.repeat)
        assert back == message
        print(f"{name:8s} {args.num_seqs} seqs: {len(data):6d} bytes, encode {encode_us:5.0f} us, "
              f"decode {decode_us:5.0f} us, both {encode_us + decode_us:5.0f} us")


if __name__ == "__main__":
    main()
