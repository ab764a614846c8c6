"""The offline LLM entry point: input order, per-prompt params, chat, construction from flags."""

import gc
import json

import numpy as np
import pytest

from engine.core.sampling_params import ParamError, SamplingParams
from engine.engine import LLMEngine
from engine.llm import LLM
from engine.model.tokenizer import TokenizerError


def test_generate_keeps_input_order_and_per_prompt_params(make_engine):
    llm = LLM.from_engine(make_engine(max_num_batched_tokens=48))
    prompts = [{"prompt_token_ids": list(range(3, 3 + n))} for n in (90, 1, 40, 7)]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (3, 9, 1, 5)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in prompts]
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 9, 1, 5]
    assert all(o.finished for o in outs)
    # One SamplingParams for all gives each prompt the same tokens it gets alone.
    one = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    together = llm.generate(prompts, one, use_tqdm=True)
    alone = [llm.generate(p, one, use_tqdm=False)[0] for p in prompts]
    assert [o.outputs[0].token_ids for o in together] == [o.outputs[0].token_ids for o in alone]
    with pytest.raises(ValueError, match="sampling_params"):
        llm.generate(prompts, params[:2])
    # An entry that is no SamplingParams is refused, an empty one too (it once ran as the
    # defaults), and the prompts before it leave nothing behind.
    for bad in ({"max_tokens": 3}, {}, 0, ""):
        with pytest.raises(TypeError, match="sampling_params must be a SamplingParams"):
            llm.generate(prompts[:2], [params[0], bad], use_tqdm=False)
        assert not llm.engine.has_unfinished_requests()
        assert llm.engine.get_stats().kv_blocks_used == 0
    assert [c.finished() for c in outs[0].outputs] == [True]  # a method, as vLLM's
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate([prompts[0], {"prompt_token_ids": [10**6]}], use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.get_stats().kv_blocks_used == 0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_an_interrupted_generate_leaves_nothing_running(make_engine, async_scheduling):
    """Ctrl-C inside generate: what the call submitted is aborted and its blocks freed; before,
    it ran on inside every later call, holding KV blocks, its outputs thrown away."""
    llm = LLM.from_engine(make_engine(async_scheduling=async_scheduling))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (9, 20, 33)]
    want = llm.generate(prompts[:1], params, use_tqdm=False)
    engine, steps = llm.engine, [0]
    step = engine.step

    def interrupted():
        steps[0] += 1
        if steps[0] == 4:
            raise KeyboardInterrupt
        return step()

    engine.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params, use_tqdm=False)
    engine.step = step
    assert not engine.has_unfinished_requests()
    assert engine.get_stats().kv_blocks_used == 0
    before = engine.scheduler.num_steps
    again = llm.generate(prompts[:1], params, use_tqdm=False)
    assert again[0].outputs[0].token_ids == want[0].outputs[0].token_ids
    assert engine.scheduler.num_steps - before <= 41  # its own steps only, nobody else's


