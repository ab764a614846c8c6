"""N-gram speculative decoding: acceptance on a copy-heavy workload, and batch-1 decode speed.

acceptance (the default): the chat prompts of tools/spec_workload.py (rename in code, quote from a
    passage, re-format JSON), one at a time (batch 1), greedy, without and then with speculation;
    checks that both give the same tokens and prints the acceptance rate, the mean accepted length
    (tokens per verifying step, bonus included), the histogram of accepted drafts per step, per
    kind and overall, and both runs' tokens/s. --save-profile FILE keeps the histogram.
replay (--replay FILE, or --accepted-hist N0,N1,..,Nk): one request at batch 1 on any model, e.g.
    Llama-3-8B shapes with dummy weights on the H200, without and with speculation. Random weights
    write no text worth copying, so every step proposes k drafts and the number accepted is drawn
    from the measured histogram (the verifier is handed sampled tokens that agree with exactly that
    many drafts): the k + 1 verify rows, the rollback and the synchronous step are all real, the
    acceptance is replayed. The output says so. --batch-sizes 1,2,4,.. replays B requests at once
    for each B (decode tok/s without and with speculation) and suggests disable_by_batch_size:
    the largest B up to which speculation gains at least MIN_GAIN at every measured size.

Usage:
    python tools/bench_spec.py --device cpu --save-profile tools/results/spec_profile.json
    python tools/bench_spec.py --model llama3-8b --load-format dummy --device cuda \
        --replay tools/results/spec_profile.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the checkout importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools.bench_throughput import add_device_flags, engine_errors_in_one_line  # noqa: E402
from tools.spec_workload import spec_conversations  # noqa: E402
from tools.workloads import count_arg, count_list_arg, nonnegative_arg  # noqa: E402


def spec_summary(hist: list[int], no_draft_steps: int = 0,
                 draft_tokens: int | None = None) -> dict:
    """Acceptance figures of a histogram: hist[i] = verifying steps that accepted i drafts;
    no_draft_steps: decode steps whose sequence found no n-gram (one token each); draft_tokens:
    the tokens those steps drafted (None: k each, as a replay drafts; the n-gram proposer drafts
    fewer where its match runs into the end of the sequence or max_tokens)."""
    k, steps = len(hist) - 1, sum(hist)
    accepted = sum(i * n for i, n in enumerate(hist))
    decode_steps = steps + no_draft_steps
    drafted = k * steps if draft_tokens is None else draft_tokens
    return {"k": k, "verify_steps": steps, "no_draft_steps": no_draft_steps,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "mean_accepted_length": 1 + accepted / steps if steps else 1.0,
            # what batch-1 decode can gain at most: one forward per this many tokens
            "tokens_per_decode_step": (decode_steps + accepted) / decode_steps
            if decode_steps else 1.0,
            "hist": list(hist)}


def _checked_hist(hist) -> list[int]:
    """`hist` if it is an acceptance histogram a replay can draw from: N0,N1,..,Nk (k >= 1) of
    counts >= 0, not all 0."""
    if (not isinstance(hist, list) or len(hist) < 2
            or not all(isinstance(n, int) and n >= 0 for n in hist) or not sum(hist)):
        raise argparse.ArgumentTypeError(
            f"expected N0,N1,..,Nk: at least 2 counts >= 0, not all 0, got {hist}")
    return hist


def hist_arg(text: str) -> list[int]:
    """argparse type of --accepted-hist: N0,N1,..,Nk inline."""
    try:
        hist = [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers N0,N1,..,Nk, got {text!r}") from None
    return _checked_hist(hist)


def spec_profile_arg(text: str) -> tuple[list[int], int]:
    """argparse type of a --save-profile file (--replay, profile_step's --spec-profile): its
    overall histogram and no-draft steps, or one line naming the file and what is wrong with it."""
    try:
        overall = json.loads(Path(text).read_text())["overall"]
        hist, no_draft_steps = overall["hist"], overall["no_draft_steps"]
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e.strerror or e}") from None
    except ValueError as e:  # json.JSONDecodeError, or bytes that are not text
        raise argparse.ArgumentTypeError(f"{text}: not JSON ({e})") from None
    except (KeyError, TypeError) as e:
        raise argparse.ArgumentTypeError(
            f"{text}: not a --save-profile file (no overall {e})") from None
    try:
        _checked_hist(hist)
        if not isinstance(no_draft_steps, int) or no_draft_steps < 0:
            raise argparse.ArgumentTypeError(
                f"no_draft_steps must be an integer >= 0, got {no_draft_steps!r}")
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{text}: overall: {e}") from None
    return hist, no_draft_steps


# Speculation must gain at least this much at a batch size for the sweep to keep it on there.
MIN_GAIN = 1.05


def _decode(engine, request_id: str, prompt_ids: list[int], max_tokens: int) -> tuple[list, float]:
    """Greedy tokens of one request alone, and the seconds from its first token to its last."""
    tokens, seconds = _decode_batch(engine, request_id, [prompt_ids], max_tokens)
    return tokens[0], seconds


def _decode_batch(engine, tag: str, prompts: list[list[int]], max_tokens: int,
                  ignore_eos: bool = False) -> tuple[list[list], float]:
    """Greedy tokens of requests run together, and the seconds from the first token to the last."""
    from engine import SamplingParams

    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": p},
                           SamplingParams(temperature=0, max_tokens=max_tokens,
                                          ignore_eos=ignore_eos))
    tokens, first = {f"{tag}-{i}": [] for i in range(len(prompts))}, None
    while engine.has_unfinished_requests():
        for out in engine.step():
            new = out.outputs[0].delta_token_ids
            if new and first is None:
                first = time.perf_counter()
            tokens[out.request_id] += new
    return list(tokens.values()), time.perf_counter() - first


def acceptance(args, llm) -> dict:
    engine, core = llm.engine, llm.engine.core
    spec, kinds, rows, no_draft, drafted = core.spec, {}, [], {}, {}
    tokenizer = engine.tokenizer
    plain_s = spec_s = num_tokens = 0
    for i, (kind, messages) in enumerate(spec_conversations()[: args.limit]):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        core.spec = None
        want, t_plain = _decode(engine, f"plain-{i}", ids, args.max_tokens)
        core.spec = spec
        before, steps_before = list(spec.accepted_hist), core.scheduler.num_steps
        drafted_before = spec.num_draft_tokens
        got, t_spec = _decode(engine, f"spec-{i}", ids, args.max_tokens)
        decode_steps = core.scheduler.num_steps - steps_before - 1  # the prefill step: 1
        if got != want:
            raise AssertionError(f"prompt {i} ({kind}): speculation changed the greedy output")
        hist = [a - b for a, b in zip(spec.accepted_hist, before, strict=True)]
        kh = kinds.setdefault(kind, [0] * len(hist))
        kinds[kind] = [a + b for a, b in zip(kh, hist, strict=True)]
        no_draft[kind] = no_draft.get(kind, 0) + decode_steps - sum(hist)
        own_drafts = spec.num_draft_tokens - drafted_before
        drafted[kind] = drafted.get(kind, 0) + own_drafts
        plain_s, spec_s, num_tokens = plain_s + t_plain, spec_s + t_spec, num_tokens + len(got)
        rows.append({"kind": kind, "tokens": len(got),
                     **spec_summary(hist, decode_steps - sum(hist), own_drafts),
                     "text": tokenizer.decode(got)[:60]})
    total = [sum(c) for c in zip(*kinds.values(), strict=True)]
    return {"mode": "acceptance", "model": args.model or "default (SmolLM2-135M-Instruct)",
            "device": engine.ops.name, "max_tokens": args.max_tokens,
            "overall": spec_summary(total, sum(no_draft.values()), sum(drafted.values())),
            "by_kind": {k: spec_summary(h, no_draft[k], drafted[k]) for k, h in kinds.items()},
            "prompts": rows,
            "plain_tok_s": num_tokens / plain_s, "spec_tok_s": num_tokens / spec_s}


class _ReplayProposer:
    """Replay's proposer: k drafts (their values do not matter, only their count), or none as
    often as the measured run found no n-gram."""

    def __init__(self, k: int, p_none: float, rng):
        self.k, self.p_none, self.rng = k, p_none, rng

    def propose(self, seqs):
        k = self.k
        return [[] if self.rng.random() < self.p_none else (s.token_ids[-k:] * k)[:k]
                for s in seqs]


def install_replay(spec, hist: list[int], no_draft_steps: int, vocab_size: int,
                   seed: int = 0) -> None:
    """Make `spec` (engine.spec_decode.SpecDecoder) propose k drafts per step (none as often as
    no_draft_steps says) and accept as many as a draw from `hist` says."""
    rng = np.random.default_rng(seed)
    p = np.asarray(hist, float) / sum(hist)
    spec.proposer = _ReplayProposer(len(hist) - 1, no_draft_steps / (no_draft_steps + sum(hist)),
                                    rng)
    verify = spec.verify

    def replayed(seq, tokens: list[int], first: int) -> int:
        draft = seq.spec_token_ids
        a = min(int(rng.choice(len(p), p=p)), len(draft))
        tokens[first : first + a] = draft[:a]
        if a < len(draft) and tokens[first + a] == draft[a]:
            tokens[first + a] = (draft[a] + 1) % vocab_size
        return verify(seq, tokens, first)

    spec.verify = replayed


def replay(args, llm, hist: list[int], no_draft_steps: int) -> dict:
    engine, core = llm.engine, llm.engine.core
    mc = engine.model_config
    prompt = [(31 * i + 7) % mc.vocab_size for i in range(args.prompt_len)]
    _decode(engine, "warmup", prompt[:16], 8)
    spec, core.spec = core.spec, None
    want, t_plain = _decode(engine, "plain", prompt, args.output_len)
    core.spec = spec
    install_replay(spec, hist, no_draft_steps, mc.vocab_size, args.seed)
    _decode(engine, "warmup-spec", prompt[:16], 8)
    before, steps_before = list(spec.accepted_hist), core.scheduler.num_steps
    got, t_spec = _decode(engine, "spec", prompt, args.output_len)
    done = [a - b for a, b in zip(spec.accepted_hist, before, strict=True)]
    no_draft_done = core.scheduler.num_steps - steps_before - 1 - sum(done)
    plain_tpot, spec_tpot = t_plain / (len(want) - 1), t_spec / (len(got) - 1)
    return {"mode": "replay", "note": "acceptance replayed from the measured histogram (dummy "
            "weights produce no copyable text); verify rows, rollback and sync steps are real",
            "model": args.model, "device": engine.ops.name, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "replayed": spec_summary(hist, no_draft_steps),
            "achieved": spec_summary(done, no_draft_done), "plain_tpot_ms": plain_tpot * 1e3,
            "spec_tpot_ms": spec_tpot * 1e3, "speedup": plain_tpot / spec_tpot}


def batch_sweep(args, llm, sizes: list[int]) -> dict:
    """Decode tok/s of B requests at once, without and with speculation (replayed acceptance,
    install_replay done), for each B; and the disable_by_batch_size it suggests."""
    engine, core = llm.engine, llm.engine.core
    vocab = engine.model_config.vocab_size
    spec, rows = core.spec, []
    for b in sizes:
        prompts = [[(31 * i + 7 + 101 * j) % vocab for i in range(args.prompt_len)]
                   for j in range(b)]
        speeds = {}
        for name, s in (("plain", None), ("spec", spec)):
            core.spec = s
            toks, seconds = _decode_batch(engine, f"{name}-{b}", prompts, args.output_len,
                                          ignore_eos=True)
            speeds[name] = (sum(len(t) for t in toks) - b) / seconds  # tokens after the first
        rows.append({"batch": b, "plain_tok_s": speeds["plain"], "spec_tok_s": speeds["spec"],
                     "speedup": speeds["spec"] / speeds["plain"]})
    core.spec = spec
    suggested = 0
    for row in rows:
        if row["speedup"] < MIN_GAIN:
            break
        suggested = row["batch"]
    return {"by_batch": rows, "min_gain": MIN_GAIN,
            "suggested_disable_by_batch_size": suggested}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    ap.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                    help="dummy: random weights of the model's shapes (replay needs no "
                         "checkpoint); auto: the model's own weights")
    add_device_flags(ap)
    ap.add_argument("--num-speculative-tokens", type=count_arg, default=4,
                    help="acceptance: drafts proposed per step, k (replay: the histogram's)")
    ap.add_argument("--prompt-lookup-max", type=count_arg, default=4,
                    help="longest suffix (tokens) the n-gram proposer looks up (default 4)")
    ap.add_argument("--prompt-lookup-min", type=count_arg, default=2,
                    help="shortest suffix it looks up, <= --prompt-lookup-max (default 2)")
    ap.add_argument("--max-tokens", type=count_arg, default=200, help="acceptance: per prompt")
    ap.add_argument("--limit", type=count_arg, default=None,
                    help="acceptance: the first N prompts")
    ap.add_argument("--save-profile", default=None, help="acceptance: write the histogram here")
    ap.add_argument("--replay", type=spec_profile_arg, default=None,
                    help="replay: a --save-profile file")
    ap.add_argument("--accepted-hist", type=hist_arg, default=None,
                    help="replay: N0,N1,..,Nk inline")
    ap.add_argument("--no-draft-steps", type=nonnegative_arg, default=None,
                    help="replay with --accepted-hist: decode steps that found no n-gram, drawn "
                         "as often against the histogram's (default 0; --replay takes the "
                         "file's)")
    ap.add_argument("--prompt-len", type=count_arg, default=128, help="replay")
    ap.add_argument("--output-len", type=count_arg, default=256, help="replay")
    ap.add_argument("--batch-sizes", type=count_list_arg, default=None,
                    help="replay: also sweep these batch sizes, e.g. 1,2,4,8,16,32")
    ap.add_argument("--max-model-len", type=count_arg, default=None,
                    help="prompt + output tokens a sequence may hold (default: the model's)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the engine and of the replay")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.prompt_lookup_min > args.prompt_lookup_max:
        ap.error(f"argument --prompt-lookup-min: must be <= --prompt-lookup-max "
                 f"({args.prompt_lookup_max}), got {args.prompt_lookup_min}")
    if args.replay and args.accepted_hist:
        ap.error("argument --accepted-hist: not allowed with --replay")
    if args.no_draft_steps is not None and not args.accepted_hist:
        ap.error("argument --no-draft-steps: only with --accepted-hist"
                 + (" (--replay takes the file's no-draft steps)" if args.replay else ""))
    if args.batch_sizes and not (args.replay or args.accepted_hist):
        ap.error("argument --batch-sizes: only with --replay or --accepted-hist")

    hist, no_draft_steps = None, 0
    if args.replay:
        hist, no_draft_steps = args.replay
    elif args.accepted_hist:
        hist = args.accepted_hist
        no_draft_steps = args.no_draft_steps or 0
    k = len(hist) - 1 if hist else args.num_speculative_tokens
    sizes = args.batch_sizes or []
    from engine import LLM

    # Speculation stays on at every batch size measured here.
    max_seqs = max([8, *sizes])
    spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max":
            args.prompt_lookup_max, "prompt_lookup_min": args.prompt_lookup_min,
            "disable_by_batch_size": max_seqs}
    with engine_errors_in_one_line(args):  # an unknown model, no GPU: one line, not a traceback
        llm = LLM(model=args.model, device=args.device, dtype=args.dtype,
                  load_format=args.load_format, max_model_len=args.max_model_len,
                  max_num_seqs=max_seqs, seed=args.seed, speculative_config=spec)
    with llm:
        result = replay(args, llm, hist, no_draft_steps) if hist else acceptance(args, llm)
        if sizes:
            result |= batch_sweep(args, llm, sizes)
    if args.save_profile and not hist:
        Path(args.save_profile).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)
    return result


def _print(r: dict) -> None:
    def line(name, s):
        return (f"{name:<8} acceptance {s['acceptance_rate']:.1%}  mean accepted length "
                f"{s['mean_accepted_length']:.2f}  tokens per decode step "
                f"{s['tokens_per_decode_step']:.2f}  ({s['verify_steps']} verify steps, "
                f"{s['no_draft_steps']} without a draft; k={s['k']}, accepted drafts per verify "
                f"step {s['hist']})")

    print(f"{r['model']} on {r['device']}")
    if r["mode"] == "acceptance":
        for kind, s in r["by_kind"].items():
            print(line(kind, s))
        print(line("overall", r["overall"]))
        print(f"batch 1, greedy, same tokens with and without speculation: "
              f"{r['plain_tok_s']:.1f} -> {r['spec_tok_s']:.1f} tok/s")
    else:
        print(f"NOTE: {r['note']}")
        print(line("replayed", r["replayed"]))
        print(line("achieved", r["achieved"]))
        print(f"batch 1, prompt {r['prompt_len']}, {r['output_len']} tokens: TPOT "
              f"{r['plain_tpot_ms']:.2f} -> {r['spec_tpot_ms']:.2f} ms ({r['speedup']:.2f}x)")
        for row in r.get("by_batch", []):
            print(f"batch {row['batch']:3d}: decode {row['plain_tok_s']:8.1f} -> "
                  f"{row['spec_tok_s']:8.1f} tok/s ({row['speedup']:.2f}x)")
        if "by_batch" in r:
            print(f"suggested disable_by_batch_size (speculation gains >= {r['min_gain']:.2f}x "
                  f"up to it): {r['suggested_disable_by_batch_size']}")


if __name__ == "__main__":
    main()
