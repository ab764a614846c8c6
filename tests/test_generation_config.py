"""--generation-config (vLLM's): the sampling defaults of a model's generation_config.json fill
what a request leaves unset, on the server and offline; "vllm" ignores them, a folder path reads
that folder's file, a bad one is refused naming the flag."""

import json
import logging

import pytest
from conftest import write_tiny_hf_folder

from engine.core.sampling_params import SamplingParams
from engine.llm import LLM
from engine.model.config import ConfigError, EngineConfig
from engine.model.loader import generation_defaults
from server.cli import main

# do_sample false is not looked at (nor by vLLM); max_new_tokens past the server's context
# (max_model_len 128) caps the output, it refuses no prompt
GENERATION = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
              "repetition_penalty": 1.1, "max_new_tokens": 1000, "do_sample": False,
              "eos_token_id": 2, "num_beams": 4}
DEFAULTS = {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
            "repetition_penalty": 1.1, "max_tokens": 1000}
NEUTRAL = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
CHAT = [{"role": "user", "content": "Hi"}]


def _model_folder(folder, generation: dict | None = None):
    """An HF-style folder: a config (vocab 49152, as the tiny server core's), the SmolLM2
    tokenizer files, and `generation` as its generation_config.json when given."""
    write_tiny_hf_folder(folder)
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


def _served(app_client, monkeypatch, **config):
    """(client, params): a server whose API process reads EngineConfig(**config) (the tiny core
    runs the model), and the SamplingParams of each request it hands to the core."""
    client = app_client(engine_config=EngineConfig(**config))
    engine, seen = client.app.state.engine, []
    add_request = engine.client.add_request

    def add_and_record(request):
        seen.append(request.params)
        add_request(request)

    monkeypatch.setattr(engine.client, "add_request", add_and_record)
    return client, seen


def _fields(params: SamplingParams, names) -> dict:
    return {name: getattr(params, name) for name in names}


def test_the_server_fills_what_a_request_leaves_out(app_client, monkeypatch, tmp_path, caplog):
    folder = _model_folder(tmp_path / "model", GENERATION)
    with caplog.at_level(logging.WARNING, "pagedserve"):
        client, seen = _served(app_client, monkeypatch, model=str(folder))
    line = next(r.getMessage() for r in caplog.records if "default sampling" in r.getMessage())
    assert "temperature=0.6" in line and "max_tokens=1000" in line and "do_sample" not in line
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT})
    assert r.status_code == 200, r.text  # 1000 tokens do not fit: the context's end comes first
    assert _fields(seen[-1], DEFAULTS) == DEFAULTS
    assert r.json()["usage"]["total_tokens"] <= 128
    # a request's own value wins, 0 and the neutral values too; null is unset (vLLM's reading)
    own = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT,
                                                  "max_completion_tokens": 3, **own})
    assert r.status_code == 200, r.text
    assert _fields(seen[-1], own) == own and seen[-1].max_tokens == 3
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT,
                                                  "max_tokens": 2, "top_k": None, "top_p": None})
    assert r.status_code == 200, r.text
    assert (seen[-1].top_k, seen[-1].top_p, seen[-1].max_tokens) == (20, 0.9, 2)
    # an explicit max_tokens past the context is still the request's mistake
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT,
                                                  "max_tokens": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
    # completions: OpenAI's 16 when max_tokens is left out, the model's for a null
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello"})
    assert r.status_code == 200, r.text
    assert _fields(seen[-1], NEUTRAL) == {name: DEFAULTS[name] for name in NEUTRAL}
    assert seen[-1].max_tokens == 16
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hello",
                                             "max_tokens": None, "temperature": 0})
    assert r.status_code == 200, r.text
    assert (seen[-1].max_tokens, seen[-1].temperature) == (1000, 0.0)


def test_vllm_ignores_the_file(app_client, monkeypatch, tmp_path):
    folder = _model_folder(tmp_path / "model", GENERATION)
    client, seen = _served(app_client, monkeypatch, model=str(folder), generation_config="vllm")
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": CHAT})
    assert r.status_code == 200, r.text
    assert _fields(seen[-1], NEUTRAL) == NEUTRAL and seen[-1].max_tokens is None


