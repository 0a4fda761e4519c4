#!/usr/bin/env bash
# Run every benchmark with the sizes of benchmarks/README.md and append JSON lines to
# $OUT (default /tmp/hermitkit-bench/results.jsonl). Needs a PostgreSQL server at
# $HERMITKIT_BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/postgres).
# Extra arguments go to the efficiency benchmark, e.g. --latency 0.1 --concurrency 32.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/hermitkit-bench/results.jsonl}
STORE=${STORE:-/tmp/hermitkit-bench/store.db}
PG_STORE=${PG_STORE:-hermitkit_bench_store}
PG_SERVER=${HERMITKIT_BENCH_POSTGRES_URL:-postgresql://postgres@127.0.0.1:5432/postgres}
PG_URL="${PG_SERVER%/*}/${PG_STORE}"
mkdir -p "$(dirname "$OUT")"

"$PYTHON" benchmarks/bench_efficiency.py --runs 256 --turns 10 --concurrency 64 --latency 0.05 --database sqlite,postgresql --json "$OUT" "$@"
"$PYTHON" benchmarks/bench_overhead.py --runs 64 --turns 10 --concurrency 1,64 --database sqlite,postgresql --json "$OUT"
"$PYTHON" benchmarks/bench_memory.py --runs 100,1000 --turns 10 --concurrency 64 --database sqlite,postgresql --json "$OUT"

"$PYTHON" benchmarks/generate_store.py --database sqlite --path "$STORE"
"$PYTHON" benchmarks/generate_store.py --database postgresql --pg-database "$PG_STORE"
"$PYTHON" benchmarks/bench_analysis.py --url "sqlite:///$STORE" --json "$OUT"
"$PYTHON" benchmarks/bench_analysis.py --url "$PG_URL" --json "$OUT"
"$PYTHON" benchmarks/bench_reports.py --url "sqlite:///$STORE" --json "$OUT"
"$PYTHON" benchmarks/bench_reports.py --url "$PG_URL" --json "$OUT"
