"""Text <-> token ids: HF folders or GGUF metadata, chat templates, streaming detokenization.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust library) and adds what a server needs around
it: special token ids, the chat template (run in a jinja2 sandbox, with the variables HF passes),
and `IncrementalDetokenizer`, which turns a growing list of output ids into text deltas.
"""

from __future__ import annotations

import codecs
import functools
import re
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

import tokenizers
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from engine.model.chat_template import (
    compile_template,
    cut_at_mark,
    final_text,
    mark_final,
    render_deadline,
    render_split,
)
from engine.model.config import json_object

if TYPE_CHECKING:
    import jinja2

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_UNKNOWN = 2
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# SentencePiece's spelling of a space inside its pieces
SPIECE_SPACE = "\u2581"

# Split patterns for the `tokenizer.ggml.pre` values we know, applied before the byte mapping.
# None means GPT-2's own pattern (ByteLevel with use_regex=True).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
# As llama.cpp: with these pre-tokenizers a piece that is a token is taken whole, whatever the
# merges (Llama 3's tiktoken does so; its tokenizer.json says "ignore_merges": true), and BOS is
# added unless tokenizer.ggml.add_bos_token says otherwise. llama.cpp's names for Llama 3's split
# (Falcon 3, a llama GGUF, says "falcon3").
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "falcon3")
GGUF_PRE_TOKENIZERS = {
    "default": None,
    "gpt2": None,
    "gpt-2": None,  # llama.cpp's name for GPT-2's split
    "smollm": None,  # plus every digit isolated first, see _byte_level_pre_tokenizer
    **dict.fromkeys(_LLAMA3_PRE, _LLAMA3_SPLIT),
    "qwen2": _QWEN2_SPLIT,
}


class TokenizerError(ValueError):
    """A tokenizer pagedserve cannot build or use; the message names the file or field."""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used to spell byte-level tokens.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) are moved to
    code points 256 and up, in byte order, so that no token contains whitespace or controls.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    mapping = {b: chr(b) for b in kept}
    moved = [b for b in range(256) if b not in mapping]
    mapping.update({b: chr(256 + n) for n, b in enumerate(moved)})
    return mapping


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    return {ch: b for b, ch in byte_to_unicode().items()}


# SentencePiece's spelling of a byte no piece covers
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


# ---------------------------------------------------------------------------------------------
# GGUF metadata -> tokenizers.Tokenizer


def gguf_tokenizer_metadata(reader) -> dict:
    """The `tokenizer.*` fields of a `gguf.GGUFReader` as plain Python values."""
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def _byte_level_pre_tokenizer(pre: str):
    if pre not in GGUF_PRE_TOKENIZERS:
        raise TokenizerError(
            f"tokenizer.ggml.pre = {pre!r} is not supported; known: {sorted(GGUF_PRE_TOKENIZERS)}"
        )
    split = GGUF_PRE_TOKENIZERS[pre]
    if split is not None:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM's merges were learned on text with every digit on its own ("123" -> 1, 2, 3).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    return byte_level


def _gguf_list(meta: dict, key: str, kind: type, kinds: str) -> list:
    """meta[key] as a list whose items are all `kind` (bool is not an int), else a
    TokenizerError naming the key."""
    value = meta[key]
    if (not isinstance(value, (list, tuple))
            or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value)):
        raise TokenizerError(f"GGUF metadata {key} must be an array of {kinds}, got "
                             f"{value!r:.80}")
    return list(value)


