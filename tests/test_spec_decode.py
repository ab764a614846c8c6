"""N-gram speculative decoding on the numpy backend: the proposer against a brute-force search,
greedy and seeded outputs identical to plain decoding (chunked prefill, preemption, overlap, stop
rules), sampled frequencies that match plain decoding (chi-square), and the block manager's books
after every step with rollbacks."""

import numpy as np
import pytest
from conftest import step_to_end

from engine.core.block_manager import BlockManager
from engine.core.sampling_params import SamplingParams
from engine.core.sequence import Sequence
from engine.model.config import ConfigError, EngineConfig, SpeculativeConfig
from engine.ngram_proposer import NgramProposer


def ids(tokens):
    return {"prompt_token_ids": list(tokens)}


def spec(k=3, **fields):
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2, **fields}


def drive(engine, requests: dict):
    """Step to the end, checking the block manager's books after every step, and that no
    sequence keeps drafts (or their blocks) past the step that verified them."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    return step_to_end(engine, _drafts_are_gone)


def _drafts_are_gone(engine):
    for seq in engine.scheduler.running:
        assert not seq.spec_token_ids  # drafts live for one step
        assert len(seq.block_table) <= engine.block_manager.blocks_for(len(seq.token_ids))


def copy_heavy(rng, num, vocab=512):
    """Prompts that repeat spans, so the proposer finds n-grams from the first step on."""
    prompts = []
    for _ in range(num):
        span = rng.integers(3, vocab, int(rng.integers(3, 9))).tolist()
        noise = rng.integers(3, vocab, int(rng.integers(0, 40))).tolist()
        prompts.append(noise + span * int(rng.integers(2, 6)))
    return prompts


def assert_same(got: dict, want: dict, logprob_tol: float = 1e-3):
    assert set(got) == set(want)
    for request_id in want:
        for g, w in zip(got[request_id].outputs, want[request_id].outputs, strict=True):
            assert g.token_ids == w.token_ids, request_id
            assert g.text == w.text and g.finish_reason == w.finish_reason, request_id
            assert g.cumulative_logprob == pytest.approx(w.cumulative_logprob, abs=logprob_tol)
            if w.logprobs is not None:
                assert [sorted(e) for e in g.logprobs] == [sorted(e) for e in w.logprobs]


# ---- config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bad,field", [
    ({"method": "ngram"}, "num_speculative_tokens"),
    (spec(k=0), "num_speculative_tokens"),
    (spec(method="eagle"), "method"),
    (spec(prompt_lookup_min=5), "prompt_lookup_min"),
    (spec(disable_by_batch_size=0), "disable_by_batch_size"),
    (spec(lookahead=2), "lookahead"),
])
def test_bad_config_names_the_field(bad, field):
    with pytest.raises(ConfigError, match=field):
        EngineConfig(speculative_config=bad).validate()


@pytest.mark.parametrize("given,bounds", [
    ({"prompt_lookup_max": 1}, (1, 1)),  # the default min 2 would cross the given max
    ({"prompt_lookup_max": 3}, (2, 3)),
    ({"prompt_lookup_min": 6}, (6, 6)),  # the default max 4 would cross the given min
    ({"prompt_lookup_min": 3}, (3, 4)),
])
def test_one_lookup_bound_given_moves_the_other_default_only_where_they_cross(given, bounds):
    config = SpeculativeConfig.from_dict({"num_speculative_tokens": 3, **given})
    assert (config.prompt_lookup_min, config.prompt_lookup_max) == bounds


def test_config_from_dict():
    config = EngineConfig(speculative_config=spec(k=5))
    config.validate()
    assert config.speculative_config == SpeculativeConfig(num_speculative_tokens=5)


# ---- proposer -------------------------------------------------------------------------------

def brute_force(a: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        if n >= len(a):
            continue
        suffix = a[len(a) - n :]
        for end in range(len(a) - 2, n - 2, -1):  # the most recent earlier occurrence
            if a[end - n + 1 : end + 1] == suffix:
                return a[end + 1 : end + 1 + k]
    return []


def test_proposer_matches_brute_force():
    rng = np.random.default_rng(0)
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_max=4,
                                               prompt_lookup_min=2))
    num_proposed = 0
    for _ in range(2000):
        a = rng.integers(0, 4, int(rng.integers(1, 30))).tolist()
        got = proposer.propose_ids(np.array(a, np.int32))
        assert got == brute_force(a, 3, 2, 4), a
        num_proposed += bool(got)
    assert num_proposed > 800


def test_proposer_prefers_the_longest_then_most_recent_ngram():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_max=3,
                                               prompt_lookup_min=1))
    # "7 8" occurs twice (followed by 1 then 2); "6 7 8" once, followed by 3 4.
    a = [6, 7, 8, 3, 4, 7, 8, 1, 9, 7, 8, 2, 5, 6, 7, 8]
    assert proposer.propose_ids(np.array(a, np.int32)) == [3, 4]
    a[0] = 0  # now only "7 8" matches, and its most recent occurrence goes on with 2 5
    assert proposer.propose_ids(np.array(a, np.int32)) == [2, 5]
    assert proposer.propose_ids(np.array([1, 2, 3], np.int32)) == []


def test_proposer_history_grows_incrementally():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=3))
    seq = Sequence("r", [1, 2, 3, 4, 1, 2], 6, SamplingParams())
    assert proposer.propose([seq]) == [[3, 4, 1]]
    for t in [3, 9, 9, 5] * 40:  # past the first buffer
        seq.token_ids.append(t)
        assert proposer.propose([seq]) == [brute_force(seq.token_ids, 3, 2, 4)]
    proposer.propose([])
    assert not proposer._history  # sequences no longer passed are forgotten


def test_speculation_runs_only_while_one_to_disable_by_batch_size_sequences_run():
    from types import SimpleNamespace

    from engine.spec_decode import SpecDecoder

    decoder = SpecDecoder(SpeculativeConfig(num_speculative_tokens=2, disable_by_batch_size=2))
    got = [decoder.should_speculate(SimpleNamespace(num_running=n)) for n in range(4)]
    assert got == [False, True, True, False]


def test_only_plain_running_decodes_get_drafts():
    """Drafts go to running sequences with exactly one token to compute, no forks waiting on
    their prompt, and no beam search."""
    from engine.core.sequence import SequenceStatus
    from engine.spec_decode import SpecDecoder

    decoder = SpecDecoder(SpeculativeConfig(num_speculative_tokens=2, prompt_lookup_min=1,
                                            prompt_lookup_max=2))
    tokens = [5, 6, 7, 5, 6]  # "5 6" occurred before, followed by 7 5

    def seq(name, computed=4, status=SequenceStatus.RUNNING, **params):
        s = Sequence(name, list(tokens), 5, SamplingParams(**params))
        s.num_computed_tokens, s.status = computed, status
        return s

    plain = seq("plain")
    forked = seq("forked")
    forked.forks = [seq("child", computed=0, status=SequenceStatus.WAITING)]
    beam = seq("beam", use_beam_search=True, n=2)
    pending = seq("pending", computed=5)  # its last token is computed: one is pending
    prefill = seq("prefill", computed=3)
    waiting = seq("waiting", status=SequenceStatus.WAITING)
    assert decoder.propose([plain, forked, beam, pending, prefill, waiting]) == [plain]
    assert plain.spec_token_ids == [7, 5]
    assert all(s.spec_token_ids == [] for s in (forked, beam, pending, prefill, waiting))


def test_proposer_never_matches_more_than_prompt_lookup_max_tokens():
    """The longest n-gram is capped at prompt_lookup_max: a longer match further back does not
    beat the most recent one of max length."""
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=1, prompt_lookup_max=2,
                                               prompt_lookup_min=1))
    # "1 2" ends at 2 (then 3) and at 6 (then 4); "7 1 2" only at 2
    a = [7, 1, 2, 3, 5, 1, 2, 4, 7, 1, 2]
    assert proposer.propose_ids(np.array(a, np.int32)) == [4]


def test_proposer_rereads_a_history_that_got_shorter():
    proposer = NgramProposer(SpeculativeConfig(num_speculative_tokens=2))
    seq = Sequence("r", [1, 2, 3, 4, 1, 2], 6, SamplingParams())
    assert proposer.propose([seq]) == [[3, 4]]
    seq.token_ids = [5, 6, 8, 5, 6]  # replaced by fewer tokens: nothing stale may remain
    assert proposer.propose([seq]) == [[8, 5]]


# ---- block manager --------------------------------------------------------------------------

def test_truncate_frees_the_blocks_past_the_kept_tokens():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = Sequence("r", list(range(6)), 6, SamplingParams())
    bm.allocate(seq)
    seq.num_computed_tokens = 5
    table = seq.block_table
    bm.append(seq, 7)  # 12 tokens: 3 blocks
    seq.num_computed_tokens = 12
    seq.token_ids += [7, 8, 9, 10, 11, 12]
    bm.truncate(seq, 7)
    assert seq.block_table == table[:2] and seq.block_table is not table
    assert seq.num_computed_tokens == 7 and bm.num_free_blocks == 6
    bm.check_invariants([seq])
    with pytest.raises(ValueError, match="truncate"):
        bm.truncate(seq, 8)
    bm.mark_computed(seq)  # the first block is keyed now and may never be dropped
    with pytest.raises(RuntimeError, match="keyed"):
        bm.truncate(seq, 0)


# ---- engine: greedy and seeded outputs are those of plain decoding ---------------------------

def test_greedy_is_plain_decoding_with_chunked_prefill_and_preemption(make_engine):
    rng = np.random.default_rng(0)
    prompts = copy_heavy(rng, 20)
    prompts[0] = rng.integers(3, 512, 120).tolist()  # long: chunked
    requests = {f"r{i}": (ids(p), SamplingParams(temperature=0, ignore_eos=True,
                                                 max_tokens=int(rng.integers(8, 40))))
                for i, p in enumerate(prompts)}
    fields = dict(max_num_batched_tokens=48, num_kv_blocks=30, max_num_seqs=6, block_size=8,
                  max_model_len=200)
    want = drive(make_engine(**fields), requests)
    engine = make_engine(speculative_config=spec(k=4), **fields)
    got = drive(engine, requests)
    assert_same(got, want)
    s = engine.get_stats()
    assert s.num_preemptions > 0 and s.num_chunked_prefill_steps > 0
    assert 0 < s.spec_num_accepted_tokens < s.spec_num_draft_tokens
    assert sum(engine.core.spec.accepted_hist) == s.spec_num_drafts
    assert sum(engine.core.spec.accepted_hist[2:]) > 0


class OracleProposer:
    """Proposes what plain decoding will produce, with a wrong token here and there: every
    verdict (all drafts taken plus the bonus, a rejection at each position) happens often."""

    def __init__(self, want: dict, k: int, seed: int, key=lambda request_id: request_id,
                 wrong: float = 0.5):
        self.want, self.k, self.rng, self.key = want, k, np.random.default_rng(seed), key
        self.wrong = wrong  # how often a draft holds a wrong token

    def propose(self, seqs):
        drafts = []
        for seq in seqs:
            out = self.want[self.key(seq.request_id)].outputs[seq.index].token_ids
            draft = list(out[seq.num_output_tokens : seq.num_output_tokens + self.k])
            if draft and self.rng.random() < self.wrong:
                draft[self.rng.integers(len(draft))] ^= 1
            drafts.append(draft)
        return drafts


def test_every_verdict_with_an_oracle_proposer(make_engine):
    rng = np.random.default_rng(4)
    prompts = [rng.integers(3, 512, int(n)).tolist() for n in rng.integers(1, 60, 16)]
    requests = {f"r{i}": (ids(p), SamplingParams(temperature=0.0 if i % 2 else 0.9, seed=i,
                                                 max_tokens=int(rng.integers(5, 40)),
                                                 ignore_eos=True, n=1 + i % 3))
                for i, p in enumerate(prompts)}
    fields = dict(max_num_batched_tokens=40, num_kv_blocks=32, max_num_seqs=8, block_size=4,
                  max_model_len=120)
    want = drive(make_engine(**fields), requests)
    engine = make_engine(speculative_config=spec(k=5), **fields)
    engine.core.spec.proposer = OracleProposer(want, 5, seed=0)
    assert_same(drive(engine, requests), want)
    hist = engine.core.spec.accepted_hist
    assert all(hist), hist  # each number of accepted drafts, 0 to 5, happened
    assert engine.get_stats().num_preemptions > 0


def test_seeded_sampling_with_every_setting_is_plain_decoding(make_engine):
    """Row j of a verifying sequence draws at the seed step and with the history plain decoding
    would have: penalties, logit_bias, min_tokens, logprobs, n > 1 and stop ids see the same."""
    rng = np.random.default_rng(1)
    settings = [
        dict(temperature=0.8),
        dict(temperature=1.0, top_k=5, top_p=0.9, presence_penalty=0.5),
        dict(temperature=0.7, repetition_penalty=1.3, frequency_penalty=0.2, logprobs=3),
        dict(temperature=0.9, min_tokens=10, logit_bias={7: 5.0}, stop_token_ids=[11, 12]),
        dict(temperature=0, n=3, max_tokens=12),
        dict(temperature=1.2, n=2, min_p=0.05),
    ]
    requests = {}
    for i, p in enumerate(copy_heavy(rng, 12)):
        kw = {"max_tokens": 30, "seed": i, **settings[i % len(settings)]}
        requests[f"r{i}"] = (ids(p), SamplingParams(**kw))
    want = drive(make_engine(), requests)
    engine = make_engine(speculative_config=spec(k=3, disable_by_batch_size=64))
    assert_same(drive(engine, requests), want)
    assert engine.get_stats().spec_num_accepted_tokens > 0


def test_overlapped_loop_and_batch_size_switch(make_engine):
    """With async scheduling the steps that verify drafts run synchronously and the others
    overlap; while more than disable_by_batch_size sequences run, nothing is proposed."""
    rng = np.random.default_rng(2)
    requests = {f"r{i}": (ids(p), SamplingParams(temperature=0, max_tokens=6 + 5 * i,
                                                 ignore_eos=True))
                for i, p in enumerate(copy_heavy(rng, 8))}
    want = drive(make_engine(), requests)
    engine = make_engine(async_scheduling=True, speculative_config=spec(disable_by_batch_size=4))
    engine.core.spec.proposer = OracleProposer(want, 3, seed=1)
    seen = []
    prepare = engine.runner.prepare_inputs

    def spy(batch):
        inputs = prepare(batch)
        seen.append((len(batch.seqs), inputs.num_placeholders, batch.num_spec_tokens))
        return inputs

    engine.runner.prepare_inputs = spy
    assert_same(drive(engine, requests), want)
    assert any(p for _, p, _ in seen) and any(k for _, _, k in seen)
    for num_seqs, placeholders, num_spec in seen:
        assert not (placeholders and num_spec)
        assert num_seqs <= 4 or not num_spec


def test_max_tokens_and_max_model_len_bound_the_drafts(make_engine):
    rng = np.random.default_rng(3)
    prompts = copy_heavy(rng, 6)
    requests = {f"r{i}": (ids(p), SamplingParams(temperature=0, max_tokens=1 + i % 4 * 3,
                                                 ignore_eos=True))
                for i, p in enumerate(prompts)}
    long = max(len(p) for p in prompts)
    fields = dict(max_model_len=long + 5)
    want = drive(make_engine(**fields), requests)
    got = drive(make_engine(speculative_config=spec(k=6), **fields), requests)
    assert_same(got, want)
    for out in got.values():
        assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) <= long + 5


def test_stop_strings_see_exactly_the_accepted_tokens(make_engine):
    """Text model (real tokenizer): several tokens per step reach the output processor, which
    cuts at the stop string and drops the rest."""
    make = lambda **f: make_engine(text=True, **f)  # noqa: E731
    engine = make()
    prompts = ["the cat sat on the mat. the cat sat on the mat. the cat",
               "def f(x): return x + 1\ndef f(x): return x + 1\ndef"]
    first = drive(engine, {str(i): (p, SamplingParams(temperature=0, max_tokens=30,
                                                       ignore_eos=True))
                           for i, p in enumerate(prompts)})
    requests = {}
    for i, p in enumerate(prompts):
        text = first[str(i)].outputs[0].text
        stop = text[len(text) // 2 : len(text) // 2 + 3] or "zz"
        requests[str(i)] = (p, SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                              ignore_eos=True))
        requests[f"{i}i"] = (p, SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                               include_stop_str_in_output=True,
                                               ignore_eos=True))
    want = drive(make(), requests)
    engine = make(speculative_config=spec(k=5))
    # Drafts from the run without stop strings: they run past the stop string.
    engine.core.spec.proposer = OracleProposer(first, 5, seed=2, key=lambda r: r.rstrip("i"))
    assert_same(drive(engine, requests), want)
    assert engine.get_stats().spec_num_accepted_tokens > 0


def test_a_stop_id_inside_the_verified_tokens_keeps_only_their_logprobs(make_engine):
    """Drafts are cut for max_tokens but never for stop ids: a stop id ends the sequence among
    a step's verified tokens, and the output's token_logprobs (which the output processor takes
    off the cumulative logprob past a stop string) must be those of the tokens kept."""
    rng = np.random.default_rng(5)
    prompts = {f"r{i}": rng.integers(3, 512, 12).tolist() for i in range(4)}
    plain = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    first = drive(make_engine(), {r: (ids(p), plain) for r, p in prompts.items()})
    requests = {}
    for r, p in prompts.items():
        out = first[r].outputs[0].token_ids
        # a token first seen in the middle of the run: the sequence ends there
        t = next(t for t in range(8, len(out)) if out[t] not in out[:t])
        requests[r] = (ids(p), SamplingParams(temperature=0, max_tokens=24, ignore_eos=True,
                                              stop_token_ids=[out[t]], logprobs=0))
    want = drive(make_engine(), requests)
    engine = make_engine(speculative_config=spec(k=5))
    engine.core.spec.proposer = OracleProposer(first, 5, seed=0, wrong=0)
    seen, get_output = [], engine.client.get_output
    engine.client.get_output = lambda: seen.append(o := get_output()) or o
    assert_same(drive(engine, requests), want)
    ended = [o for step in seen for o in step.outputs if o.finish_reason == "stop"]
    assert len(ended) == 4 and any(len(o.new_token_ids) > 1 for o in ended)  # inside a step
    for o in ended:
        assert len(o.token_logprobs) == len(o.new_token_ids)


# ---- sampling: the target distribution is kept -----------------------------------------------

def chi_square_two_samples(a: np.ndarray, b: np.ndarray) -> tuple[float, int]:
    """Statistic and degrees of freedom for "two equal-sized samples share one distribution",
    rare categories pooled so that every cell expects >= 5."""
    values = np.union1d(a, b)
    ca = np.array([(a == v).sum() for v in values])
    cb = np.array([(b == v).sum() for v in values])
    rare = (ca + cb) < 10
    if rare.any():
        ca = np.append(ca[~rare], ca[rare].sum())
        cb = np.append(cb[~rare], cb[rare].sum())
    keep = (ca + cb) > 0
    ca, cb = ca[keep], cb[keep]
    return float((((ca - cb) ** 2) / (ca + cb)).sum()), len(ca) - 1


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square(df) (Wilson-Hilferty)."""
    h = 2 / (9 * df)
    return df * (1 - h + z * h**0.5) ** 3