def test_a_folder_path_reads_its_own_file(tmp_path):
    model = _model_folder(tmp_path / "model", {"temperature": 0.2, "max_new_tokens": 7})
    other = tmp_path / "other"
    other.mkdir()
    (other / "generation_config.json").write_text(json.dumps(GENERATION))
    assert generation_defaults(EngineConfig(model=str(model))) == {"temperature": 0.2,
                                                                   "max_tokens": 7}
    assert generation_defaults(EngineConfig(model=str(model),
                                            generation_config=str(other))) == DEFAULTS
    assert generation_defaults(EngineConfig(model=str(model), generation_config="vllm")) == {}


def test_a_bad_flag_value_is_one_line_naming_the_flag(tmp_path, capsys):
    for value, words in ((str(tmp_path / "nowhere"), "is not a folder"),
                         (str(tmp_path), "holds no generation_config.json")):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--generation-config", value])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "--generation-config" in err and words in err, err
        with pytest.raises(ConfigError, match=f"generation_config: .*{words}"):
            EngineConfig(generation_config=value).validate()


def test_a_bad_default_fails_the_start_naming_the_file(tmp_path):
    for generation, words in (({"top_p": 0}, "top_p must be in"),
                              ({"max_new_tokens": 0}, "max_new_tokens must be")):
        folder = _model_folder(tmp_path / "model", generation)
        with pytest.raises(ConfigError, match=words) as e:
            generation_defaults(EngineConfig(model=str(folder)))
        assert "generation_config.json" in str(e.value)


def test_gguf_files_and_presets_have_none(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(GENERATION))  # beside the file
    (tmp_path / "model.gguf").write_bytes(b"")
    for model in (str(tmp_path / "model.gguf"), "smollm2-135m", None):
        assert generation_defaults(EngineConfig(model=model)) == {}
    # a folder given names the file whatever the model
    assert generation_defaults(EngineConfig(model=str(tmp_path / "model.gguf"),
                                            generation_config=str(tmp_path))) == DEFAULTS


def test_llm_default_sampling_params(make_engine, tmp_path, monkeypatch):
    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generation_config.json").write_text(json.dumps({**GENERATION, "max_new_tokens": 3}))
    assert LLM.from_engine(make_engine()).get_default_sampling_params() == SamplingParams()
    llm = LLM.from_engine(make_engine(generation_config=str(gen)))
    want = SamplingParams(**{**DEFAULTS, "max_tokens": 3})
    assert llm.get_default_sampling_params() == want
    seen, add_request = [], llm.engine.add_request
    monkeypatch.setattr(llm.engine, "add_request",
                        lambda rid, prompt, p: seen.append(p) or add_request(rid, prompt, p))
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, use_tqdm=False)
    assert seen == [want] and len(out[0].outputs[0].token_ids) <= 3
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=2), use_tqdm=False)
    assert seen[-1] == SamplingParams(max_tokens=2)  # given params are taken as they are
    # a None in a list of per-prompt params is the defaults too (it was SamplingParams())
    llm.generate([{"prompt_token_ids": [5]}, {"prompt_token_ids": [6]}],
                 [SamplingParams(max_tokens=2), None], use_tqdm=False)
    assert seen[-2:] == [SamplingParams(max_tokens=2), want]


def test_generate_takes_the_defaults_under_its_flags(tmp_path, monkeypatch, capsys):
    import server.cli as cli

    folder = _model_folder(tmp_path / "model", {"top_k": 20, "max_new_tokens": 3,
                                                "temperature": 0.6})
    seen, load_engine = [], cli.load_engine

    def load(config):
        engine = load_engine(config)
        add_request = engine.add_request
        engine.add_request = lambda rid, prompt, p: seen.append(p) or add_request(rid, prompt, p)
        return engine

    monkeypatch.setattr(cli, "load_engine", load)
    base = ["generate", "--model", str(folder), "--load-format", "dummy", "--device", "numpy",
            "--max-model-len", "256", "--num-kv-blocks", "64"]
    assert main([*base, "hi"]) == 0
    assert (seen[-1].top_k, seen[-1].max_tokens, seen[-1].temperature) == (20, 3, 0.6)
    assert main([*base, "--temperature", "0", "--max-tokens", "2", "hi"]) == 0
    assert (seen[-1].top_k, seen[-1].max_tokens, seen[-1].temperature) == (20, 2, 0.0)
    assert main([*base, "--generation-config", "vllm", "hi"]) == 0
    assert (seen[-1].top_k, seen[-1].max_tokens, seen[-1].temperature) == (0, 64, 0.0)
    capsys.readouterr()
