#!/usr/bin/env bash
# Issue 5 benchmark (embedded SmolLM2-135M-Instruct, CPU): a sweep over shortgpt, sleb, mi x 0.125, 0.25,
# the offline zero-shot proxies of the dense and one pruned model, and a speed/memory bench.
# Usage: flock /tmp/fusegpt-cpu.lock bash benchmarks/eval_benchmark.sh [OUT_DIR]   (results in OUT_DIR)
set -euo pipefail
OUT=${1:-runs/eval-bench}
FG=${FUSEGPT:-.venv/bin/fusegpt}
# one torch thread: on this shared 2-core machine two OpenMP threads ran a 256-token SmolLM2 forward
# 4-6x slower (13 s vs 2.2-3.1 s, measured 16:25 UTC at load ~11)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$OUT"
date -u +"start %FT%TZ" >> "$OUT/timeline.txt"

# 1. sweep: each cell pruned once from the same dense model; eval seqlen 512, first 8192 tokens of each test split
$FG sweep --methods shortgpt,sleb,mi --sparsity 0.125,0.25 --nsamples 4 --seqlen 128 \
    --eval-seqlen 512 --max-tokens 8192 --output "$OUT/sweep"
date -u +"sweep done %FT%TZ" >> "$OUT/timeline.txt"

# 2. offline zero-shot proxies (first 100 items of each, in the proxies' fixed hash order), dense model
$FG eval --tasks proxies --limit 100 --batch-size 8 --json > "$OUT/proxies_dense.json"
date -u +"dense proxies done %FT%TZ" >> "$OUT/timeline.txt"

# 3. speed and memory: dense vs 4 and 8 blocks removed
$FG bench --model embedded --model "$OUT/sweep/shortgpt-0.125" --model "$OUT/sweep/shortgpt-0.25" \
    --batch-sizes 1,4 --lengths 128,512 --decode-tokens 32 --warmup 1 --repeats 3 --output "$OUT/bench.json" \
    | tee "$OUT/bench.txt"
date -u +"bench done %FT%TZ" >> "$OUT/timeline.txt"

# 4. the same proxies on a pruned model (MI, 25%)
$FG eval --model "$OUT/sweep/mi-0.25" --tasks proxies --limit 100 --batch-size 8 --json > "$OUT/proxies_mi-0.25.json"
date -u +"pruned proxies done %FT%TZ" >> "$OUT/timeline.txt"