def test_sampled_frequencies_match_plain_decoding():
    """Vocab 16, unseeded requests, engines with different seeds: the tokens drawn where drafts
    were verified follow the distribution plain decoding draws from."""
    from conftest import _tiny_loaded

    from engine.engine import LLMEngine

    loaded = _tiny_loaded(16, False)
    prompt = ids([3, 4, 5, 6, 7] * 4)
    params = SamplingParams(temperature=0.7, max_tokens=6, ignore_eos=True, n=8)

    def draws(seed, speculative_config=None):
        engine = LLMEngine(EngineConfig(device="numpy", seed=seed, max_num_seqs=8,
                                        speculative_config=speculative_config),
                           loaded_model=loaded)
        final = drive(engine, {f"r{i}": (prompt, params) for i in range(60)})
        tokens = np.array([o.token_ids for out in final.values() for o in out.outputs])
        return tokens, engine.get_stats()  # (480, 6)

    plain, _ = draws(1)
    speculated, stats = draws(2, spec(k=3, prompt_lookup_min=1))
    assert stats.spec_num_draft_tokens > 300
    assert 0.1 < stats.spec_num_accepted_tokens / stats.spec_num_draft_tokens < 0.9
    for position in (2, 5):
        statistic, df = chi_square_two_samples(plain[:, position], speculated[:, position])
        assert df >= 3
        assert statistic < chi_square_critical(df), (position, statistic, df)
    # The test can fail: two positions of plain decoding draw from different distributions.
    statistic, df = chi_square_two_samples(plain[:, 1], plain[:, 5])
    assert statistic > chi_square_critical(df)


