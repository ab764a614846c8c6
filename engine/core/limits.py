"""Every size bound on one request, in one place (README "Limits" lists them).

Each number has one owner that checks it and raises one error naming the field:
SamplingParams checks the sampling ones (engine/core/sampling_params.py), RequestTable._check
(engine/core_requests.py, through EngineCore.add_request) the ones that depend on the engine (n and
the beam width <= max_num_seqs, max_logprobs), the server's protocol the ones of the HTTP body.
"""

import numbers

MAX_N = 128  # completions per prompt; also at most the engine's max_num_seqs
MAX_LOGPROBS = 20  # top logprobs per token (OpenAI's limit)
MAX_LOGPROB_TOKEN_IDS = 128  # logprob_token_ids per request (vLLM's limit)
MAX_STOP_STRINGS = 32
MAX_STOP_STRING_CHARS = 256  # each stop string; the stop search scans this much text per token
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_BAD_WORDS = 128  # bad_words per request; each is tokenized two ways (vLLM's rule)
MAX_BAD_WORD_CHARS = 256  # each bad word
MAX_CACHE_SALT_CHARS = 128  # cache_salt (vLLM's limit)
MAX_PROMPTS = 256  # prompts in one completions call (each one engine request)
MAX_MESSAGES = 1024  # chat messages in one call
# Nesting of arrays and objects in a request body: room for a JSON schema of 10 nested
# arrays of objects (about 4 levels each) in response_format or a tool, as OpenAI's strict
# mode allows
MAX_JSON_DEPTH = 64


def is_int(value) -> bool:
    """The one test every count, token id and seed passes: an integer (numpy's too), and not a
    bool (True is an int to Python, but no count a caller means)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