def tokenizer_from_gguf_metadata(meta: dict) -> Tokenizer:
    """Build a `Tokenizer` from GGUF `tokenizer.*` metadata given as plain values.

    Byte-level BPE (`tokenizer.ggml.model == "gpt2"`) and SentencePiece BPE ("llama": Llama 2,
    Mistral 7B, TinyLlama, ...; see _sentencepiece_from_gguf) are supported. The result matches
    what HF transformers builds from the same file: control tokens (type 3) become special added
    tokens, user-defined ones (type 4) plain added tokens that are always matched whole.
    """
    model = meta.get("tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(
            f"tokenizer.ggml.model = {model!r} is not supported; only byte-level BPE ('gpt2') "
            "and SentencePiece BPE ('llama') are"
        )
    if "tokenizer.ggml.tokens" not in meta:
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
    tokens = _gguf_list(meta, "tokenizer.ggml.tokens", str, "strings")
    types = (_gguf_list(meta, "tokenizer.ggml.token_type", int, "integers")
             if meta.get("tokenizer.ggml.token_type") is not None else [1] * len(tokens))
    if len(types) != len(tokens):
        raise TokenizerError(
            f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens"
        )
    if model == "llama":
        return _sentencepiece_from_gguf(meta, tokens, types)
    if "tokenizer.ggml.merges" not in meta:
        raise TokenizerError("GGUF metadata has no tokenizer.ggml.merges")
    merges = _gguf_merges(meta)

    spell = byte_to_unicode()
    alphabet = set(spell.values())
    # A token written as raw text instead of in the byte alphabet is respelled byte by byte.
    vocab = {
        (t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    pre = meta.get("tokenizer.ggml.pre", "default")
    tok = _bpe_tokenizer(vocab=vocab, merges=merges, fuse_unk=False,
                         ignore_merges=pre in _LLAMA3_PRE)
    tok.pre_tokenizer = _byte_level_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()

    # NOTE: llama.cpp marks some odd tokens CONTROL although they are spelled outside the byte
    # alphabet; adding them would grow the vocabulary past the model's, so they are skipped (as HF).
    typed = list(zip(tokens, types, strict=True))
    special = [t for t, ty in typed if ty == TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in typed if ty == TOKEN_TYPE_USER_DEFINED and t in vocab]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return _finish_gguf_tokenizer(tok, meta, tokens, add_bos=pre in _LLAMA3_PRE)


def _gguf_merges(meta: dict) -> list[tuple[str, str]]:
    merges = [tuple(m.split(" ", 1))
              for m in _gguf_list(meta, "tokenizer.ggml.merges", str, "strings")]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError("tokenizer.ggml.merges: every merge must be two tokens joined by a "
                             "space")
    return merges


def _bpe_tokenizer(**kwargs) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer(models.BPE(**kwargs))
    except BaseException as e:  # the Rust side may panic: pyo3's PanicException is no Exception
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise TokenizerError(f"tokenizer.ggml.tokens / merges do not make a BPE model: "
                             f"{type(e).__name__}: {e}") from None


def _sentencepiece_from_gguf(meta: dict, tokens: list[str], types: list[int]) -> Tokenizer:
    """A SentencePiece BPE vocabulary (`tokenizer.ggml.model == "llama"`) as a BPE over its
    pieces, with SentencePiece's encoding and decoding.

    - Merges: the file's, where it has them; else made from the pieces and their scores
      (_merges_from_scores), as transformers does for such a file.
    - Bytes no piece covers are spelled with the <0xNN> pieces (byte fallback); <unk> where even
      those are missing.
    - A space is '▁' (U+2581), and with `tokenizer.ggml.add_space_prefix` (the default) each
      stretch of text gets one in front: at the start and after every token matched whole in the
      text (control and user-defined ones), as llama.cpp tokenizes and as SentencePiece encodes
      each stretch; so " hi" is '▁▁hi'. (transformers 5 prepends it with a Metaspace
      pre-tokenizer only at the very start and not before a space: ' hi' -> '▁hi' there; its
      4.x GGUF conversion did as here.) Decoding turns '▁' back into spaces, joins <0xNN> pieces
      into UTF-8, and strips the one space at the start.
    - Control tokens (type 3), the unknown token and bos/eos are special added tokens,
      user-defined ones (type 4) plain added tokens; BOS is added unless
      `tokenizer.ggml.add_bos_token` is false (llama.cpp's and transformers' default for these).
    """
    vocab = {t: i for i, t in enumerate(tokens)}
    if "tokenizer.ggml.merges" in meta:
        merges = _gguf_merges(meta)
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:  # SentencePiece's own scores fall with the id
            scores = [-float(i) for i in range(len(tokens))]
        else:
            scores = _gguf_list(meta, "tokenizer.ggml.scores", (int, float), "numbers")
            if len(scores) != len(tokens):
                raise TokenizerError(f"tokenizer.ggml.scores has {len(scores)} entries for "
                                     f"{len(tokens)} tokens")
        merges = _merges_from_scores(tokens, scores, types)

    def token_at(key):
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    unk = token_at("tokenizer.ggml.unknown_token_id")
    if unk is None:
        unk = next((t for t, ty in zip(tokens, types, strict=True)
                    if ty == TOKEN_TYPE_UNKNOWN), None)
    tok = _bpe_tokenizer(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                         byte_fallback=True)
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    space = normalizers.Replace(" ", SPIECE_SPACE)
    # The normalizer runs on each stretch of text between added tokens: each gets its '▁'.
    tok.normalizer = (normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), space])
                      if prefix else space)
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))

    special = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_TYPE_CONTROL]
    special += [t for t in (unk, token_at("tokenizer.ggml.bos_token_id"),
                            token_at("tokenizer.ggml.eos_token_id"))
                if t is not None and t not in special]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types, strict=True) if ty == TOKEN_TYPE_USER_DEFINED]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    result = _finish_gguf_tokenizer(tok, meta, tokens, add_bos=True)
    result.space_prefix = bool(prefix)
    return result


