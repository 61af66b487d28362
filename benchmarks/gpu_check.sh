#!/usr/bin/env bash
# GPU check of revsnn_triton in one call: the test suite on the GPU (compiled kernels, no interpreter), then
# the benchmarks. Made for the lent GPU machine (torch/triton/pytest/hypothesis preinstalled, no network);
# the whole run stays under 8 minutes (each stage has its own `timeout`).
#
#   benchmarks/gpu_check.sh fetch     # on a machine WITH network, in the repository root: downloads the
#                                     # pure-Python wheels the GPU image lacks into .whl/ (git-ignored)
#   benchmarks/gpu_check.sh           # on the GPU machine, in the repository root (device tool: carry .whl)
#
# Results: benchmarks/results/<UTC date>-<card>/ (logs, junit XML, every benchmark's csv/json/md/png) and,
# when $OUT is set, $OUT/results.tar.gz (that folder), $OUT/summary.md (stage outcomes, test tail, every
# markdown table) and $OUT/gpu_check.log. With RUN_TUNE=1 the benchmarks run on the tuned configurations.
# Stage limits in seconds can be overridden: T_INSTALL, T_TESTS, T_CHECK, T_STATIC, T_NEURONS, T_MEMORY, T_TRAIN, T_TUNE
# (the tuning stage runs only with RUN_TUNE=1). PYTEST_ARGS adds pytest arguments, TESTS replaces the test paths (default tests); PYTHON picks python;
# XDIST_WORKERS (default 8, 0 = no pytest-xdist); SKIP_INSTALL=1 skips the installation stage (a dry run on a machine where the package is installed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
# Pure-Python packages the GPU image does not have (its package list: .library/device/KINDS.md).
FETCH=(spikingjelly==2.0.0 loguru==0.7.3 tonic==1.7.0 importRosbag==1.0.4)

if [[ "${1:-}" == "fetch" ]]; then
    grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo "/$WHEELS/" >> .git/info/exclude; }
    exec "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "${FETCH[@]}"
fi

