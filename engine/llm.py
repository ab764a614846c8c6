"""LLM: offline batch generation in one call, on top of LLMEngine (vLLM's `LLM` entry point).

    with LLM() as llm:                            # the default model, on the GPU if there is one
        outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    print(outs[0].outputs[0].text)                # leaving `with` (or close()) frees the GPU

A request that fails alone comes back with finish_reason "error" and the cause in
CompletionOutput.error; EngineDeadError (engine.core.outputs) means the engine cannot go on.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable, Iterable, Mapping

from engine.core.outputs import BeamSearchOutput, BeamSearchSequence, RequestOutput
from engine.core.sampling_params import BeamSearchParams, SamplingParams
from engine.engine import LLMEngine
from engine.model.chat_template import template_messages
from engine.model.config import EngineConfig
from engine.model.loader import generation_defaults


class LLM:
    def __init__(self, model: str | None = None, device: str = "auto", dtype: str = "auto",
                 max_model_len: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int = 8192, block_size: int = 16,
                 num_kv_blocks: int | None = None, enable_prefix_caching: bool = True,
                 seed: int = 0, **engine_fields):
        """Arguments are EngineConfig fields (model/config.py); unknown ones raise TypeError."""
        config = EngineConfig(
            model=model, device=device, dtype=dtype, max_model_len=max_model_len,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size, num_kv_blocks=num_kv_blocks,
            enable_prefix_caching=enable_prefix_caching, seed=seed, **engine_fields,
        )
        self._adopt(LLMEngine(config), own=True)

    @classmethod
    def from_engine(cls, engine: LLMEngine, own: bool = False) -> LLM:
        """Wrap an engine built elsewhere (tests build one around a tiny random model); `own`:
        shut it down when this LLM is let go, as an LLM built by its constructor does."""
        llm = cls.__new__(cls)
        llm._adopt(engine, own)
        return llm

    def _adopt(self, engine: LLMEngine, own: bool) -> None:
        self.engine = engine
        self._sampling_defaults: dict | None = None  # read on first use, as vLLM's LLM does
        self._ids = itertools.count()
        # An LLM let go without close() (a notebook cell run again) frees its engine all the
        # same: the engine's objects were frozen out of the garbage collector's reach at start-up
        # (gc.freeze), so its memory and tensor-parallel workers would stay as long as the
        # process. Not at interpreter exit (the workers end with the process).
        self._release = weakref.finalize(self, engine.shutdown) if own else None
        if self._release is not None:
            self._release.atexit = False

    def close(self) -> None:
        """Free the engine's memory (GPU included); idempotent. The LLM cannot be used after."""
        if self._release is not None:
            self._release()  # engine.shutdown(), once
        else:
            self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.engine.is_closed:
            raise RuntimeError("this LLM was closed; create a new LLM to generate again")

    def get_tokenizer(self):
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """What generate and chat use when given no SamplingParams, as vLLM's: SamplingParams()
        with the model's generation_config.json over it (EngineConfig.generation_config: "auto"
        reads the model folder's, "vllm" none, else the folder given)."""
        if self._sampling_defaults is None:
            self._sampling_defaults = generation_defaults(self.engine.config)
        return SamplingParams(**self._sampling_defaults)

    def generate(self, prompts, sampling_params=None, use_tqdm: bool | Callable = True
                 ) -> list[RequestOutput]:
        """Finished outputs in the order of `prompts`.

        prompts: a str, a {"prompt_token_ids": [...]} or {"prompt": str} dict (vLLM's
        TokensPrompt and TextPrompt), or a list of them.
        sampling_params: one SamplingParams for all, or a list with one per prompt; None (or
        None in the list) is get_default_sampling_params().
        use_tqdm: show a progress bar; a callable (e.g. functools.partial(tqdm, leave=False))
        makes it, as vLLM's.
        """
        self._check_open()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        if not isinstance(prompts, Iterable):
            raise TypeError(f"prompts must be a str, a {{'prompt_token_ids': [...]}} or "
                            f"{{'prompt': str}} dict or a list of them, got "
                            f"{type(prompts).__name__}")
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        elif isinstance(sampling_params, (dict, str)) or not isinstance(sampling_params,
                                                                        Iterable):
            raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}")
        else:
            params = list(sampling_params)
            if any(p is None for p in params):
                default = self.get_default_sampling_params()
                params = [default if p is None else p for p in params]
            if len(params) != len(prompts):
                raise ValueError(f"sampling_params has {len(params)} entries for "
                                 f"{len(prompts)} prompts; pass one, or one per prompt")
        return self._run(prompts, params, use_tqdm)

    def beam_search(self, prompts, params: BeamSearchParams, *,
                    use_tqdm: bool | Callable = False) -> list[BeamSearchOutput]:
        """vLLM's offline beam search: per prompt, the beam_width best sequences, best first;
        each sequence's tokens and text include the prompt's. As vLLM's, the text is the
        sequence's tokens decoded in one go, the prompt's with them, special tokens kept (the
        tokenizer's default), a text prompt's too; a beam's stop token (eos) is in its tokens
        (as elsewhere here) but in its text only with include_stop_str_in_output, as in vLLM,
        whose tokens leave it out then."""
        if not isinstance(params, BeamSearchParams):
            raise TypeError("beam_search takes a BeamSearchParams (beam_width, max_tokens, ...), "
                            f"got {type(params).__name__}")
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        outputs = self.generate(prompts, params.sampling_params(), use_tqdm)
        tokenizer = self.engine.tokenizer

        def text(out, c) -> str:
            if tokenizer is None:  # (token-id prompts only, and no text of the output either)
                return ""
            ids = list(c.token_ids)
            if c.finish_reason == "stop" and not params.include_stop_str_in_output:
                ids = ids[:-1]  # a beam stops on a token only (eos, or a stop id)
            return tokenizer.decode(list(out.prompt_token_ids) + ids, skip_special_tokens=False)

        return [BeamSearchOutput([
            BeamSearchSequence(out.prompt_token_ids + c.token_ids,
                               [None] * len(out.prompt_token_ids) + c.logprobs,
                               c.cumulative_logprob, text(out, c), c.finish_reason,
                               c.stop_reason)
            for c in out.outputs]) for out in outputs]

    def chat(self, messages, sampling_params=None, use_tqdm: bool | Callable = True, *,
             add_generation_prompt: bool = True, continue_final_message: bool = False,
             chat_template_kwargs: dict | None = None, tools: list[dict] | None = None,
             chat_template: str | None = None) -> list[RequestOutput]:
        """messages: one conversation (a list of {"role", "content"} dicts) or a list of them.
        As vLLM's: continue_final_message leaves the last message open for the model to go on
        (with add_generation_prompt=False); chat_template_kwargs and tools reach the template;
        chat_template (a template's source, or the name of one of the model's) renders in place
        of the model's own. Those come by keyword only: vLLM's next positional one is another
        (lora_request), which would otherwise land on add_generation_prompt unnoticed."""
        self._check_open()
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("chat needs a tokenizer with a chat template; this model has none")
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts "
                             "(one conversation) or of such lists")
        conversations = messages if isinstance(messages[0], list) else [messages]
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise TypeError(f"chat_template_kwargs must be a dict, got "
                            f"{type(chat_template_kwargs).__name__}")
        if tools is not None and not isinstance(tools, (list, tuple)):
            raise TypeError(f"tools must be a list of tool dicts, got {type(tools).__name__}")
        # As vLLM's: chat_template_kwargs go over the arguments (e.g. its own
        # add_generation_prompt or tools), rather than clash with them as a TypeError.
        options = {"add_generation_prompt": add_generation_prompt,
                   "continue_final_message": continue_final_message,
                   **({"tools": tools} if tools else {}), **(chat_template_kwargs or {})}
        reserved = sorted(set(options) & _RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {reserved}")
        if options["add_generation_prompt"] and options["continue_final_message"]:
            # as vLLM's (transformers' apply_chat_template) and the server's 400
            raise ValueError("Cannot set both `continue_final_message` and "
                             "`add_generation_prompt` to True.")
        prompts = []
        for conversation in conversations:
            conversation = _chat_messages(conversation)
            ids = tokenizer.apply_chat_template(conversation, tokenize=True,
                                                chat_template=chat_template, **options)
            prompts.append({"prompt_token_ids": ids})
        outputs = self.generate(prompts, sampling_params, use_tqdm)
        for out in outputs:  # as vLLM's: the rendered conversation (what the model read)
            out.prompt = tokenizer.decode(out.prompt_token_ids, skip_special_tokens=False)
        return outputs

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool | Callable
             ) -> list[RequestOutput]:
        engine = self.engine
        request_ids = []
        bar = None
        if use_tqdm:  # before any submission: a bar that cannot start leaves nothing queued
            from tqdm.auto import tqdm

            make_bar = use_tqdm if callable(use_tqdm) else tqdm
            bar = make_bar(total=len(prompts), desc="requests", unit="req")
        try:
            for prompt, p in zip(prompts, params, strict=True):
                request_id = f"llm-{next(self._ids)}"
                while engine.has_request(request_id):  # others' on a shared engine (another
                    request_id = f"llm-{next(self._ids)}"  # LLM's, or added directly)
                engine.add_request(request_id, prompt, p)
                request_ids.append(request_id)
        except BaseException:
            self._abandon(request_ids)
            if bar is not None:
                bar.close()
            raise
        finished: dict[str, RequestOutput] = {}
        mine = set(request_ids)
        # A step also hands out the outputs of requests others added to the engine directly:
        # kept, in order, and handed back to the engine at the end, for their owner's next
        # step() (not before: each step would report them again).
        others: list[RequestOutput] = []
        try:
            while len(finished) < len(request_ids) and engine.has_unfinished_requests():
                outs = engine.step()
                others += [out for out in outs if out.request_id not in mine]
                for out in outs:  # (others' are kept first: a bar that raises loses none)
                    if out.finished and out.request_id in mine:
                        finished[out.request_id] = out
                        if bar is not None:
                            bar.update(1)
        except BaseException:  # Ctrl-C, a dead engine: nothing of this call may run on
            engine.hand_back(others)  # before the outputs _abandon's step hands back
            self._abandon([r for r in request_ids if r not in finished])
            raise
        else:
            engine.hand_back(others)
        finally:
            if bar is not None:
                bar.close()
        return [finished[request_id] for request_id in request_ids]

    def _abandon(self, request_ids: list[str]) -> None:
        """Abort requests this call submitted, and take their aborted outputs out of the engine,
        so that they neither hold KV blocks nor run inside a later call (leaving the engine as
        it was). The step that reports the aborts (and reads a step left in flight) reports
        the outputs of requests others added to the engine too: they are handed back, for
        their owner's next step()."""
        engine = self.engine
        for request_id in request_ids:
            engine.abort(request_id)
        with contextlib.suppress(Exception):  # a dead engine has nothing left to hand out
            mine = set(request_ids)
            engine.hand_back([out for out in engine.step() if out.request_id not in mine])


# The renderer's own arguments, which chat_template_kwargs may not pass (server/extras.py's
# _RESERVED less continue_final_message, which chat() takes as an argument too, and
# bos_token / eos_token).
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tokenize", "special_tokens_in_content",
                                       "render_seconds", "chat_template", "self"})


def _chat_messages(conversation) -> list[dict]:
    """A conversation as the chat template takes it; a ValueError naming the message at fault.
    Text parts are joined by newlines (as vLLM joins them, and server/protocol.parse_messages);
    an assistant turn's missing or None content (a turn of tool calls) is "" to the template, and
    its tool calls as the server hands them over (chat_template.template_messages)."""
    if not isinstance(conversation, list) or not conversation:
        raise ValueError(f"a conversation must be a non-empty list of messages, got "
                         f"{type(conversation).__name__}")
    out = []
    for i, m in enumerate(conversation):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role', got {m!r:.80}")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str)
                                             for p in content):  # OpenAI's text parts
            m = {**m, "content": "\n".join(p["text"] for p in content)}
        elif content is None and m["role"] == "assistant":
            m = {**m, "content": ""}
        elif not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be a string, got {content!r:.80}")
        out.append(m)
    return template_messages(out)
