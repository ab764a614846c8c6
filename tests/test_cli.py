"""`pagedserve` command line: flag parsing, clear errors, and `generate` on a tiny dummy model."""

import json
import re

import pytest
from conftest import _smollm2_tokenizer

from server.cli import build_parser, main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """An HF-style folder: a 2-layer config (vocab 49152) and the SmolLM2 tokenizer files, for
    --load-format dummy."""
    folder = tmp_path_factory.mktemp("tiny-model")
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "eos_token_id": 2, "bos_token_id": 1}
    (folder / "config.json").write_text(json.dumps(config))
    tok = _smollm2_tokenizer()
    tok.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": tok.bos_token, "eos_token": tok.eos_token,
         "chat_template": tok.chat_template}))
    return folder


def _generate(folder, *extra):
    return main(["generate", "--model", str(folder), "--load-format", "dummy", "--device",
                 "numpy", "--max-model-len", "256", "--num-kv-blocks", "64", *extra])


@pytest.mark.parametrize("chat", [False, True])
def test_generate_prints_text_and_speed(tiny_folder, capsys, chat):
    args = ["--max-tokens", "6", "Hello, my name is"] + (["--chat"] if chat else [])
    assert _generate(tiny_folder, *args) == 0
    out, err = capsys.readouterr()
    assert len(out) > 1, "no completion text printed"  # random weights may print only spaces
    match = re.search(r"\[(\d+) prompt tokens, (\d+) generated in [\d.]+ s: ([\d.]+) tok/s", err)
    assert match, err
    num_prompt, num_generated, rate = int(match[1]), int(match[2]), float(match[3])
    # The chat template wraps the prompt in role markers, so it has more tokens.
    assert num_prompt > 20 if chat else 0 < num_prompt < 10
    assert 1 <= num_generated <= 6 and rate > 0


def test_generate_reports_bad_input_clearly(tiny_folder, capsys, tmp_path):
    assert _generate(tiny_folder, "--max-tokens", "6", "word " * 300) == 2
    assert "max_model_len" in capsys.readouterr().err
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "error" in capsys.readouterr().err


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
    assert (args.api_key, args.max_waiting_requests, args.served_model_name) == ("k", 4, "q")


@pytest.mark.parametrize("argv, needle", [
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
