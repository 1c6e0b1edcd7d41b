#!/usr/bin/env bash
# The engine against hnswlib, in one run per data set (BENCHMARKS.md,
# "Search engine"). Makes its own Python venv with hnswlib and numpy (the
# pip packages), builds the bench binary, and runs both data sets of the
# table: 100k × 128 clustered L2 and 100k × 384 clustered cosine.
#
#   scripts/bench-engine.sh [extra bench arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${EDGEVEC_BENCH_VENV:-${TMPDIR:-/tmp}/edgevec-hnswlib-venv}"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import hnswlib, numpy" 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet hnswlib numpy
fi
cargo build --release --bin bench
bench="${CARGO_TARGET_DIR:-target}/release/bench"
"$bench" --mode engine --python "$venv/bin/python" --n 100000 --dim 128 --metric l2 --concurrency 2 "$@"
"$bench" --mode engine --python "$venv/bin/python" --n 100000 --dim 384 --metric cosine --concurrency 2 "$@"