def test_token_ids_the_detokenizer_cannot_hold_are_refused_first(make_engine):
    """Negative or huge ids are out of vocabulary before the detokenizer (32-bit ids) sees them:
    a ValueError naming prompt_token_ids, not an OverflowError, and the LLM keeps serving."""
    llm = LLM.from_engine(make_engine(text=True))
    for ids in ([-1, 5], [5, 2**40], [5, 2**31]):
        with pytest.raises(ValueError, match=r"prompt_token_ids\[\d\].*out of vocabulary"):
            llm.generate({"prompt_token_ids": ids}, use_tqdm=False)
    with pytest.raises(TypeError, match="prompt_token_ids"):
        llm.generate({"prompt_token_ids": 5}, use_tqdm=False)
    for ids, bad in (([5, True], "True"), ([5, 6.0], "6.0"), ([7, "8"], "'8'")):
        with pytest.raises(ValueError, match=rf"prompt_token_ids\[1\] = {bad} is not a token id"):
            llm.generate({"prompt_token_ids": ids}, use_tqdm=False)
    vocab = llm.engine.model_config.vocab_size
    with pytest.raises(ValueError, match=rf"prompt_token_ids\[2\] = {vocab}: .*out of vocab"):
        llm.generate({"prompt_token_ids": [0, vocab - 1, vocab]}, use_tqdm=False)
    params = SamplingParams(max_tokens=2, temperature=0)
    out = llm.generate({"prompt_token_ids": [5, 6]}, params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2
    # numpy integers are token ids too, the same prompt as plain ints
    again = llm.generate({"prompt_token_ids": [np.int64(5), np.int32(6)]}, params,
                         use_tqdm=False)
    assert again[0].prompt_token_ids == [5, 6]
    assert again[0].outputs[0].token_ids == out[0].outputs[0].token_ids
    assert llm.engine.get_stats().kv_blocks_used == 0


def test_text_prompts_and_chat(make_engine):
    llm = LLM.from_engine(make_engine(text=True))
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    [out] = llm.generate("Hello there", params, use_tqdm=False)
    assert out.prompt == "Hello there" and out.prompt_token_ids == tok.encode("Hello there")
    assert out.outputs[0].text == tok.decode(out.outputs[0].token_ids)

    chat = [{"role": "user", "content": "What is 2+2?"}]
    [one] = llm.chat(chat, params, use_tqdm=False)
    assert one.prompt_token_ids == tok.apply_chat_template(chat, add_generation_prompt=True)
    assert one.prompt == tok.apply_chat_template(chat, tokenize=False)  # vLLM's: the rendering
    assert "What is 2+2?" in one.prompt
    other = [{"role": "user", "content": "Name a colour."}]
    both = llm.chat([chat, other], params, use_tqdm=False)
    assert both[0].outputs[0].token_ids == one.outputs[0].token_ids
    assert both[1].prompt_token_ids == tok.apply_chat_template(other)
    # text parts and an assistant turn of tool calls (content None) as the server takes them:
    # the parts joined by newlines (as vLLM joins them)
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"},
                                          {"type": "text", "text": "2+2?"}]}]
    [same] = llm.chat(parts, params, use_tqdm=False)
    joined = [{"role": "user", "content": "What is\n2+2?"}]
    assert same.prompt_token_ids == tok.apply_chat_template(joined)
    turns = chat + [{"role": "assistant", "content": None}, {"role": "user", "content": "And?"}]
    want = tok.apply_chat_template([*chat, {"role": "assistant", "content": ""}, turns[-1]])
    assert llm.chat(turns, params, use_tqdm=False)[0].prompt_token_ids == want
    for bad, needle in (("hello", "non-empty list"), ([], "non-empty list"),
                        ([{"content": "x"}], r"messages\[0\].*role"),
                        ([{"role": "user"}], r"messages\[0\]\['content'\]"),
                        ([chat, "x"], "conversation")):
        with pytest.raises(ValueError, match=needle):
            llm.chat(bad, params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()


def test_chat_takes_a_chat_template_as_vllm(make_engine):
    """vLLM's LLM.chat(chat_template=...): a template's source renders in place of the model's
    (its special tokens as the model's own template's: control tokens), a name picks one of the
    model's templates; a template that is no jinja fails naming chat_template."""
    llm = LLM.from_engine(make_engine(text=True))
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    mine = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}" + tok.eos_token + "{% endif %}")
    [out] = llm.chat(chat, params, use_tqdm=False, chat_template=mine)
    with pytest.raises(TypeError):  # vLLM's positional lora_request would land elsewhere
        llm.chat(chat, params, False, None)
    assert out.prompt_token_ids == tok.encode("[user] Hi\n[assistant] Yo\n",
                                              add_special_tokens=False) + [tok.eos_token_id]
    [again] = llm.chat(chat, params, use_tqdm=False, chat_template="default")
    assert again.prompt_token_ids == tok.apply_chat_template(chat)
    with pytest.raises(TokenizerError, match="chat_template is not valid jinja"):
        llm.chat(chat, params, use_tqdm=False, chat_template="{% for %}")
    with pytest.raises(TypeError, match="chat_template must be a str, got dict"):
        llm.chat(chat, params, use_tqdm=False, chat_template={"default": mine})
    assert not llm.engine.has_unfinished_requests()


