"""Greedy tokens of tensor parallel against one GPU (issue 18): the same prompts through TP=1 and
TP=N engines, one after the other, compared sequence by sequence.

    python tools/tp_parity.py --model llama3-8b --load-format dummy --tensor-parallel-size 2

NOTE: TP=N sums the o_proj / down_proj partial products in bf16 (NCCL), TP=1 inside one fp32
GEMM accumulator, so near-tied logits may pick another token and the sequences part from there;
the report gives how many sequences match exactly and how long their common prefix is.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from tools.workloads import count_arg, require_gpu  # noqa: E402


def _run(args, size: int) -> list[list[int]]:
    rng = np.random.default_rng(args.seed)
    with LLM(model=args.model, load_format=args.load_format, device="cuda", dtype="bfloat16",
             max_model_len=1024, seed=args.seed, tensor_parallel_size=size,
             enforce_eager=args.enforce_eager) as llm:
        vocab = llm.engine.model_config.vocab_size
        prompts = [{"prompt_token_ids": rng.integers(0, vocab, int(n)).tolist()}
                   for n in rng.integers(16, 256, args.num_prompts)]
        params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=args.max_tokens)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b", help="HF folder, .gguf file or preset name")
    ap.add_argument("--load-format", default="dummy", choices=("auto", "dummy"),
                    help="dummy: random weights of the model's shapes; auto: its own weights")
    ap.add_argument("--tensor-parallel-size", type=count_arg, default=2,
                    help="GPUs of the run compared with one GPU's (default 2)")
    ap.add_argument("--num-prompts", type=count_arg, default=64,
                    help="random prompts of 16-255 tokens (default 64)")
    ap.add_argument("--max-tokens", type=count_arg, default=64,
                    help="greedy tokens each prompt decodes (default 64)")
    ap.add_argument("--enforce-eager", action="store_true",
                    help="no CUDA graphs: every step launched kernel by kernel")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and the engines")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args(argv)
    require_gpu("tp_parity")
    want, got = _run(args, 1), _run(args, args.tensor_parallel_size)
    prefixes = [next((i for i, (a, b) in enumerate(zip(w, g, strict=True)) if a != b), len(w))
                for w, g in zip(want, got, strict=True)]
    result = {"model": args.model, "tensor_parallel_size": args.tensor_parallel_size,
              "num_prompts": args.num_prompts, "max_tokens": args.max_tokens,
              "equal_sequences": sum(w == g for w, g in zip(want, got, strict=True)),
              "mean_common_prefix": round(float(np.mean(prefixes)), 1)}
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