def _merges_from_scores(tokens: list[str], scores: list[float],
                        types: list[int]) -> list[tuple[str, str]]:
    """BPE merges that make the BPE model encode as SentencePiece's BPE does.

    SentencePiece has no merge list: it joins, again and again, the two neighbouring symbols
    whose concatenation is the best-scored piece of the vocabulary. Every split of a piece into
    two pieces is thus a merge, ranked by the score of the piece it makes (the best first; a
    tie goes to the piece listed first). Only normal pieces (type 1) are made by merging: like
    SentencePiece, never a control, user-defined or byte piece (a control token spelled in
    text must not come out as the control token).
    """
    known = set(tokens)
    ranked = sorted(
        (i for i, (t, ty) in enumerate(zip(tokens, types, strict=True))
         if ty == TOKEN_TYPE_NORMAL and len(t) > 1),
        key=lambda i: -scores[i])  # stable: equal scores keep their order in the file
    merges = []
    for i in ranked:
        piece = tokens[i]
        merges += [(piece[:k], piece[k:]) for k in range(1, len(piece))
                   if piece[:k] in known and piece[k:] in known]
    return merges


def _finish_gguf_tokenizer(tok: tokenizers.Tokenizer, meta: dict, tokens: list[str],
                           add_bos: bool) -> Tokenizer:
    """BOS/EOS as `tokenizer.ggml.add_bos_token` / `add_eos_token` say (`add_bos`: the default),
    the chat templates, and the unk/pad tokens a template may name."""
    def token_at(key):  # (id, token) or (None, None)
        i = meta.get(key)
        return (i, tokens[i]) if i is not None and 0 <= i < len(tokens) else (None, None)

    bos_id, bos = token_at("tokenizer.ggml.bos_token_id")
    eos_id, eos = token_at("tokenizer.ggml.eos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos)
    first = [(bos, bos_id)] if add_bos and bos else []
    last = [(eos, eos_id)] if meta.get("tokenizer.ggml.add_eos_token") and eos else []
    if first or last:
        tok.post_processor = processors.TemplateProcessing(
            single=[*(t for t, _ in first), "$A", *(t for t, _ in last)],
            special_tokens=list(set(first + last)),
        )
    result = Tokenizer(tok, bos, eos, _gguf_chat_templates(meta))
    # As transformers: the template variables unk_token and pad_token, where the file names them
    for name, key in (("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token = token_at(f"tokenizer.ggml.{key}")[1]
        if token is not None:
            result.special_tokens[name] = token
    return result


def _gguf_chat_templates(meta: dict) -> dict[str, str]:
    """tokenizer.chat_template (the default) and tokenizer.chat_template.NAME (the others a
    folder's list of named templates held: "tool_use"), by name, as llama.cpp reads them."""
    prefix = "tokenizer.chat_template"
    templates = {}
    for key, value in meta.items():
        if key == prefix or key.startswith(prefix + "."):
            if not isinstance(value, str):
                raise TokenizerError(f"GGUF metadata {key} must be a template (a string), got "
                                     f"{value!r:.80}")
            templates[key[len(prefix) + 1:] or "default"] = value
    return templates


# ---------------------------------------------------------------------------------------------
# Chat templates (engine/model/chat_template.py renders them)


def _named_templates(chat_template) -> dict[str, str]:
    """`chat_template`, a string (named "default"), a list of {name, template} (HF's config) or
    a {name: template} dict, by name."""
    if chat_template is None:
        return {}
    if isinstance(chat_template, str):
        return {"default": chat_template}
    if isinstance(chat_template, dict) and all(isinstance(v, str) for v in chat_template.values()):
        return dict(chat_template)
    if not isinstance(chat_template, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str) for t in chat_template):
        raise TokenizerError(f"chat_template must be a template (a string) or a list of "
                             f"{{'name', 'template'}} objects, got {chat_template!r:.80}")
    return {t["name"]: t["template"] for t in chat_template}


# ---------------------------------------------------------------------------------------------
# The tokenizer

# The named special tokens of a tokenizer_config.json that HF hands a chat template (its
# SPECIAL_TOKENS_ATTRIBUTES less bos_token and eos_token, which Tokenizer holds itself).
_TEMPLATE_TOKENS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_token: str | None,
                 eos_token: str | None, chat_template=None):
        # A tokenizer.json may store a truncation or padding setting (some repacks keep the
        # max_length they trained with); HF's tokenizers reset it at every call. Here it would
        # cut or pad every prompt without a word.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = tokenizer.token_to_id(eos_token) if eos_token else None
        # As HF: "tool_use" renders a chat with tools where the model has one, else "default".
        self.chat_templates = _named_templates(chat_template)
        self.chat_template = self.chat_templates.get("default")
        self.special_tokens: dict[str, str] = {}  # unk_token, pad_token, ...: template variables
        self._compiled: dict[str, jinja2.Template] = {}  # by name: at load, so a template
        for name, source in self.chat_templates.items():  # that is no jinja fails there
            import jinja2  # (compile_template's module has it loaded already)

            try:
                self._compiled[name] = compile_template(source)
            except jinja2.TemplateError as e:
                error = TokenizerError(f"chat template {name!r} is not valid jinja: {e}")
                error.template = name  # from_pretrained names the file it came from
                raise error from None
        self._token_bytes: dict[int, bytes] = {}  # token_bytes' answers
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.all_special_ids = {
            i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special
        }
        # A SentencePiece tokenizer that puts a '▁' before every stretch of text it encodes:
        # text that continues other text must be encoded with it (apply_chat_template)
        self.space_prefix = False

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> Tokenizer:
        """An HF model folder: `tokenizer.json`, plus `tokenizer_config.json` if present."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"no tokenizer.json in {folder} (needed to build the tokenizer)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises a bare Exception for any fault in the file
            raise TokenizerError(f"{path} is not a tokenizer the tokenizers library reads: "
                                 f"{e}") from None
        config_path = folder / "tokenizer_config.json"
        config = json_object(config_path, TokenizerError) if config_path.is_file() else {}

        def token(name):  # "<s>", or {"content": "<s>", ...}, or absent
            value = config.get(name)
            value = value.get("content") if isinstance(value, dict) else value
            if value is not None and not isinstance(value, str):
                raise TokenizerError(f"{config_path}: {name} must be a token's text, got "
                                     f"{value!r:.80}")
            return value

        # Older folders keep the tokens in special_tokens_map.json. As in HF, it is read only for
        # a config without added_tokens_decoder (an older one), and its tokens win over the
        # config's.
        map_path = folder / "special_tokens_map.json"
        if map_path.is_file() and "added_tokens_decoder" not in config:
            config = {**config, **json_object(map_path, TokenizerError)}

        # Newer HF folders keep templates in files: chat_template.jinja (the default) and
        # additional_chat_templates/NAME.jinja. As in HF, where any such file is, the files are
        # the templates: the config's are not read (nor its "tool_use" beside a .jinja default).
        files = [("default", folder / "chat_template.jinja")] + [
            (f.stem, f) for f in sorted((folder / "additional_chat_templates").glob("*.jinja"))]
        templates, sources = {}, {}  # sources: template name -> the file it came from
        for name, path in files:
            if path.is_file():
                try:
                    templates[name] = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    raise TokenizerError(f"{path} is not readable UTF-8 text: {e}") from None
                sources[name] = path
        if not templates:
            try:
                templates = _named_templates(config.get("chat_template"))
            except TokenizerError as e:
                raise TokenizerError(f"{config_path}: {e}") from None
        try:
            tokenizer = cls(tok, token("bos_token"), token("eos_token"), templates)
        except TokenizerError as e:  # a chat template: say which file holds it
            raise TokenizerError(f"{sources.get(getattr(e, 'template', None), config_path)}: "
                                 f"{e}") from None
        # the template variables HF sets besides bos_token and eos_token (its special_tokens_map)
        tokenizer.special_tokens = {name: value for name in _TEMPLATE_TOKENS
                                    if (value := token(name)) is not None}
        return tokenizer

    @classmethod
    def from_gguf(cls, reader) -> Tokenizer:
        """The tokenizer a GGUF file describes, given an open `gguf.GGUFReader`."""
        return tokenizer_from_gguf_metadata(gguf_tokenizer_metadata(reader))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # NOTE: encode_batch_fast releases the GIL where encode holds it, so a server can
        # tokenize megabytes on a worker thread (seconds) while its event loop goes on serving;
        # encode_batch, which also computes character offsets, held it ~110 ms for 4 MB.
        return self.tokenizer.encode_batch_fast([text],
                                                add_special_tokens=add_special_tokens)[0].ids

    def encode_within(self, text: str, max_tokens: int, add_special_tokens: bool = True
                      ) -> tuple[int, list[int] | None]:
        """(number of tokens, the ids, or None if there are more than max_tokens).

        Meant for a thread: the encoding runs without the GIL, and an over-long text never has
        its ids turned into a Python list (for a 4 MB text that alone holds the GIL ~0.1 s).
        """
        enc = self.tokenizer.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0]
        num_tokens = len(enc)
        return num_tokens, (enc.ids if num_tokens <= max_tokens else None)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if len(ids) > 4096:
            # decode_batch lets go of the GIL while it works: on a server's worker thread,
            # decode held it ~100 ms for 580,000 ids (tools/health_stall.py)
            return self.tokenizer.decode_batch([list(ids)],
                                               skip_special_tokens=skip_special_tokens)[0]
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.tokenizer.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """Token i's own UTF-8 bytes, also when it holds part of a character (the chat API's
        logprob `bytes`, which a client joins to rebuild what decoding one token alone cannot).

        A byte-level BPE token is spelled in byte_to_unicode's alphabet; a SentencePiece byte
        fallback token is <0xNN>, and its pieces write a space as U+2581; any other token (added,
        special) is the UTF-8 of its text.
        """
        cached = self._token_bytes.get(i)
        if cached is None:  # asked for every logprob entry: worked out once a token
            cached = self._token_bytes[i] = self._spelled_bytes(i)
        return cached

    def _spelled_bytes(self, i: int) -> bytes:
        text = self.decode([i], skip_special_tokens=False)
        piece = self.id_to_token(i)
        if piece is not None:
            unspell = _unicode_to_byte()
            if all(ch in unspell for ch in piece):
                raw = bytes(unspell[ch] for ch in piece)
                # a plain-ASCII added token ("<|im_end|>") spells itself either way
                if raw.decode("utf-8", "replace") == text:
                    return raw
            fallback = _BYTE_FALLBACK.fullmatch(piece)
            if fallback:
                return bytes([int(fallback[1], 16)])
            if "\u2581" in piece:  # SentencePiece's space, which a decoder strips at the start
                return piece.replace("\u2581", " ").encode()
        return text.encode()

    def use_chat_template(self, source: str) -> None:
        """Render every chat with `source` (the server's --chat-template) in place of the
        model's templates: its default and its "tool_use" one (the model's other named ones
        stay, for a request that names one). TokenizerError if it is not valid jinja."""
        import jinja2

        try:
            compiled = compile_template(source)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template is not valid jinja: {e}") from None
        self.chat_templates = {name: text for name, text in self.chat_templates.items()
                               if name != "tool_use"} | {"default": source}
        self._compiled = {name: template for name, template in self._compiled.items()
                          if name in self.chat_templates} | {"default": compiled}
        self.chat_template = source

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = True, special_tokens_in_content: bool = False,
                            continue_final_message: bool = False,
                            render_seconds: float | None = None, chat_template: str | None = None,
                            **kwargs) -> list[int] | str:
        """Render `messages` with the model's chat template; ids, or the text if not `tokenize`.

        Special tokens written inside the messages or the other variables given (e.g. a forged
        `<|im_end|>` in a user's content, a tool's description, a document) are tokenized as
        plain text, so control tokens come only from the template;
        `special_tokens_in_content=True` matches them as control tokens, as HF does.
        `continue_final_message`: the text ends with the last message's content, left open for
        the model to continue (assistant prefill), as in HF; a ValueError where HF refuses
        (the template drops the message or changes it, e.g. escapes it: cut_at_mark).
        Extra keyword arguments (e.g. `tools`) become template variables, as in HF.
        `render_seconds`: the render's deadline (chat_template.RENDER_SECONDS when None).
        `chat_template`: a template's source, or the name of one of the model's, in place of
        the model's own choice (as HF).
        """
        template = self._template_for(kwargs.get("tools"), chat_template)
        # As HF: the template sees tools and documents (None when not given) and the special
        # tokens the tokenizer has; a token it lacks stays undefined.
        own = {"tools": None, "documents": None, **self.special_tokens,
               **{k: v for k, v in (("bos_token", self.bos_token),
                                    ("eos_token", self.eos_token)) if v is not None}}
        client = {**kwargs, "messages": messages}  # what the client wrote (render_split)
        mark = f"\ue002{secrets.token_hex(8)}\ue003"  # continue_final_message's end

        def render(given: dict) -> str:
            msgs = given["messages"]
            if continue_final_message:
                msgs = mark_final(msgs, mark)
            with render_deadline(render_seconds):
                text = template.render(**{**own, **given, "messages": msgs},
                                       add_generation_prompt=add_generation_prompt)
            if continue_final_message:
                return cut_at_mark(text, mark, final_text(given["messages"]))
            return text

        # The template already wrote any BOS it wants; adding it again would double it.
        if not tokenize or special_tokens_in_content or not self.all_special_ids:
            text = render(client)
            return self.encode(text, add_special_tokens=False) if tokenize else text
        pieces = render_split(render, client, self._special_pattern)
        if self.space_prefix:
            return self._encode_stretches(pieces)
        ids = []
        for piece, is_client_special in pieces:
            if is_client_special:  # spelled with ordinary tokens
                ids += self._as_text.encode_batch_fast([piece], add_special_tokens=False)[0].ids
            elif piece:
                ids += self.encode(piece, add_special_tokens=False)
        return ids

    def _encode_stretches(self, pieces: list[tuple[str, bool]]) -> list[int]:
        """render_split's pieces as one text whose special tokens are only the template's: the
        client's are spelled with ordinary tokens. Each stretch of text between the template's
        special tokens is encoded whole, so that a SentencePiece tokenizer puts its '▁' before
        the stretch only, not before every piece of it as encoding the pieces one by one would."""
        ids: list[int] = []
        stretch: list[str] = []

        def flush():
            if stretch:
                text = "".join(stretch)
                ids.extend(self._as_text.encode_batch_fast([text],
                                                           add_special_tokens=False)[0].ids)
                stretch.clear()

        for piece, is_client_special in pieces:
            if is_client_special:
                stretch.append(piece)
                continue
            at = 0
            for m in self._special_pattern.finditer(piece):
                stretch.append(piece[at:m.start()])
                flush()
                ids.append(self.tokenizer.token_to_id(m.group()))
                at = m.end()
            stretch.append(piece[at:])
        flush()
        return ids

    def _template_for(self, tools, given: str | None = None) -> jinja2.Template:
        """The compiled template a chat renders with: `given` (a name among the model's, else a
        template's source), or "tool_use" when it has tools and the model has one, else
        "default" (HF's choice)."""
        named = self.chat_templates
        if given is not None:
            if not isinstance(given, str):
                raise TypeError(f"chat_template must be a str, got {type(given).__name__}")
            if given not in named:
                return _given_template(given)
            name = given
        else:
            name = "tool_use" if tools is not None and "tool_use" in named else "default"
        if not named:
            raise TokenizerError(
                "this model has no chat template (chat_template in tokenizer_config.json or "
                "tokenizer.chat_template in the GGUF); use a plain completion prompt instead")
        if name not in named:
            raise TokenizerError(f"this model's chat templates are {sorted(named)}, none of them "
                                 f"'default' (nor 'tool_use' for a chat with tools)")
        if name not in self._compiled:  # chat_templates set after the tokenizer was made
            self._compiled[name] = compile_template(named[name])
        return self._compiled[name]

    @functools.cached_property
    def _special_pattern(self) -> re.Pattern:
        special = sorted((self.tokenizer.id_to_token(i) for i in self.all_special_ids),
                         key=len, reverse=True)  # the longest first: "<|a|>x" before "<|a|>"
        return re.compile("|".join(re.escape(t) for t in special))

    @functools.cached_property
    def _as_text(self) -> tokenizers.Tokenizer:
        """A copy of the tokenizer that spells special tokens as text."""
        copy = tokenizers.Tokenizer.from_str(self.tokenizer.to_str())
        copy.encode_special_tokens = True
        return copy


# ---------------------------------------------------------------------------------------------
# Streaming detokenization

# Tokens of context kept before the new ones: enough for a decoder to get spaces right at the seam.
_CONTEXT_TOKENS = 5


@functools.lru_cache(maxsize=8)
def _given_template(source: str) -> jinja2.Template:
    """A template given with a chat (its source), compiled once for the calls that repeat it."""
    import jinja2

    try:
        return compile_template(source)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat_template is not valid jinja: {e}") from None


class IncrementalDetokenizer:
    """Turns output ids, a few at a time, into text deltas.

    Each step decodes only a short window: tokens [prefix_offset, read_offset) were already turned
    into text, and the window's text beyond theirs is the delta. A delta that ends in U+FFFD is
    held back while the unread tokens' bytes end inside a character that more bytes can complete
    (an emoji split over byte-level tokens), and the window grows until it does; bytes that no
    later byte can mend go out as U+FFFD at once. Special tokens that decoding skips never enter
    the window. The last step (`final`, or flush()) sends whatever was held back, so the text is
    what decoding all the output at once gives; except where a byte-fallback run (<0xNN> pieces)
    holds bytes no character completes: decode() turns that whole run into U+FFFD, while here
    the text sent before the bad bytes stands; they, and characters of the same run that arrive
    within the next window or two, come out as U+FFFD (one per byte). A stream and the finished
    output are the same text either way.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int],
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._skipped = tokenizer.all_special_ids if skip_special_tokens else frozenset()
        self.token_ids = [i for i in prompt_token_ids[-_CONTEXT_TOKENS:] if i not in self._skipped]
        if self._decode(self.token_ids).endswith("\ufffd"):
            # The prompt stops inside a character: text diffs against it would be misaligned.
            self.token_ids = []
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _unfinished_from(self) -> int:
        """Where the bytes of a character that more bytes can complete begin, at the end of the
        unread tokens: the index of the token holding its first byte; len(token_ids) if the
        unread bytes end on a character boundary (or in bytes no later byte can mend).

        A token may end one character and begin the next (byte-level BPE merges across
        characters: b"\x8e\x89\xf0"); held back, it takes the end of the character before
        with it, so the tokens holding that one's first bytes are held back too: the text
        before the held tokens must be text that no later byte changes."""
        token_bytes = self.tokenizer.token_bytes
        sizes = [len(token_bytes(i)) for i in self.token_ids[self.read_offset:]]
        raw = b"".join(token_bytes(i) for i in self.token_ids[self.read_offset:])
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(raw)  # the text of all but the bytes still waiting for more
        pending = len(decoder.getstate()[0])
        k, start = len(sizes), len(raw)  # the held tokens, k on, and where their bytes begin
        while k > 0 and (start > len(raw) - pending
                         or not text.startswith(raw[:start].decode("utf-8", "replace"))):
            k -= 1
            start -= sizes[k]
        return self.read_offset + k

    def step(self, new_token_ids: list[int], final: bool = False) -> str:
        """The text the new tokens add; final: the last step, nothing is held back."""
        before = len(self.token_ids)
        self.token_ids.extend(i for i in new_token_ids if i not in self._skipped)
        if self.read_offset == len(self.token_ids) or (
                not final and before == len(self.token_ids)):
            return ""
        seen = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        end = len(self.token_ids)
        full = self._decode(self.token_ids[self.prefix_offset:end])
        if not final and full.endswith("\ufffd"):
            # hold back only the tokens of a character still arriving; the text before goes
            # out (a run of lead bytes would otherwise hold the window open, token after token)
            end = self._unfinished_from()
            if end < len(self.token_ids):
                full = self._decode(self.token_ids[self.prefix_offset:end])
        if not final and len(full) <= len(seen):
            return ""
        if full.startswith(seen):
            delta = full[len(seen):]
        else:
            # A byte-fallback decoder (<0xNN> pieces: Llama 2, Mistral, Gemma) decodes a run of
            # byte tokens as a whole, and bytes that no character completes turn the whole run
            # into U+FFFD, rewriting text already sent: the new tokens' own decoding instead
            delta = self._decode(self.token_ids[self.read_offset:end])
        # The next window starts at the last fully read tokens, so it stays a few tokens long.
        self.prefix_offset = self.read_offset
        self.read_offset = end
        self.text += delta
        return delta

    def flush(self) -> str:
        """What was held back (a character whose bytes never completed), now that no more come."""
        return self.step([], final=True)