def test_chat_options_beam_text_and_argument_errors_as_vllm(make_engine):
    """LLM.chat takes vLLM's continue_final_message, chat_template_kwargs and tools; a beam
    search on token ids has the prompt's text in each sequence's; generate names what it got
    when the prompts or params are of no kind it takes."""
    from engine.core.sampling_params import BeamSearchParams

    llm = LLM.from_engine(make_engine(text=True))
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    conv = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Sure, "}]
    [out] = llm.chat(conv, params, use_tqdm=False, add_generation_prompt=False,
                     continue_final_message=True)
    assert out.prompt_token_ids == tok.apply_chat_template(
        conv, add_generation_prompt=False, continue_final_message=True)
    assert tok.decode(out.prompt_token_ids, skip_special_tokens=False).endswith("Sure, ")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    [with_tools] = llm.chat(conv[:1], params, use_tqdm=False, tools=tools,
                            chat_template_kwargs={"custom": 1})
    assert with_tools.prompt_token_ids == tok.apply_chat_template(conv[:1], tools=tools,
                                                                  custom=1)
    ids = tok.encode("Hello world")
    for prompt in ("Hello world", {"prompt_token_ids": ids}):
        [beams] = llm.beam_search([prompt], BeamSearchParams(beam_width=2, max_tokens=2))
        best = beams.sequences[0]
        assert best.text == tok.decode(best.tokens, skip_special_tokens=False)
        assert best.text.startswith("Hello world")
    for bad, words in ((5, "prompts must be"), (None, "prompts must be")):
        with pytest.raises(TypeError, match=words):
            llm.generate(bad, use_tqdm=False)
    with pytest.raises(TypeError, match="got dict"):
        llm.generate(["a"], {"max_tokens": 3}, use_tqdm=False)


def test_llm_builds_its_engine_from_flags(tmp_path):
    config = {
        "architectures": ["LlamaForCausalLM"], "vocab_size": 300, "hidden_size": 32,
        "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "max_position_embeddings": 256, "eos_token_id": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    llm = LLM(str(tmp_path), device="numpy", load_format="dummy", max_model_len=64,
              block_size=8, num_kv_blocks=20, seed=3)
    assert isinstance(llm.engine, LLMEngine)
    assert llm.engine.max_model_len == 64 and llm.engine.get_stats().kv_blocks_total == 20
    assert llm.get_tokenizer() is None
    [out] = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=None,
                                                                         ignore_eos=True))
    assert len(out.outputs[0].token_ids) == 64 - 3 and out.outputs[0].finish_reason == "length"
    with pytest.raises(TypeError):
        LLM(str(tmp_path), device="numpy", load_format="dummy", no_such_flag=1)
    with pytest.raises(ValueError, match="block_size"):
        LLM(str(tmp_path), device="numpy", load_format="dummy", block_size=0)


def test_close_is_idempotent_and_a_closed_llm_refuses_use(make_engine):
    prompt = {"prompt_token_ids": [5, 6, 7]}
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    with LLM.from_engine(make_engine()) as llm:
        engine = llm.engine
        # the core's start-up objects sit out of the garbage collector's full collections
        # (their pauses stalled the GPU) until it is closed
        assert gc.get_freeze_count() > 1000
        want = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids
        engine.add_request("left-running", prompt, params)  # dropped by close
    assert engine.is_closed and engine.kv_cache is None and engine.model is None
    assert gc.get_freeze_count() == 0
    llm.close()  # again: nothing happens
    engine.shutdown()
    with pytest.raises(RuntimeError, match="closed; create a new LLM"):
        llm.generate(prompt, params, use_tqdm=False)
    with pytest.raises(RuntimeError, match="closed"):
        llm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(RuntimeError, match="shut down"):
        engine.step()
    with pytest.raises(RuntimeError, match="shut down"):
        engine.add_request("x", prompt, params)
    assert not engine.has_unfinished_requests()
    # A new one in the same process works as the first did.
    with LLM.from_engine(make_engine()) as again:
        assert again.generate(prompt, params, use_tqdm=False)[0].outputs[0].token_ids == want


@pytest.mark.parametrize("field, value", [
    ("seed", "a"), ("max_model_len", "x"), ("model", 123), ("max_num_seqs", True),
    ("block_size", 16.0), ("enable_prefix_caching", "yes"), ("gpu_memory_utilization", "0.5"),
    ("seed", -1), ("seed", 2**64),  # numpy takes no other seed (its own message named nothing)
])
def test_engine_fields_of_the_wrong_type_fail_naming_them(field, value):
    """Checked before any model loads: a ConfigError (a ValueError) that names the field."""
    from engine.model.config import ConfigError

    with pytest.raises(ConfigError, match=field):
        LLM(**{field: value})


