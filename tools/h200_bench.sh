#!/usr/bin/env bash
# Every figure of README's "Performance" table in one run on the GPU machine:
#   bash tools/h200_bench.sh [STEP ...]
#   steps (the default list): gputest w1 w1-sampled w1-sync w1-8b w1-8b-sync latency-8b seed
#          latency w2 w1-eager
#   structured (W1 constrained by a JSON schema vs unconstrained; not in the default list)
#   latency-32k (W6: batch-1 decode of 256 tokens after a 32,532-token prompt, max_model_len
#          32,832, Qwen3-0.6B shapes; session 12's figure had the context end at 32,532)
#   w1-sampled (W1 as chat traffic samples: temperature 0.8, top_p 0.95, top_k 50,
#          repetition_penalty 1.1; issue 12's target is >= 95% of w1 in the same run)
#          spec-8b spec-8b-min1 spec-8b-sweep w1-8b-spec w1-spec (speculative decoding: batch-1
#          replays of the measured acceptance, a batch-size sweep that suggests
#          disable_by_batch_size, W1 with speculation configured on Llama-3-8B / Qwen3-0.6B; the
#          summary prints W1 spec / plain when both ran, e.g. `w1-8b w1-8b-spec`)
#          w1-http-dash (W1-HTTP with the dashboard closed and open on one server: the ratio)
#          latency-8b-fp8 w1-8b-fp8 (Llama-3-8B shapes with --quantization fp8)
#   tensor parallel (issue 18; need 2 GPUs, nvidia-h200-x2; not in the default list):
#          gputest-tp w1-tp2 latency-tp2 allreduce-tp2 parity-tp2
#          (compare with w1-8b and latency-8b, the TP=1 figures)
#   latency-8b-q4k latency-8b-q8 (batch-1 decode with weights kept in GGUF blocks)
# gputest runs the CUDA-graph tests first; if they fail, the rest runs with graphs off.
# profile-8b, profile (not in the default list): tools/profile_kernels.py on W1, Llama-3-8B /
# Qwen3-0.6B shapes: the kernels' time per kind of step and the gaps between them; the trace kept
# as $OUT/trace-MODEL.npz (`--load` reports on it again, `--load A --against B` compares two).
# profile-8b-skinny: the same with PAGEDSERVE_SKINNY_GEMM=1. Needs cupti-python in .whl/
# (`gpu_wheels.sh cupti-python==13.0.1`: the machine has CUDA 13.0's CUPTI and cuda-bindings).
# gputest-prefill (not in the default list): the GPU suites whose steps hold prompts (prefill
# kernels, model, graph engine, mixed graphs, spec-decode verify rows, parity, overlap), the
# output in $OUT/gputest-prefill.txt and its summary lines printed.
# Each tool prints one JSON line; they are collected in $OUT/bench.jsonl (default ./bench-out/)
# and summarised by tools/bench_table.py at the end. Wheels the GPU machine lacks (server deps) are
# installed from .whl/ when present (on a machine with internet: `pip download --only-binary=:all:
# --python-version 3.12 --platform manylinux2014_x86_64 -d .whl NAME ...`; give it
# `uvloop httptools`, the server's faster event loop and HTTP parser: without them uvicorn runs
# on asyncio + h11, and each server start below says which it has).
# w1-8b-ab, w1-ab (not in the default list): W1 on Llama-3-8B / Qwen3-0.6B once per environment
# in $AB, the list run $AB_ROUNDS (2) times over: AB="- PAGEDSERVE_DECODE_ORDER=batch
# PAGEDSERVE_SKINNY_GEMM=1,PAGEDSERVE_DECODE_ORDER=batch" ("-": the defaults; a comma joins the
# variables of one run), recorded as w1-llama3-8b[ENV] / w1-qwen3-0.6b[ENV].
# latency-32k-ab (not in the default list): W6 (latency-32k) the same way, recorded as
# latency-32k-qwen3-0.6b[ENV], e.g. AB="- PAGEDSERVE_DECODE_MMA_TR=0".
# energy-8b (not in the default list): W1 on Llama-3-8B with --energy (NVML's joules over the
# run), then tools/energy_parts.py with its wall time and watts: each part alone at the power cap,
# scaled by W1's schedule, and the attention's energy above the read floor ($OUT/energy-parts.txt).
# attn-energy (not in the default list): energy_parts.py --attention-variants with the stages
# filled by TMA (PAGEDSERVE_DECODE_MMA_TMA=1, the default) and by cp.async (0): pJ a K/V byte and
# TB/s of each (warps, stages) beside the read floors.
# w1-8b-unfrozen (not in the default list): W1 on Llama-3-8B with the garbage collector's
# start-up freeze undone (--unfreeze-gc): beside w1-8b, what the freeze gains.
# w1-8b-idle (not in the default list): W1 on Llama-3-8B with `--idle 16` (tools/idle_report.py),
# the report in $OUT/idle-llama3-8b.txt.
# w1-http-dp (not in the default list): W1-HTTP on llama3-8b, 1 then $DP (2) engine cores.
# w2 with STAGES=1 also prints where W2's first tokens waited, stage by stage (bench_serving
# --stages, tools/ttft_stages.py); W2_SERVE_FLAGS (e.g. --no-async-scheduling) go to its server.
# w2-stages (not in the default list): W2 with its stages after a short warm-up instead of
# W1-HTTP (about 30 s less), recorded as w2-stages<W2_SERVE_FLAGS>; then the fixed latencies
# alone: 48 short requests (W1 scaled by 0.1) at 4/s, between which the engine idles (w2-idle...).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
steps=${*:-gputest w1 w1-sampled w1-sync w1-8b w1-8b-sync latency-8b seed latency w2 w1-eager}
log="$OUT/bench.jsonl"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