# ---- the flag and the metrics -----------------------------------------------------------------

def test_cli_flag_and_metrics(capsys):
    from server.cli import build_parser, engine_config_from_args
    from server.metrics import ServerMetrics

    parser = build_parser()
    args = parser.parse_args(["serve", "--speculative-config",
                              '{"method": "ngram", "num_speculative_tokens": 4}'])
    config = engine_config_from_args(args)
    assert config.speculative_config == SpeculativeConfig(num_speculative_tokens=4)
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--speculative-config", "[4]"])
    assert "expected a JSON object" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="prompt_lookup_max"):
        engine_config_from_args(parser.parse_args(
            ["serve", "--speculative-config", '{"num_speculative_tokens": 2, '
             '"prompt_lookup_max": 0}']))

    from engine.core.outputs import EngineStats

    metrics = ServerMetrics()
    metrics.on_step(1, EngineStats(1, 0, 2, 10, 0, 0, 0, 5, 7, 3, 0, 0, spec_num_drafts=4,
                                   spec_num_draft_tokens=12, spec_num_accepted_tokens=6))
    text = metrics.render().decode()
    assert "pagedserve_spec_decode_num_draft_tokens_total 12.0" in text
    assert "pagedserve_spec_decode_num_accepted_tokens_total 6.0" in text
    assert "pagedserve_spec_decode_acceptance_rate 0.5" in text
    assert "pagedserve_spec_decode_mean_accepted_length 2.5" in text


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_request_that_ends_beside_drafts_reaches_the_prefix_cache(make_engine,
                                                                    async_scheduling):
    """A prompt that finishes (max_tokens 1) in a step where another sequence verifies drafts
    keys its blocks as in a plain step: the same prompt later finds them cached."""
    engine = make_engine(speculative_config=spec(k=3, prompt_lookup_min=1),
                         async_scheduling=async_scheduling, max_model_len=512,
                         num_kv_blocks=200)
    engine.add_request("drafter", ids(list(range(10, 40)) * 4),
                       SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(3):
        engine.step()
    prompt = ids(range(100, 164))  # 4 blocks of 16
    one = SamplingParams(temperature=0, max_tokens=1)
    engine.add_request("first", prompt, one)
    while not any(o.finished and o.request_id == "first" for o in engine.step()):
        pass
    engine.add_request("again", prompt, one)
    outs = step_to_end(engine)
    assert engine.get_stats().spec_num_drafts > 0  # the premise: the other one drafted
    assert outs["again"].num_cached_tokens == 48  # its last block holds the token computed anew


class _Oracle:
    """Proposes what plain decoding produced: every draft is accepted."""

    def __init__(self, want, k):
        self.want, self.k = want, k

    def propose(self, seqs):
        return [list(self.want[s.request_id].outputs[s.index].token_ids
                     [s.num_output_tokens : s.num_output_tokens + self.k]) for s in seqs]


def _follow_up_cached_tokens(make_engine, speculative_config, want=None):
    engine = make_engine(block_size=4, speculative_config=speculative_config)
    if want is not None:
        engine.core.spec.proposer = _Oracle(want, 4)
    prompt = list(range(10, 22))  # 3 full blocks
    engine.add_request("a", {"prompt_token_ids": prompt},
                       SamplingParams(temperature=0, max_tokens=9, ignore_eos=True))
    first = step_to_end(engine)
    output = list(first["a"].outputs[0].token_ids)
    # a follow-up turn: the prompt and what it generated, then more (multi-turn chat)
    engine.add_request("b", {"prompt_token_ids": prompt + output + [5]},
                       SamplingParams(temperature=0, max_tokens=1))
    return first, step_to_end(engine)["b"].num_cached_tokens


def test_a_drafting_sequence_that_ends_in_its_verify_step_keys_its_blocks(make_engine):
    """A plain step keys the blocks a finishing sequence filled before it frees them, so a
    follow-up prompt finds 20 of its 21 tokens cached. A sequence that ended in a step verifying
    drafts was freed before the commit after verification, which passed over it: 16."""
    want, plain = _follow_up_cached_tokens(make_engine, None)
    got, speculated = _follow_up_cached_tokens(
        make_engine, {"method": "ngram", "num_speculative_tokens": 4}, want)
    assert got["a"].outputs[0].token_ids == want["a"].outputs[0].token_ids
    assert plain == 20 and speculated == plain


def test_drafts_never_take_the_block_a_later_decode_needs():
    """One free block; the older decode's drafts would need it, the newer decode's own token
    does too. The drafts go (the drafting decode runs without them), nobody is preempted: the
    drafts took the block and the newer decode was preempted for tokens that may all be
    rejected."""
    from engine.core.scheduler import Scheduler

    bm = BlockManager(num_blocks=5, block_size=4)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64)
    a = Sequence("a", list(range(10, 17)), 7, SamplingParams(max_tokens=10))  # 2 blocks
    b = Sequence("b", list(range(20, 28)), 8, SamplingParams(max_tokens=10))  # 2 blocks
    sched.add(a)
    sched.add(b)
    sched.finish_step(sched.schedule())
    a.token_ids.append(1)  # 8 tokens: its next token's slot is in its 2nd block
    b.token_ids.append(2)  # 9 tokens: its next token needs a 3rd block, the last free one
    assert bm.num_free_blocks == 1
    a.spec_token_ids = [3, 4, 5]  # would need a 3rd block too
    batch = sched.schedule()
    assert batch.num_preempted == 0 and a.spec_token_ids == []
    assert [(q.request_id, n) for q, n in zip(batch.seqs, batch.num_new_tokens,
                                              strict=True)] == [("a", 1), ("b", 1)]
    bm.check_invariants(sched.running)