def test_a_progress_bar_that_cannot_start_leaves_nothing_running(make_engine, monkeypatch):
    """The tqdm bar once started after the requests were in, outside the block that abandons
    them: a bar that raised (tqdm.notebook's "IProgress not found" in a Jupyter without
    ipywidgets, a Ctrl-C while tqdm.auto first imports) left them queued, to run inside the
    next call and hold KV blocks after it."""
    import tqdm.auto

    class NoWidgets:
        def __init__(self, *args, **kwargs):
            raise ImportError("IProgress not found. Please update jupyter and ipywidgets.")

    llm = LLM.from_engine(make_engine())
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    monkeypatch.setattr(tqdm.auto, "tqdm", NoWidgets)
    with pytest.raises(ImportError, match="IProgress"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, params)  # use_tqdm=True: default
    monkeypatch.undo()
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.get_stats().kv_blocks_used == 0
    [out] = llm.generate([{"prompt_token_ids": [5, 6, 7]}], params)  # and it still serves
    assert len(out.outputs[0].token_ids) == 40


def test_gguf_dequantize_of_the_wrong_type_fails_naming_it():
    """A string was taken for its truth: gguf_dequantize="false" dequantized."""
    from engine.model.config import ConfigError, EngineConfig

    with pytest.raises(ConfigError, match="gguf_dequantize"):
        EngineConfig(gguf_dequantize="false").validate()


def test_chat_template_kwargs_go_over_chat_arguments_as_vllm(make_engine):
    """vLLM's LLM.chat merges chat_template_kwargs over add_generation_prompt,
    continue_final_message and tools; they once clashed with them as a TypeError."""
    llm = LLM.from_engine(make_engine(text=True))
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=1)
    conv = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Sure, "}]
    [out] = llm.chat(conv, params, use_tqdm=False,
                     chat_template_kwargs={"add_generation_prompt": False})
    assert out.prompt_token_ids == tok.apply_chat_template(conv, add_generation_prompt=False)
    [out] = llm.chat(conv, params, use_tqdm=False, add_generation_prompt=False,
                     chat_template_kwargs={"continue_final_message": True})
    assert out.prompt_token_ids == tok.apply_chat_template(
        conv, add_generation_prompt=False, continue_final_message=True)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    [out] = llm.chat(conv[:1], params, use_tqdm=False, tools=[{"type": "function"}],
                     chat_template_kwargs={"tools": tools})
    assert out.prompt_token_ids == tok.apply_chat_template(conv[:1], tools=tools)
    with pytest.raises(ValueError, match="tokenize"):
        llm.chat(conv, params, use_tqdm=False, chat_template_kwargs={"tokenize": False})
    assert not llm.engine.has_unfinished_requests()


def test_an_llm_let_go_without_close_shuts_its_engine_down(monkeypatch):
    """LLM(...) owns its engine: dropped without close() it shuts the engine down (whose objects
    the start-up gc.freeze keeps from the collector); from_engine leaves the caller's alone."""
    import engine.llm as llm_module

    shut = []

    class FakeEngine:
        def __init__(self, config):
            self.config = config

        def shutdown(self):
            shut.append(self)

    monkeypatch.setattr(llm_module, "LLMEngine", FakeEngine)
    llm = LLM(device="cpu")
    owned = llm.engine
    del llm
    assert shut == [owned]
    borrowed = FakeEngine(None)
    llm = LLM.from_engine(borrowed)
    del llm
    assert shut == [owned]
    with LLM(device="cpu") as llm:  # close() shuts it down, once; letting it go adds none
        llm.close()
    closed = llm.engine
    del llm
    assert shut == [owned, closed]


