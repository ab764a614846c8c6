"""Summarise the JSON lines of tools/h200_bench.sh as the Markdown table README's Performance shows.

Usage: python tools/bench_table.py bench-out/bench.jsonl
"""

from __future__ import annotations

import json
import sys


def rows(records: list[dict]) -> list[str]:
    out = ["| benchmark | figure | roofline / floor | notes |", "|---|---|---|---|"]
    for rec in records:
        name, r = rec["bench"], rec.get("result")
        if r is None:
            out.append(f"| {name} | — | — | {rec.get('error', 'no result')} |")
        elif name.startswith("structured"):
            u, c = r["unconstrained"], r["structured"]
            bounded = r.get("structured_bounded")
            out.append(
                f"| {name} | JSON schema {c['output_tok_s']:,.0f} vs unconstrained "
                f"{u['output_tok_s']:,.0f} output tok/s = {r['structured_over_unconstrained']:.0%} "
                + ("" if bounded is None else
                   f"; maxLength strings {bounded['output_tok_s']:,.0f} = "
                   f"{r['bounded_over_unconstrained']:.0%} ")
                + f"| — | {c['num_steps']} steps, {_busy(c)} vs {_busy(u)} |")
        elif name.startswith("w1") and "http" not in name:
            out.append(
                f"| {name} | {r['output_tok_s']:,.0f} output tok/s ({r['wall_s']:.1f} s) | "
                f"{r['roofline_output_tok_s']:,.0f} tok/s ({r['fraction_of_roofline']:.0%}) | "
                f"{r['sampling']}, {r['num_steps']} steps, {r['num_preemptions']} preemptions, "
                f"{_busy(r)}{_spec(r)} |")
        elif name.startswith("latency"):
            out.append(
                f"| {name} | batch-1 TPOT {r['tpot_s'] * 1e3:.2f} ms, TTFT "
                f"{r['ttft_s'] * 1e3:.1f} ms | weights read {r['tpot_floor_s'] * 1e3:.2f} ms "
                f"({r['tpot_over_floor']:.2f}x) | cold start {r['cold_start_s']:.1f} s |")
        elif name.startswith("spec"):
            sweep = "".join(f"; batch {b['batch']} {b['speedup']:.2f}x"
                            for b in r.get("by_batch", []))
            if sweep:
                sweep += (f"; suggested disable_by_batch_size "
                          f"{r['suggested_disable_by_batch_size']}")
            out.append(
                f"| {name} | batch-1 TPOT {r['plain_tpot_ms']:.2f} -> {r['spec_tpot_ms']:.2f} ms "
                f"= {r['speedup']:.2f}x | — | replayed mean accepted length "
                f"{r['achieved']['mean_accepted_length']:.2f} (k={r['achieved']['k']}){sweep} |")
        elif name.startswith("seed"):
            s, p = r["static"], r["paged"]
            out.append(
                f"| {name} | continuous+paged {p['output_tok_s']:,.0f} vs static "
                f"(B={r['static_batch_size']}) {s['output_tok_s']:,.0f} tok/s = "
                f"{p['output_tok_s'] / s['output_tok_s']:.2f}x | — | KV waste paged "
                f"{p['kv_waste_pct']:.1f}% vs contiguous {s['kv_waste_pct']:.1f}%; busy "
                f"{p['busy_fraction']:.0%} vs {s['busy_fraction']:.0%} |")
        elif "dashboard_over_closed" in r:
            out.append(
                f"| {name} | dashboard open {r['dashboard_output_tok_s']:,.0f} vs closed "
                f"{r['closed_output_tok_s']:,.0f} output tok/s = {r['dashboard_over_closed']:.1%} "
                f"| — | {r['passes']} passes of each; {r['dashboard_clients']} SSE clients read "
                f"{r['dashboard_snapshots']} snapshots |")
        elif name.startswith(("w2", "w1-http")):
            t, p, i = r["ttft_ms"], r["tpot_ms"], r["itl_ms"]
            out.append(
                f"| {name} | {r['output_tok_s']:,.0f} output tok/s, {r['request_throughput']:.2f} "
                f"req/s | — | TTFT mean/p50/p99 {t['mean']:.0f}/{t['median']:.0f}/{t['p99']:.0f} "
                f"ms; TPOT {p['mean']:.1f}/{p['median']:.1f}/{p['p99']:.1f} ms; ITL "
                f"{i['mean']:.1f}/{i['median']:.1f}/{i['p99']:.1f} ms; {r['completed']} ok, "
                f"{r['failed']} failed |")
    return out


def ratios(records: list[dict]) -> list[str]:
    """W1 with speculation configured against W1 without, where both ran (issue 14: >= 0.97);
    W1-HTTP against W1 offline (target >= 90%)."""
    by_name = {rec["bench"]: rec.get("result") for rec in records}
    out = []
    for name, r in by_name.items():
        plain = by_name.get(name.removesuffix("-spec"))
        if name.endswith("-spec") and r and plain and "output_tok_s" in plain:
            out.append(f"{name} / {name.removesuffix('-spec')}: output tok/s "
                       f"{r['output_tok_s']:,.0f} / {plain['output_tok_s']:,.0f} = "
                       f"{r['output_tok_s'] / plain['output_tok_s']:.3f} (no more than 3% "
                       f"slower: >= 0.970)")
        # W1-HTTP's figure: its output tok/s as a share of W1 offline, same run
        offline = by_name.get(name.replace("w1-http-", "w1-", 1))
        if (name.startswith("w1-http-") and r and offline and "output_tok_s" in r
                and "output_tok_s" in offline):
            out.append(f"{name} / {name.replace('w1-http-', 'w1-', 1)}: output tok/s "
                       f"{r['output_tok_s']:,.0f} / {offline['output_tok_s']:,.0f} = "
                       f"{r['output_tok_s'] / offline['output_tok_s']:.1%} (W1-HTTP: >= 90%)")
    return out


def _spec(r: dict) -> str:
    if "spec_num_draft_tokens" not in r:
        return ""
    drafts = r["spec_num_draft_tokens"]
    rate = r["spec_num_accepted_tokens"] / drafts if drafts else 0.0
    return f", speculation: {drafts} drafts, {rate:.0%} accepted"


def _busy(r: dict) -> str:
    if "gpu_busy_fraction" not in r:  # results written before GPU-busy timing
        return f"runner busy {r['runner_busy_fraction']:.0%}"
    return (f"GPU busy {r['gpu_busy_fraction']:.0%} (steady {r['gpu_busy_steady_fraction']:.0%}), "
            f"async scheduling {'on' if r['async_scheduling'] else 'off'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if argv else 2)
    try:
        with open(argv[0]) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:  # a missing file, a line that is no JSON: one line
        raise SystemExit(f"bench_table.py: {argv[0]}: {e}") from None
    print("\n".join(rows(records) + ratios(records)))


if __name__ == "__main__":
    main()