SPEC='{"method": "ngram", "num_speculative_tokens": 4}'

start_server() {  # start_server [MODEL PORT WAIT LOG EXTRA...]: serve in the background;
  # $server is its pid
  local model=${1:-qwen3-0.6b} port=${2:-8011} wait=${3:-120} out=${4:-$OUT/server.log}
  shift $(( $# < 4 ? $# : 4 ))
  python3 -m server.cli serve "$model" --load-format dummy --device cuda --port "$port" \
    --log-level warning "$@" > "$out" 2>&1 &
  server=$!
  for _ in $(seq 1 "$wait"); do
    python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health')" \
      2> /dev/null && break
    sleep 1
  done
  python3 -c "import uvloop, httptools" 2> /dev/null && echo "server HTTP: uvloop + httptools" \
    || echo "server HTTP: asyncio + h11 (no uvloop/httptools wheels in .whl/)"
}

record() {  # record NAME TIMEOUT CMD...: run a tool with --json, keep its last line tagged NAME
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local line
  line=$(timeout "$limit" "$@" --json 2> >(tail -n 5 >&2) | tail -n 1)
  if [ -n "$line" ] && [ "${line:0:1}" = "{" ]; then
    echo "{\"bench\": \"$name\", \"result\": $line}" | tee -a "$log"
  else
    echo "{\"bench\": \"$name\", \"error\": \"no result (timeout $limit s or crash)\"}" | tee -a "$log"
  fi
}

Q="--model qwen3-0.6b --load-format dummy --device cuda --dtype bfloat16"
L="--model llama3-8b --load-format dummy --device cuda --dtype bfloat16"
for step in $steps; do
  case $step in
    gputest)
      if ! timeout 200 python3 -m pytest -q -x -m gpu tests/test_cuda_graph_engine.py \
          tests/test_cuda_model.py tests/test_cuda_overlap.py 2>&1 | tail -n 15; then
        echo "CUDA-graph tests failed: the benchmarks below run eagerly"
        export PAGEDSERVE_DECODE_GRAPHS=0
      fi ;;
    w1) record w1-qwen3-0.6b 120 python3 tools/bench_throughput.py $Q ;;
    w1-sampled) record w1-sampled-qwen3-0.6b 120 python3 tools/bench_throughput.py $Q \
      --temperature 0.8 --top-p 0.95 --top-k 50 --repetition-penalty 1.1 ;;
    structured) record structured-w1-qwen3-0.6b 240 python3 tools/bench_throughput.py $Q --structured ;;
    w1-sync) record w1-qwen3-0.6b-sync 120 python3 tools/bench_throughput.py $Q \
      --no-async-scheduling ;;
    w1-eager) record w1-qwen3-0.6b-eager 90 python3 tools/bench_throughput.py $Q --enforce-eager ;;
    latency) record latency-qwen3-0.6b 60 python3 tools/bench_latency.py $Q ;;
    latency-32k) record latency-32k-qwen3-0.6b 120 python3 tools/bench_latency.py $Q \
      --prompt-len 32532 --output-len 256 --max-model-len 32832 ;;
    w1-8b) record w1-llama3-8b 150 python3 tools/bench_throughput.py $L ;;
    energy-8b)  # W1 on Llama-3-8B with NVML's energy counter, then each part of it at the cap
      record w1-llama3-8b-energy 150 python3 tools/bench_throughput.py $L --energy
      ws=$(tail -n 1 "$log" | python3 -c "import json, sys; r = json.load(sys.stdin)['result'];
print(r['wall_s'], r['mean_w'])" 2> /dev/null)
      timeout 200 python3 tools/energy_parts.py ${ws:+--w1-seconds ${ws% *} --w1-watts ${ws#* }} \
        2>&1 | tee "$OUT/energy-parts.txt" | tail -n 34 ;;
    attn-energy)  # the decode attention's pJ a K/V byte on each (warps, stages), both fills
      for tma in 1 0; do
        PAGEDSERVE_DECODE_MMA_TMA=$tma timeout 90 python3 tools/energy_parts.py \
          --attention-variants 2>&1 | grep -v "^|---"
      done ;;
    w1-8b-ab|w1-ab)  # W1 under each environment of $AB, interleaved $AB_ROUNDS times
      if [ "$step" = w1-ab ]; then name=w1-qwen3-0.6b args=$Q; else name=w1-llama3-8b args=$L; fi
      for _ in $(seq 1 "${AB_ROUNDS:-2}"); do
        for v in ${AB:--}; do
          # shellcheck disable=SC2046,SC2086  # one word per VAR=VALUE; $args splits on purpose
          record "$name[$v]" 150 env $([ "$v" = - ] || echo "$v" | tr , ' ') \
            python3 tools/bench_throughput.py $args
        done
      done ;;
    latency-32k-ab)  # W6 under each environment of $AB, interleaved $AB_ROUNDS times
      for _ in $(seq 1 "${AB_ROUNDS:-2}"); do
        for v in ${AB:--}; do
          # shellcheck disable=SC2046,SC2086  # one word per VAR=VALUE; $Q splits on purpose
          record "latency-32k-qwen3-0.6b[$v]" 120 env $([ "$v" = - ] || echo "$v" | tr , ' ') \
            python3 tools/bench_latency.py $Q --prompt-len 32532 --output-len 256 \
            --max-model-len 32832
        done
      done ;;
    w1-8b-unfrozen) record w1-llama3-8b-unfrozen 150 python3 tools/bench_throughput.py $L \
      --unfreeze-gc ;;
    w1-8b-idle)  # the report as printed: the device's 16 longest idle gaps and the host then
      timeout 200 python3 tools/bench_throughput.py $L --idle 16 | tee "$OUT/idle-llama3-8b.txt" ;;
    w1-8b-sync) record w1-llama3-8b-sync 150 python3 tools/bench_throughput.py $L \
      --no-async-scheduling ;;
    latency-8b) record latency-llama3-8b 90 python3 tools/bench_latency.py $L ;;
    latency-8b-q4k) record latency-llama3-8b-q4_k 120 python3 tools/bench_latency.py $L \
      --quantization q4_k ;;
    latency-8b-q8) record latency-llama3-8b-q8_0 120 python3 tools/bench_latency.py $L \
      --quantization q8_0 ;;
    latency-8b-fp8) record latency-llama3-8b-fp8 90 python3 tools/bench_latency.py $L \
      --quantization fp8 ;;
    w1-8b-fp8) record w1-llama3-8b-fp8 150 python3 tools/bench_throughput.py $L \
      --quantization fp8 ;;
    spec-8b) record spec-replay-llama3-8b 200 python3 tools/bench_spec.py $L \
      --replay tools/results/spec_profile.json ;;
    spec-8b-min1) record spec-replay-llama3-8b-min1 200 python3 tools/bench_spec.py $L \
      --replay tools/results/spec_profile_min1.json ;;
    spec-8b-sweep) record spec-sweep-llama3-8b 400 python3 tools/bench_spec.py $L \
      --replay tools/results/spec_profile.json --output-len 128 --batch-sizes 1,2,4,8,16,32,64,128 ;;
    w1-8b-spec) record w1-llama3-8b-spec 150 python3 tools/bench_throughput.py $L \
      --speculative-config "$SPEC" ;;
    w1-spec) record w1-qwen3-0.6b-spec 120 python3 tools/bench_throughput.py $Q \
      --speculative-config "$SPEC" ;;
    profile-8b|profile-8b-skinny|profile)  # CUPTI's trace of W1 (cupti-python in .whl/)
      case $step in
        profile-8b) m="$L" tag=llama3-8b flag=0 ;;
        profile-8b-skinny) m="$L" tag=llama3-8b-skinny flag=1 ;;
        *) m="$Q" tag=qwen3-0.6b flag=0 ;;
      esac
      PAGEDSERVE_SKINNY_GEMM=$flag timeout 300 python3 tools/profile_kernels.py $m \
        --save "$OUT/trace-$tag.npz" > "$OUT/profile-$tag.txt" 2>&1
      echo "== profile $tag (rc $?): $OUT/profile-$tag.txt"
      grep -E "^(W1|decode|with|idle)|gemm|attention|norm|silu|rope|sampler|copy" \
        "$OUT/profile-$tag.txt" | head -n 80 ;;
    gputest-prefill)  # the suites whose steps hold prompts, through the default prefill kernel
      timeout 480 python3 -m pytest -q -m gpu tests/test_cuda_prefill.py tests/test_cuda_model.py \
        tests/test_cuda_graph_engine.py tests/test_cuda_mixed_graphs.py \
        tests/test_cuda_spec_decode.py tests/test_cuda_parity.py tests/test_cuda_overlap.py \
        > "$OUT/gputest-prefill.txt" 2>&1
      grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gputest-prefill.txt" | tail -n 12 ;;
    gputest-tp) timeout 300 python3 -m pytest -q -m gpu tests/test_cuda_tensor_parallel.py \
      2>&1 | tail -n 15 ;;
    w1-tp2) record w1-llama3-8b-tp2 240 python3 tools/bench_throughput.py $L \
      --tensor-parallel-size 2 ;;
    latency-tp2) record latency-llama3-8b-tp2 150 python3 tools/bench_latency.py $L \
      --tensor-parallel-size 2 ;;
    allreduce-tp2) record allreduce-llama3-8b-tp2 120 python3 tools/bench_allreduce.py \
      --model llama3-8b --tensor-parallel-size 2 --batch 1 256 ;;
    parity-tp2) record parity-llama3-8b-tp2 400 python3 tools/tp_parity.py --model llama3-8b \
      --tensor-parallel-size 2 --num-prompts 64 ;;
    seed) record seed-table-qwen3-0.6b 150 python3 tools/seed_table.py $Q --static-batch-size 32 ;;
    w1-http-dash)
      start_server
      # alternating passes, dashboard closed / open (4 SSE viewers), 3 of each
      record w1-http-dashboard-qwen3-0.6b 240 python3 tools/bench_serving.py \
        --base-url http://127.0.0.1:8011 --model qwen3-0.6b --dashboard-clients 4 \
        --dashboard-compare --passes 3
      kill $server; wait $server 2> /dev/null ;;
    w2)
      # shellcheck disable=SC2086  # the flags are words
      start_server qwen3-0.6b 8011 120 "$OUT/server.log" ${W2_SERVE_FLAGS:-}
      # W1-HTTP first (all 256 requests at once: the serving path at saturation), then W2.
      record w1-http-qwen3-0.6b 120 python3 tools/bench_serving.py \
        --base-url http://127.0.0.1:8011 --model qwen3-0.6b
      # (a salt of its own: W1-HTTP left the same prompts in the server's prefix cache)
      record w2-qwen3-0.6b-rate16 100 python3 tools/bench_serving.py \
        --base-url http://127.0.0.1:8011 --model qwen3-0.6b --request-rate 16 --cache-salt w2 \
        ${STAGES:+--stages}
      [ -n "${STAGES:-}" ] && python3 tools/ttft_stages.py "$log" w2-qwen3-0.6b-rate16
      kill $server; wait $server 2> /dev/null ;;
    w2-stages)
      # shellcheck disable=SC2086  # the flags are words
      start_server qwen3-0.6b 8011 120 "$OUT/server.log" ${W2_SERVE_FLAGS:-}
      python3 tools/bench_serving.py --base-url http://127.0.0.1:8011 --model qwen3-0.6b \
        --num-prompts 32 > /dev/null  # warm-up: kernels, cuBLAS shapes, connections
      name="w2-stages${W2_SERVE_FLAGS:-}"; name=${name// /}
      record "$name" 100 python3 tools/bench_serving.py --base-url http://127.0.0.1:8011 \
        --model qwen3-0.6b --request-rate 16 --stages
      python3 tools/ttft_stages.py "$log" "$name"
      record "${name/w2/w2-idle}" 40 python3 tools/bench_serving.py \
        --base-url http://127.0.0.1:8011 --model qwen3-0.6b --request-rate 4 --num-prompts 48 \
        --scale 0.1 --stages
      python3 tools/ttft_stages.py "$log" "${name/w2/w2-idle}"
      kill $server; wait $server 2> /dev/null ;;
    w1-http-dp)  # W1-HTTP on llama3-8b: one engine core, then ${DP:-2} (one per GPU; issue 18)
      for dp in 1 "${DP:-2}"; do
        start_server llama3-8b 8012 300 "$OUT/server-dp$dp.log" --data-parallel-size "$dp"
        record "w1-http-llama3-8b-dp$dp" 200 python3 tools/bench_serving.py \
          --base-url http://127.0.0.1:8012 --model llama3-8b
        kill $server; wait $server 2> /dev/null
      done ;;
    *) echo "unknown step $step" ;;
  esac
done
python3 tools/bench_table.py "$log"