def test_generate_waits_for_its_own_requests_not_the_engines_others(make_engine):
    """A request added to the engine directly that finished first was counted among generate's:
    the call stopped before its own request finished and raised KeyError, leaving it running."""
    llm = LLM.from_engine(make_engine())
    llm.engine.add_request("direct", {"prompt_token_ids": [5, 6]},
                           SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    outs = llm.generate({"prompt_token_ids": [7, 8, 9]},
                        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
                        use_tqdm=False)
    assert outs[0].finished and len(outs[0].outputs[0].token_ids) == 5
    # the direct request's output is the owner's, left for its next step()
    outputs: dict = {}
    _collect(llm.engine, outputs)
    assert set(outputs) == {"direct"}
    _assert_whole(outputs["direct"], 1)


def test_prompt_dict_fields_this_engine_does_not_run_are_refused_by_name(make_engine):
    """vLLM's prompt dicts carry more than the prompt (multi_modal_data, mm_processor_kwargs,
    cache_salt, ...): each was dropped without a word, the request run on the text alone. A
    ValueError names the field instead, and nothing is queued."""
    llm = LLM.from_engine(make_engine(text=True))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    for extra in ({"multi_modal_data": {"image": object()}}, {"mm_processor_kwargs": {}},
                  {"cache_salt": "tenant-a"}, {"lora_request": None}):
        (name,) = extra
        for prompt in ({"prompt": "Hi", **extra}, {"prompt_token_ids": [5, 6], **extra}):
            with pytest.raises(ValueError, match=name):
                llm.generate([prompt], params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    # the two fields it takes, together too (the text is the output's prompt)
    [out] = llm.generate({"prompt_token_ids": [5, 6], "prompt": "xy"}, params, use_tqdm=False)
    assert out.prompt == "xy" and out.prompt_token_ids == [5, 6]


def test_chat_refuses_continue_final_message_with_add_generation_prompt_as_vllm(make_engine):
    """continue_final_message=True with add_generation_prompt left at its default True: vLLM (and
    transformers' apply_chat_template) raise ValueError, as the server's 400 does; LLM.chat
    rendered the open final message and dropped add_generation_prompt without a word."""
    llm = LLM.from_engine(make_engine(text=True))
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    conv = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Sure, "}]
    with pytest.raises(ValueError, match="continue_final_message.*add_generation_prompt"):
        llm.chat(conv, params, use_tqdm=False, continue_final_message=True)
    with pytest.raises(ValueError, match="continue_final_message.*add_generation_prompt"):
        llm.chat(conv, params, use_tqdm=False,
                 chat_template_kwargs={"continue_final_message": True})
    assert not llm.engine.has_unfinished_requests()
    # either one alone, or both through chat_template_kwargs' override, renders
    llm.chat(conv, params, use_tqdm=False, continue_final_message=True,
             chat_template_kwargs={"add_generation_prompt": False})
    llm.chat(conv, params, use_tqdm=False, add_generation_prompt=False,
             continue_final_message=True)


def test_stop_set_on_params_after_construction_is_the_one_used(make_engine):
    """vLLM's examples take llm.get_default_sampling_params() and set its fields; `stop` set so
    was never searched for (the list read at construction was), the text ran on to max_tokens."""
    llm = LLM.from_engine(make_engine(text=True))
    base = dict(temperature=0, max_tokens=8, ignore_eos=True)
    [full] = llm.generate("Hello there", SamplingParams(**base), use_tqdm=False)
    text = full.outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    want = llm.generate("Hello there", SamplingParams(**base, stop=[stop]), use_tqdm=False)
    assert want[0].outputs[0].stop_reason == stop
    for later in ([stop], stop):
        params = llm.get_default_sampling_params()
        for name, value in base.items():
            setattr(params, name, value)
        params.stop = later
        [out] = llm.generate("Hello there", params, use_tqdm=False)
        assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason) == ("stop", stop)
        assert out.outputs[0].text == want[0].outputs[0].text
        params.stop = None  # and taken off again
        [out] = llm.generate("Hello there", params, use_tqdm=False)
        assert out.outputs[0].text == text


def test_use_tqdm_may_be_the_progress_bar_factory_as_vllm(make_engine):
    """vLLM's use_tqdm takes a callable that makes the bar (functools.partial(tqdm, leave=False),
    a tqdm subclass); it was read as True and the default bar drawn instead."""
    made = []

    class Bar:
        def __init__(self, **kwargs):
            self.total, self.n, self.closed = kwargs["total"], 0, False
            made.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            self.closed = True

    llm = LLM.from_engine(make_engine())
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3, params, use_tqdm=Bar)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 2, 2]
    assert [(b.total, b.n, b.closed) for b in made] == [(3, 3, True)]


