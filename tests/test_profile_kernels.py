"""tools/profile_kernels.py's analysis of a kernel trace, on synthetic traces (CUPTI runs on the
GPU machine only; what it records is what these build)."""

import pytest

from tools.profile_kernels import Record, analyze, category, labels, load, save, split_steps

GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_cublas"
SPLITK = "_ZN8cublasLt19splitKreduce_kernelILi32ELi16EiffEEvNS_18cublasSplitKParamsIT3_EE"
DECODE = "_Z17decode_mma_kernelI13__nv_bfloat16Li128ELi8ELi4ELi2EEvPT_"
PREFILL = "prefill_sm90_kernel<__nv_bfloat16, 128, 128, 2>"


def layer(attention=DECODE, split_down=False):
    names = ["rms_norm_vec_kernel<__nv_bfloat16>", GEMM, "qk_norm_rope_kv_kernel<bf16>",
             attention, GEMM, "rms_norm_vec_kernel<__nv_bfloat16>", GEMM,
             "silu_and_mul_vec8_kernel<__nv_bfloat16>", GEMM]
    return names + [SPLITK] if split_down else names


def step_names(layers=2, attention=DECODE, split_down=False):
    names = ["copy h2d", "resolve_placeholders_kernel", "gather_rows_kernel<bf16>"]
    for _ in range(layers):
        names += layer(attention, split_down)
    return names + ["rms_norm_vec_kernel<__nv_bfloat16>", GEMM, "greedy_kernel<bf16>",
                    "copy d2h"]


def timeline(names, start=0, duration=10_000, gap=1_000, grid_y=256):
    """Records back to back: each `duration` ns, `gap` ns apart."""
    out, t = [], start
    for name in names:
        grid = (8, grid_y, 1) if "decode" in name or "prefill" in name else (1, 1, 1)
        out.append(Record(name, t, t + duration, grid))
        t += duration + gap
    return out, t


def test_categories_follow_the_kernel_names():
    assert category(GEMM) == category(SPLITK) == "gemm"
    assert category("nvjet_tst_128x256_64x4_2x1_v_bz_coopB_TNN") == "gemm"
    assert category(DECODE) == "decode attention"
    assert category("decode_reduce_kernel<bf16>") == "decode attention reduce"
    assert category(PREFILL) == "prefill attention"  # not a GEMM although "sm90_" is in it
    assert category("qk_norm_rope_kv_kernel<bf16>") == "rope + kv write"  # not a norm
    assert category("fp8_gemv_kernel") == "gemv"
    assert category("copy d2h") == "copy d2h"
    assert category("mystery_kernel") == "other"


def test_gemms_are_named_by_the_projection_they_compute():
    step, _ = timeline(step_names(layers=2, split_down=True))
    got = [lab for lab in labels(step) if lab.startswith("gemm")]
    per_layer = ["gemm qkv", "gemm o", "gemm gate_up", "gemm down", "gemm down"]
    assert got == per_layer * 2 + ["gemm lm_head"]


def test_an_nvjet_kernel_that_splits_k_inside_is_a_call_of_its_own():
    """cuBLAS's nvjet kernels name an in-kernel split-K "_splitK_": each is a whole GEMM call
    (qkv here), not the reduction of the call before (down)."""
    nvjet_splitk = "nvjet_sm90_tst_128x128_64x6_2x1_v_bz_splitK_TNT"
    names = step_names(layers=2)
    names[names.index(GEMM, 3)] = nvjet_splitk  # the first layer's qkv
    names[[i for i, n in enumerate(names) if n == GEMM][4]] = nvjet_splitk  # the second's
    step, _ = timeline(names)
    got = [lab for lab in labels(step) if lab.startswith("gemm")]
    assert got == ["gemm qkv", "gemm o", "gemm gate_up", "gemm down"] * 2 + ["gemm lm_head"]


