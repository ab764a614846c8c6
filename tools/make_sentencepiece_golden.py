"""Write a tiny SentencePiece GGUF and the reference ids of its tokenizer, for
tests/test_tokenizer_sentencepiece.py.

1. Trains a SentencePiece BPE model (byte fallback, Llama 2's settings: identity normalization,
   whitespace kept, a dummy prefix, digits split) on the text below, with two control symbols
   and one user-defined symbol, and writes its pieces, scores and types, as llama.cpp's
   converter does, into tests/data/sentencepiece_tiny.gguf (tokenizer metadata only).
2. Records in tests/data/tokenizer_sentencepiece_golden.json, for each text of TEXTS and
   NUM_RANDOM random ones (random_texts, seeded):
   - `ids`: the reference. SentencePiece's own ids, BOS first, with the control and
     user-defined tokens written in the text matched whole first and each stretch of text
     between them encoded on its own (so with its own prefix space), as llama.cpp tokenizes and
     transformers 4's GGUF conversion (a '▁' prepended by the normalizer of every stretch) does;
     for a text without such tokens this is exactly `sp.encode(text)`;
   - `sp_ids`: `sp.encode(text)` with BOS, which matches no control token in text;
   - `decoded`: SentencePiece's decoding of `ids`;
   - `hf_ids` / `hf_decoded`: transformers' tokenizer of the GGUF (LlamaTokenizer with
     gguf_file=), when transformers is installed, with its version in `transformers`. 5.x builds
     it with a Metaspace pre-tokenizer (prefix scheme "first"), which differs from SentencePiece
     where a text starts with a space (' hi' -> '▁hi', SentencePiece '▁▁hi') and after a token
     matched in the text (no prefix space there).
   `--add-transformers` adds `hf4_ids` to an existing JSON from transformers 4.x's conversion
   (integrations.ggml.convert_gguf_tokenizer: it needs no torch), run with a 4.x install.

    python tools/make_sentencepiece_golden.py [--add-transformers]

Needs sentencepiece and gguf (transformers optional), in a scratch environment: none of them
but gguf is a dependency of pagedserve.
"""

from __future__ import annotations

import json
import random
import re
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
GGUF_PATH = DATA / "sentencepiece_tiny.gguf"
OUT = DATA / "tokenizer_sentencepiece_golden.json"