def test_chat_template_kwargs_and_tools_of_the_wrong_type_fail_naming_them(make_engine):
    """chat_template_kwargs that is no dict was a TypeError "'list' object is not a mapping" from
    the merge, naming nothing; tools that is no list (a string, one tool's dict) went into the
    template as it was."""
    llm = LLM.from_engine(make_engine(text=True))
    params = SamplingParams(temperature=0, max_tokens=1)
    conv = [{"role": "user", "content": "Hi!"}]
    for bad in ([("custom", 1)], "custom=1"):
        with pytest.raises(TypeError, match="chat_template_kwargs must be a dict, got"):
            llm.chat(conv, params, use_tqdm=False, chat_template_kwargs=bad)
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    for bad in (tool, "f"):
        with pytest.raises(TypeError, match="tools must be a list of tool dicts, got"):
            llm.chat(conv, params, use_tqdm=False, tools=bad)
    assert not llm.engine.has_unfinished_requests()
    [out] = llm.chat(conv, params, use_tqdm=False, tools=[tool], chat_template_kwargs={})
    assert out.prompt_token_ids == llm.get_tokenizer().apply_chat_template(conv, tools=[tool])


def test_a_prompt_dict_whose_prompt_is_no_text_fails_naming_it(make_engine):
    """{"prompt": 5} was refused as "a str or a dict with ... 'prompt', got dict" (it is one);
    beside prompt_token_ids it was taken, and came back as the output's prompt. A dict of neither
    field says so."""
    llm = LLM.from_engine(make_engine(text=True))
    params = SamplingParams(temperature=0, max_tokens=1)
    for prompt in ({"prompt": 5}, {"prompt": ["Hi"]}, {"prompt": 5, "prompt_token_ids": [5, 6]}):
        with pytest.raises(TypeError, match=r"prompt\['prompt'\] must be a str, got (int|list)"):
            llm.generate(["Hi", prompt], params, use_tqdm=False)
    for prompt in ({}, {"prompt": None}):
        with pytest.raises(TypeError, match="needs 'prompt' .text. or 'prompt_token_ids'"):
            llm.generate(prompt, params, use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.get_stats().kv_blocks_used == 0
    [out] = llm.generate({"prompt": None, "prompt_token_ids": [5, 6]}, params, use_tqdm=False)
    assert out.prompt is None and out.prompt_token_ids == [5, 6]


def _collect(engine, outputs: dict) -> None:
    """Step `engine` to its end as the owner of requests added directly does: every output of
    each request, in order, into outputs[request_id]."""
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)


def _assert_whole(outs: list, max_tokens: int) -> None:
    """One request's outputs as its owner read them: it finished once, at the end, and its
    deltas add up to its tokens (no step's output went missing)."""
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    final = outs[-1].outputs[0]
    assert len(final.token_ids) == max_tokens
    deltas = [t for o in outs for t in o.outputs[0].delta_token_ids]
    assert deltas == list(final.token_ids)


@pytest.mark.parametrize("max_tokens", [1, 6])
def test_a_failed_generate_leaves_the_outputs_of_requests_added_directly(make_engine,
                                                                         max_tokens):
    """generate's clean-up after a failure stepped the engine to report its own aborts and
    dropped everything the step reported: a request added to the (shared) engine directly lost
    that step's output, its final one too when it finished in it (the owner never saw it end)."""
    llm = LLM.from_engine(make_engine())
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request("direct", {"prompt_token_ids": [5, 6, 7]}, params)
    bad = [{"prompt_token_ids": [8, 9]}, {"prompt_token_ids": [10**6]}]
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate(bad, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    outputs: dict = {}
    _collect(engine, outputs)
    assert set(outputs) == {"direct"}  # nothing of generate's, not even its aborts
    _assert_whole(outputs["direct"], max_tokens)
    assert engine.get_stats().kv_blocks_used == 0


@pytest.mark.parametrize("fail", [False, True])
def test_generate_leaves_every_output_of_requests_added_directly_to_their_owner(make_engine,
                                                                                fail):
    """generate steps the whole engine: the outputs of a request added to it directly were
    dropped, its tokens' deltas and its ending too when it finished inside the call. They are
    the owner's, for its next step(), whether the call succeeds or fails midway (a progress bar
    that raises)."""
    class Bar:
        def __init__(self, **kwargs):
            pass

        def update(self, k):
            if fail:
                raise RuntimeError("the bar broke")

        def close(self):
            pass

    llm = LLM.from_engine(make_engine(max_num_seqs=4))
    engine = llm.engine
    early = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    late = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    engine.add_request("early", {"prompt_token_ids": [5, 6, 7]}, early)  # ends inside generate
    engine.add_request("late", {"prompt_token_ids": [8, 9]}, late)  # outlives it
    prompts = [{"prompt_token_ids": [10, 11, 12]}, {"prompt_token_ids": [13, 14]}]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (8, 12)]
    if fail:
        with pytest.raises(RuntimeError, match="the bar broke"):
            llm.generate(prompts, params, use_tqdm=Bar)
    else:
        outs = llm.generate(prompts, params, use_tqdm=Bar)
        assert [len(o.outputs[0].token_ids) for o in outs] == [8, 12]
    outputs: dict = {}
    _collect(engine, outputs)
    assert set(outputs) == {"early", "late"}  # none of generate's, its aborts included
    _assert_whole(outputs["early"], 3)
    _assert_whole(outputs["late"], 30)
    assert engine.get_stats().kv_blocks_used == 0