def test_steps_end_after_the_sampler_and_its_copy():
    a, t = timeline(step_names())
    b, t = timeline(step_names(), start=t + 50_000, grid_y=100)
    c, _ = timeline(step_names(attention=PREFILL), start=t)
    steps = split_steps(a + b + c)
    assert [len(s) for s in steps] == [len(a), len(b), len(c)]
    assert steps[1][0].name == "copy h2d" and steps[0][-1].name == "copy d2h"


def test_analysis_by_kind_of_step():
    a, t = timeline(step_names())  # batch 256
    b, t = timeline(step_names(), start=t + 50_000, grid_y=100)  # 50 us idle before it
    c, t = timeline(step_names(), start=t, grid_y=256)
    d, _ = timeline(step_names(attention=PREFILL), start=t)
    result = analyze(d + c + b + a)  # any order: sorted by start
    assert set(result) == {"decode 193+ seqs", "decode 65-128 seqs", "with prompt tokens"}
    big = result["decode 193+ seqs"]
    n = len(step_names())
    assert big["steps"] == 2
    # a step: n records of 10 us, a 1 us gap after each (the last one's is the next step's)
    assert big["span_ms"] == pytest.approx((n * 11_000 + 25_000) / 1e6)  # 50 us once in 2 steps
    assert big["busy_ms"] == pytest.approx(n * 10_000 / 1e6)
    assert big["by_label_ms"]["gemm qkv"] == pytest.approx(2 * 10_000 / 1e6)
    assert big["calls_per_step"]["decode attention"] == 2
    assert big["gaps_ms"]["copy d2h -> next step"] == pytest.approx((1_000 + 51_000) / 2 / 1e6)
    assert big["gaps_ms"]["gemm qkv -> rope + kv write"] == pytest.approx(2 * 1_000 / 1e6)
    assert result["with prompt tokens"]["by_category_ms"]["prefill attention"] == \
        pytest.approx(2 * 10_000 / 1e6)


def test_overlapping_kernels_count_once_and_leave_no_gap():
    step = [Record("rms_norm_kernel", 0, 10_000), Record(GEMM, 5_000, 20_000),  # PDL overlap
            Record("greedy_kernel", 25_000, 30_000)]
    kind = analyze(step)["no attention"]
    assert kind["busy_ms"] == pytest.approx(25_000 / 1e6)
    assert kind["gaps_ms"] == {"gemm lm_head -> sampler": pytest.approx(5_000 / 1e6)}


def test_a_saved_trace_loads_back(tmp_path):
    records, _ = timeline(step_names(layers=1))
    path = str(tmp_path / "trace.npz")
    save(path, records)
    assert load(path) == records


def test_the_report_names_each_kind_and_its_spans():
    from tools.profile_kernels import format_report

    a, t = timeline(step_names())
    b, _ = timeline(step_names(), start=t + 50_000)
    result = analyze(a + b)
    n = len(step_names())
    lo, mid, hi = result["decode 193+ seqs"]["span_min_median_max_ms"]
    # the last step ends with its last record; the first one at the next step's start
    assert lo == pytest.approx((n * 11_000 - 1_000) / 1e6)
    assert hi == pytest.approx((n * 11_000 + 50_000) / 1e6)
    report = format_report(result)
    assert "decode 193+ seqs: 2 steps" in report and "| gemm qkv | 0.020 | 2.0 |" in report


def test_cupti_activity_records_become_records(monkeypatch):
    """Trace against a stand-in for cupti-python's module: what it enables, and how the
    activity objects CUPTI hands back are read."""
    import enum
    import sys
    import types

    from tools.profile_kernels import Trace

    class ActivityKind(enum.IntEnum):
        MEMCPY, MEMSET, CONCURRENT_KERNEL = 1, 2, 10

    calls = []
    fake = types.SimpleNamespace(
        ActivityKind=ActivityKind,
        activity_register_callbacks=lambda req, done: calls.append(("register", req(), done)),
        activity_enable=lambda kind: calls.append(("enable", kind)),
        activity_disable=lambda kind: calls.append(("disable", kind)))
    monkeypatch.setitem(sys.modules, "cupti", types.SimpleNamespace(cupti=fake))
    tracer = Trace()
    assert calls[0][:2] == ("register", (8 << 20, 0))
    assert {c[1] for c in calls[1:]} == set(ActivityKind)
    kernel = types.SimpleNamespace(kind=10, name=DECODE, start=5, end=9, grid_x=8, grid_y=256,
                                   grid_z=1)
    copy = types.SimpleNamespace(kind=1, copy_kind=2, start=10, end=12)
    memset = types.SimpleNamespace(kind=2, start=13, end=14)
    calls[0][2]([kernel, copy, memset])
    assert tracer.records == [Record(DECODE, 5, 9, (8, 256, 1)), Record("copy d2h", 10, 12),
                              Record("memset", 13, 14)]