CONTROL = ["<|im_start|>", "<|im_end|>"]
USER_DEFINED = ["<think>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = """\
A tokenizer turns text into the numbers a language model reads, and back into text again.
The serving engine keeps the key and value cache in pages, so that many requests share memory.
Every request waits in a queue until the scheduler finds room for its prompt in the cache.
When the prompt is long, the scheduler cuts it into chunks and runs them over several steps.
The model reads the prompt once, then writes one token at a time until it meets a stop.
Sampling picks the next token: greedy takes the most likely one, others draw at random.
A temperature below one makes the choice sharper; above one it spreads the chances out.
Top p keeps the smallest set of tokens whose chances add up to p, and top k keeps k of them.
The server answers over HTTP and streams the text as it is written, a few words at a time.
Streaming must never send half of a character, so bytes wait until the character is whole.
Some words are rare, and the tokenizer spells them in pieces, or byte by byte if it must.
The quick brown fox jumps over the lazy dog, and the dog does not mind at all.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
Numbers such as 42, 3.14159, 2024 and 1000000 are split into single digits.
In the year 1969 people walked on the moon; in 2012 a rover landed on Mars.
Tea for two, and two for tea: the cafe opened at 9 and closed at 17.
The naive cafe owner met a cafe-goer, a naïve café lover, on the way to the cafe.
Good morning, good evening, good night: polite words that open and close a day.
Python code looks like this: def add(a, b): return a + b, and it runs as written.
for i in range(10): print(i * i) writes the squares of the first ten numbers.
if x is None: return the default value, else return x itself unchanged.
class Engine: holds the model, the cache and the scheduler, and steps them together.
The weights are read from a file, checked, and copied to the device before the first step.
A test compares the output of the engine with the output of a reference written elsewhere.
Questions and answers, prompts and completions, messages and replies: it is all text.
Hello there! How are you today? I am fine, thank you, and how are you?
What is the capital of France? The capital of France is Paris, a city on the Seine.
Which river runs through London? The Thames runs through London to the sea.
Water boils at 100 degrees and freezes at 0 degrees at the level of the sea.
Light travels fast, sound travels slower, and news travels fastest of all.
The engine reads the text, the text becomes tokens, and the tokens become text again.
Spaces matter: a word at the start of a line has a space before it in the vocabulary.
Some lines end with two spaces  and some lines have  double spaces inside them.
Trailing spaces at the end of a line are kept as they are by this tokenizer.
Indented code uses four spaces:    return value, or a tab, and both must survive.
The model was trained on many books, many web pages and much code, in many languages.
Über alles, schön und grün: a few words of German, with their accents, also appear here.
Résumé, déjà vu, façade, fiancée: English borrows many words with accents from French.
A short story: once upon a time there was a small model that wanted to talk.
It read every word it could find, and learned which word tends to come after which.
Then one day someone asked it a question, and it answered as well as it could.
The end of a story is a good place to stop, and so is the end of a line.
"""

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "multiple   spaces   inside",
    " ",
    "",
    "line one\nline two\n\nline four",
    "\nstarts with a newline",
    "tabs\tand\r\nwindows newlines",
    "Numbers: 12345, 3.14159 and the year 2024.",
    "naïve café, Ünïcödé, Résumé",
    "日本語のテキストと中文文本",
    "Emoji: 🎉👍🏽 👨‍👩‍👧 ❤️",
    "def f(x):\n    return [i * 2 for i in range(10)]\n",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "text with </s> and <s> inside",
    "a<think>b</think> c",
    "<think>starts with a user-defined token",
    "▁ a literal metaspace ▁▁ in text",
    "Привет мир, مرحبا, שלום",
    "zzz qqq xylophone jazz quizzical",
]

# Random texts from a fixed seed: words of the corpus and rarer things between them
FRAGMENTS = ["", " ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "0", "7", "42", "3.5", ",", ".",
             "!", "?", "(", ")", "-", "'", '"', "é", "ï", "Ü", "ß", "日本", "中文", "한국어", "🎉",
             "👍🏽", "❤️", "Ω", "\u2581", "<|im_start|>", "<|im_end|>", "<think>", "</s>", "<s>"]
NUM_RANDOM = 120


def random_texts() -> list[str]:
    rng = random.Random(0)
    words = CORPUS.split()
    texts = []
    for _ in range(NUM_RANDOM):
        parts = [rng.choice(FRAGMENTS) if rng.random() < 0.3 else
                 (" " if rng.random() < 0.7 else "") + rng.choice(words)
                 for _ in range(rng.randrange(1, 12))]
        texts.append("".join(parts))
    return texts


def train(workdir: Path):
    import sentencepiece as spm

    sentences = [line for line in CORPUS.splitlines() if line]
    prefix = str(workdir / "tiny")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=480,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        control_symbols=CONTROL,
        user_defined_symbols=USER_DEFINED,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=prefix + ".model")


def write_gguf(sp) -> None:
    """The model's pieces as llama.cpp's converter writes them (its token types: 1 normal,
    2 unknown, 3 control, 4 user-defined, 6 byte)."""
    import gguf

    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(gguf.TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(gguf.TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(gguf.TokenType.BYTE)
        elif sp.id_to_piece(i) in USER_DEFINED:
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    w = gguf.GGUFWriter(str(GGUF_PATH), "llama")
    w.add_name("sentencepiece-tiny")
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.add_pad_token_id(sp.unk_id())  # as many Llama 2 GGUFs: pad is <unk>
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHAT_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def reference_ids(sp, text: str) -> list[int]:
    """BOS, then the tokens written in the text matched whole and the text between them
    encoded by SentencePiece stretch by stretch (llama.cpp's rule)."""
    whole = CONTROL + USER_DEFINED + [sp.id_to_piece(i) for i in (sp.bos_id(), sp.eos_id())]
    pattern = re.compile("|".join(re.escape(t) for t in sorted(whole, key=len, reverse=True)))
    ids, at = [sp.bos_id()], 0
    for m in pattern.finditer(text):
        if m.start() > at:
            ids += sp.encode(text[at:m.start()])
        ids.append(sp.piece_to_id(m.group()))
        at = m.end()
    if at < len(text):
        ids += sp.encode(text[at:])
    return ids


def _torch_stub() -> None:
    """transformers 5 reads a GGUF's metadata in a module that imports torch for the tensors
    alone: a stand-in lets the tokenizer load where torch is not installed."""
    import importlib.machinery
    import importlib.util
    import types

    if importlib.util.find_spec("torch") is not None:
        return

    class Anything:
        def __getattr__(self, name):
            return Anything()

        def __call__(self, *args, **kwargs):
            return Anything()

    stub = types.ModuleType("torch")
    stub.__spec__ = importlib.machinery.ModuleSpec("torch", None)
    stub.__getattr__ = lambda name: Anything()
    sys.modules["torch"] = stub


def transformers_refs(cases: list[dict]) -> str | None:
    """transformers' tokenizer of the file: LlamaTokenizer with gguf_file=, the class
    AutoTokenizer picks for a llama GGUF (AutoTokenizer itself wants the model's config, which
    this file has not)."""
    try:
        import transformers
    except ImportError:
        return None
    _torch_stub()
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer.from_pretrained(str(GGUF_PATH.parent), gguf_file=GGUF_PATH.name)
    for case in cases:
        case["hf_ids"] = tok(case["text"])["input_ids"]
        case["hf_decoded"] = tok.decode(case["hf_ids"], skip_special_tokens=True)
    return transformers.__version__


def add_transformers4() -> None:
    """hf4_ids: transformers 4.x's GGUF conversion of the file (GGUFLlamaConverter), BOS first
    (LlamaTokenizerFast's default, which the converter leaves to the tokenizer class)."""
    import gguf
    import transformers
    from transformers.integrations.ggml import convert_gguf_tokenizer

    assert transformers.__version__.startswith("4."), transformers.__version__
    reader = gguf.GGUFReader(GGUF_PATH)
    names = {"tokenizer.ggml.model": "tokenizer_type", "tokenizer.ggml.tokens": "tokens",
             "tokenizer.ggml.scores": "scores", "tokenizer.ggml.token_type": "token_type",
             "tokenizer.ggml.bos_token_id": "bos_token_id",
             "tokenizer.ggml.eos_token_id": "eos_token_id",
             "tokenizer.ggml.unknown_token_id": "unk_token_id",
             "tokenizer.ggml.padding_token_id": "pad_token_id",
             "tokenizer.ggml.add_space_prefix": "add_prefix_space"}
    tokenizer_dict = {ours: reader.fields[key].contents() for key, ours in names.items()}
    backend, _ = convert_gguf_tokenizer("llama", tokenizer_dict)
    golden = json.loads(OUT.read_text())
    bos = tokenizer_dict["bos_token_id"]
    for case in golden["texts"]:
        case["hf4_ids"] = [bos, *backend.encode(case["text"], add_special_tokens=False).ids]
    golden["transformers4"] = transformers.__version__
    write_json(golden)
    print(f"added hf4_ids ({transformers.__version__}) to {OUT}")


def write_json(golden: dict) -> None:
    """One text's case a line: the file stays small and a change shows as the lines it makes."""
    head = {k: v for k, v in golden.items() if k != "texts"}
    lines = [json.dumps(case, ensure_ascii=False) for case in golden["texts"]]
    OUT.write_text(json.dumps(head, ensure_ascii=False)[:-1] + ', "texts": [\n'
                   + ",\n".join(lines) + "\n]}\n")


def main():
    if "--add-transformers" in sys.argv[1:]:
        add_transformers4()
        return
    with tempfile.TemporaryDirectory() as tmp:
        sp = train(Path(tmp))
    write_gguf(sp)
    cases = []
    for text in TEXTS + random_texts():
        ids = reference_ids(sp, text)
        cases.append({"text": text, "ids": ids, "sp_ids": [sp.bos_id(), *sp.encode(text)],
                      "decoded": sp.decode(ids)})
    version = transformers_refs(cases)
    golden = {"gguf": GGUF_PATH.name, "vocab_size": sp.get_piece_size(),
              "bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(),
              "unk_token_id": sp.unk_id(), "transformers": version, "texts": cases}
    write_json(golden)
    print(f"wrote {GGUF_PATH} ({GGUF_PATH.stat().st_size} bytes) and {OUT} "
          f"({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
        raise SystemExit(0)
    main()