def test_a_draft_row_whose_sampling_fails_fails_its_request_alone(make_engine):
    """The batch's sampling raises; each row is then sampled alone and a failing one fails its
    request. A draft row's failure was logged by its request_id, which DraftRow lacked: the
    AttributeError failed every request of the step."""
    requests = {f"r{i}": (ids(range(3 + i, 30 + i)),
                          SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
                for i in range(3)}
    want = drive(make_engine(), requests)
    engine = make_engine(speculative_config=spec(k=3))
    engine.core.spec.proposer = _Oracle(want, 3)
    bad = requests["r1"][1]
    prepare = engine.runner.prepare_sampling

    def flaky(rows):
        if any(row.sampling_params is bad and row.num_computed_tokens > 27 for row in rows):
            raise FloatingPointError("r1's settings")  # past its first token: a verify step
        return prepare(rows)

    engine.runner.prepare_sampling = flaky
    got = drive(engine, requests)
    out = got["r1"].outputs[0]
    assert out.finish_reason == "error" and "FloatingPointError: r1's settings" in out.error
    for request_id in ("r0", "r2"):
        assert got[request_id].outputs[0].token_ids == want[request_id].outputs[0].token_ids
        assert got[request_id].outputs[0].finish_reason == "length"
    assert engine.get_stats().spec_num_drafts > 0