def test_gemm_calls_are_counted_where_kernels_between_them_are_fused():
    """The skinny GEMM's GLU form leaves no SiLU kernel between gate_up and down, and its o and
    down calls end with a reduction kernel: the labels still follow the calls."""
    glu = "_Z16gemm_sm90_kernelI13__nv_bfloat16Li256ELi4ELb1EEvPT_"
    plain = "_Z16gemm_sm90_kernelI13__nv_bfloat16Li256ELi4ELb0EEvPT_"
    red = "_Z23gemm_sm90_reduce_kernelI13__nv_bfloat16EvPT_PKfli"
    norm = "rms_norm_vec_kernel<__nv_bfloat16>"
    layer = [norm, plain, red, "qk_norm_rope_kv_kernel<bf16>", DECODE, plain, red, norm, glu,
             plain, red]
    step, _ = timeline(layer * 2 + [norm, plain, "greedy_kernel<bf16>"])
    got = [lab for lab in labels(step) if lab.startswith("gemm")]
    per_layer = ["gemm qkv", "gemm qkv", "gemm o", "gemm o", "gemm gate_up", "gemm down",
                 "gemm down"]
    assert got == per_layer * 2 + ["gemm lm_head"]


def test_two_traces_side_by_side(tmp_path, capsys):
    """--load A --against B: per kind of step, every label's ms a step in both and B - A."""
    from tools.profile_kernels import main

    a, _ = timeline(step_names())
    b, _ = timeline(step_names(), duration=5_000)  # every kernel twice as fast
    for name, records in (("a", a), ("b", b)):
        save(str(tmp_path / f"{name}.npz"), records)
    result = main(["--load", str(tmp_path / "a.npz"), "--against", str(tmp_path / "b.npz")])
    base, other = result["base"], result["other"]
    kind = "decode 193+ seqs"
    assert other[kind]["by_label_ms"]["gemm qkv"] == pytest.approx(
        base[kind]["by_label_ms"]["gemm qkv"] / 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # an argparse error: exit status 2, the flag named
        main(["--against", str(tmp_path / "b.npz")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "error: argument --against: compares two saved traces: give --load as well")


def test_each_projection_names_the_kernels_it_ran():
    """by_kernel: (label, kernel name) -> ms and calls a step, longest first; the report lists
    them with the time a call."""
    from tools.profile_kernels import format_report

    other = "nvjet_tst_64x8_64x16_4x1_v_bz_TNT"
    names = step_names(layers=2)
    second_attention = [i for i, n in enumerate(names) if n == DECODE][1]
    names[second_attention + 1] = other  # layer 1's o projection on another kernel
    step, _ = timeline(names)
    kind = analyze(step)["decode 193+ seqs"]
    assert kind["by_kernel"][f"gemm qkv: {GEMM}"] == (pytest.approx(0.020), 2.0)
    assert kind["by_kernel"][f"gemm o: {GEMM}"] == (pytest.approx(0.010), 1.0)
    assert kind["by_kernel"][f"gemm o: {other}"] == (pytest.approx(0.010), 1.0)
    assert sum(c for _, c in kind["by_kernel"].values()) == len(names)
    report = format_report({"decode 193+ seqs": kind}, top=50)
    assert f"| gemm o: {other} | 0.010 | 1.0 | 10.0 |" in report