def test_generate_takes_no_request_id_another_owner_holds(make_engine):
    """generate numbered its requests llm-0, llm-1, ... whatever the engine held: on an engine
    shared with another LLM, or with a request added directly under such an id, the call failed
    ("already in use") while that request ran, and took the id of one that had ended unread,
    whose ending add_request then dropped."""
    engine = make_engine()
    first, second = LLM.from_engine(engine), LLM.from_engine(engine)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("llm-0", {"prompt_token_ids": [5, 6, 7]},
                       SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.add_request("llm-1", {"prompt_token_ids": [8, 9]},
                       SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    outs = first.generate({"prompt_token_ids": [10, 11]}, params, use_tqdm=False)
    assert outs[0].request_id not in ("llm-0", "llm-1") and outs[0].finished
    # llm-1 ended inside that call, its output left for its owner: still its id
    outs = second.generate({"prompt_token_ids": [12, 13]}, params, use_tqdm=False)
    assert outs[0].request_id not in ("llm-0", "llm-1") and outs[0].finished
    outputs: dict = {}
    _collect(engine, outputs)
    assert set(outputs) == {"llm-0", "llm-1"}
    _assert_whole(outputs["llm-0"], 20)
    _assert_whole(outputs["llm-1"], 1)


def test_truncate_prompt_tokens_and_detokenize_as_vllm(make_engine):
    """vLLM's SamplingParams fields: truncate_prompt_tokens keeps the prompt's last k tokens
    (-1: the longest prompt the model takes), detokenize=False leaves the text empty, the
    tokens the same."""
    llm = LLM.from_engine(make_engine(text=True, max_model_len=64))
    greedy = dict(temperature=0, max_tokens=4, ignore_eos=True)
    prompt = {"prompt_token_ids": list(range(100, 130))}
    [cut] = llm.generate(prompt, SamplingParams(truncate_prompt_tokens=9, **greedy),
                         use_tqdm=False)
    [tail] = llm.generate({"prompt_token_ids": list(range(121, 130))},
                          SamplingParams(**greedy), use_tqdm=False)
    assert cut.prompt_token_ids == list(range(121, 130))
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids
    [long] = llm.generate({"prompt_token_ids": list(range(100, 200))},
                          SamplingParams(truncate_prompt_tokens=-1, max_tokens=1),
                          use_tqdm=False)
    assert long.prompt_token_ids == list(range(137, 200))  # 63: room for one token
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ParamError) as e:
            SamplingParams(truncate_prompt_tokens=bad)
        assert e.value.field == "truncate_prompt_tokens"
    with pytest.raises(ParamError, match=r"truncate_prompt_tokens \(64\) must be < max_model_len"):
        llm.generate(prompt, SamplingParams(truncate_prompt_tokens=64), use_tqdm=False)

    [text] = llm.generate("Hello there", SamplingParams(**greedy), use_tqdm=False)
    [ids] = llm.generate("Hello there", SamplingParams(detokenize=False, **greedy),
                         use_tqdm=False)
    assert text.outputs[0].text and ids.outputs[0].text == ""
    assert ids.outputs[0].token_ids == text.outputs[0].token_ids
    with pytest.raises(ParamError, match="detokenize") as e:
        SamplingParams(detokenize=False, stop=["x"])
    assert e.value.field == "stop"
    assert not llm.engine.has_unfinished_requests()