# Budget (s): 30 + 120 + 25 + 50 + 70 + 90 + 70 = 455 at most, plus about 20 s of imports, set-up and packing. The
# model benchmarks write their tables after every row and run the target models first, so a stage cut short
# still reports them.
T_INSTALL=${T_INSTALL:-30}; T_TESTS=${T_TESTS:-120}; T_CHECK=${T_CHECK:-25}; T_STATIC=${T_STATIC:-50}
T_NEURONS=${T_NEURONS:-70}
T_MEMORY=${T_MEMORY:-90}; T_TRAIN=${T_TRAIN:-70}; T_TUNE=${T_TUNE:-120}
START=$(date +%s)
CARD=$("$PY" -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no-gpu')" 2>/dev/null || echo unknown)
RES="benchmarks/results/$(date -u +%Y-%m-%d)-$(echo "$CARD" | tr -c 'A-Za-z0-9._\n-' '-' | sed 's/--*/-/g; s/-$//')"
mkdir -p "$RES"
LOG="$RES/gpu_check.log"
declare -a SUMMARY=()

say() { echo "[gpu_check $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# stage NAME LIMIT CMD...: run CMD with a time limit, log its output, record its outcome.
stage() {
    local name=$1 limit=$2; shift 2
    local t0=$(date +%s) rc
    say "== $name (limit ${limit}s): $*"
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee -a "$LOG" "$RES/$name.log"
    rc=${PIPESTATUS[0]}
    local what="ok"
    [[ $rc -eq 124 || $rc -eq 137 ]] && what="TIMED OUT after ${limit}s"
    [[ $rc -ne 0 && $what == ok ]] && what="FAILED (exit $rc)"
    SUMMARY+=("$name: $what in $(( $(date +%s) - t0 ))s")
    say "== $name: $what"
    return $rc
}

say "card: $CARD; python: $("$PY" -c 'import sys; print(sys.version.split()[0])'); results: $RES"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv >> "$LOG" 2>&1 || true

# 1. Carried wheels (offline), then this package without dependencies (REVSNN_SYSTEM_PYTHON=1's way).
install() {
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/revsnn_site \
            "$WHEELS"/*.whl || return 1
    else
        echo "no wheels in $WHEELS/: spikingjelly comparisons and its tests will be skipped or fail"
    fi
    if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e .; then
        # Old setuptools in the image: stage a copy with kernels/ and models/ inside the package.
        echo "editable install failed; using a staged copy of the package on PYTHONPATH"
        rm -rf /tmp/revsnn_stage && mkdir -p /tmp/revsnn_stage
        cp -r revsnn_triton /tmp/revsnn_stage/ && cp -r kernels /tmp/revsnn_stage/revsnn_triton/kernels \
            && cp -r models /tmp/revsnn_stage/revsnn_triton/models || return 1
        echo /tmp/revsnn_stage > /tmp/revsnn_stage.path
    fi
}
export -f install; export PY WHEELS
if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then say "== install: skipped (SKIP_INSTALL=1)"; else stage install "$T_INSTALL" bash -c install; fi
export PYTHONPATH="/tmp/revsnn_site${PYTHONPATH:+:$PYTHONPATH}"
[[ -f /tmp/revsnn_stage.path ]] && export PYTHONPATH="$(cat /tmp/revsnn_stage.path):$PYTHONPATH"
"$PY" -c "import revsnn_triton, spikingjelly, torch, triton; print('revsnn_triton', revsnn_triton.__file__, \
'| spikingjelly', spikingjelly.__file__, '| torch', torch.__version__, '| triton', triton.__version__)" 2>&1 | tee -a "$LOG"

# 2. The test suite on the GPU (compiled kernels). xdist spreads Triton's compilations over the CPUs.
export HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci}
XDIST=()
[[ ${XDIST_WORKERS:-8} != 0 ]] && "$PY" -c "import xdist" 2>/dev/null && XDIST=(-n "${XDIST_WORKERS:-8}")
stage tests "$T_TESTS" "$PY" -m pytest -q "${XDIST[@]}" -p no:cacheprovider --durations=15 \
    --junitxml="$RES/tests.xml" ${PYTEST_ARGS:-} ${TESTS:-tests}

# The invertibility checks a user runs on a new GPU before a long training run (compiled kernels).
stage check "$T_CHECK" "$PY" -m revsnn_triton check RevSResNet21 --device cuda

# 3. Optional: tune the neuron kernels for the benchmark shapes (cache kept with the results).
if [[ "${RUN_TUNE:-0}" == 1 ]]; then
    export REVSNN_TUNE_CACHE="$RES/tune.json"
    stage tune "$T_TUNE" "$PY" -m revsnn_triton.tuning
fi

# 4. Benchmarks. Each writes <stem>.csv/.json/.md (+ .png) into $RES.
# The compiler's report for this card's architecture (registers, spills, access widths, issue share), to set beside
# the measured kernel times.
stage bench_static "$T_STATIC" "$PY" -m revsnn_triton.bench.static --target sm_90 --out "$RES"
stage bench_neurons "$T_NEURONS" "$PY" -m revsnn_triton.bench.neurons --out "$RES" --worker-timeout 60
# Memory per image (max allocated and max reserved, batches 16/64): the engine's targets first, then the ablation
# (RevSResNet37 in floor mode among its rows), the 1,000-layer model at batch 64.
stage bench_memory "$T_MEMORY" "$PY" -m revsnn_triton.bench.memory --device cuda --batch-sizes 16 64 \
    --models RevSResNet37 MS-ResNet34 RevSResNet1001 RevSFormer-4-384 Spikingformer-4-384 --ablation \
    --out "$RES" --budget-s $(( T_MEMORY - 15 ))
# Step time at batch 64: RevSResNet37 (default, fully reversible, floor mode) against MS-ResNet34, ours and
# spikingjelly's neurons.
stage bench_train_step "$T_TRAIN" "$PY" -m revsnn_triton.bench.train_step --out "$RES" --batch 64 \
    --models MS-ResNet34 RevSResNet37 RevSResNet37:keep_graph_stages=0 RevSResNet37:recompute_batch=16 --compile-models --budget-s $(( T_TRAIN - 15 ))

# 5. Summary (with every benchmark's markdown table), and the files that travel back (at most 8).
{
    echo "# GPU check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $CARD"
    echo
    for line in "${SUMMARY[@]}"; do echo "- $line"; done
    echo "- total: $(( $(date +%s) - START ))s"
    echo
    echo '## tests (tail)'
    echo '```'
    tail -n 25 "$RES/tests.log" 2>/dev/null
    echo '```'
    for f in "$RES"/*.md; do
        [[ $(basename "$f") == summary.md ]] && continue
        echo; echo "## $(basename "$f")"; echo; sed 's/^# /### /' "$f"
    done
} > "$RES/summary.md"
cat "$RES/summary.md"
if [[ -n "${OUT:-}" ]]; then
    tar -czf "$OUT/results.tar.gz" -C "$(dirname "$RES")" "$(basename "$RES")"
    cp "$RES/summary.md" "$RES/gpu_check.log" "$OUT/"
    ls -la "$OUT"
fi
say "done"
