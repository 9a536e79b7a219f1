#!/usr/bin/env bash
# The GPU check, on the device machine: install onnxruntime-gpu, then measure inferd served
# against the in-process ceiling on the same GPU.
#
#   scripts/gpu_check.sh             on the device, OUT set: install, test, benchmark
#   scripts/gpu_check.sh --preflight here, before spending device time: are the parts ready,
#                                    does the carry fit, which `run` calls to make
#
# On the device it: assembles and installs onnxruntime-gpu from /tmp/ortparts (p1..p4, staged
# by earlier calls) + .gpu/p5, installs .gpu/extra (or /tmp/extra) wheels, checks every import
# up front, exports ResNet-50 and BERT-base with torch, runs `pytest -m gpu tests/gpu`, measures
# the in-process ceiling (loadtest/bench/gpu.py), serves the models with inferd and loads them
# with the harness (native and Open Inference Protocol, closed-loop concurrency sweeps), then
# `inferd serve --workers N` (ResNet-50 with 8 workers; the tiny model at 1, 2, 4, 8), and
# writes JSON, plots and summary.md under $OUT. Every step has its own time limit and the whole
# run a budget (GPU_CHECK_BUDGET_S, default 420 s); a failed step is recorded in
# $OUT/status.txt and the run goes on where it can. Exit status: 0 when every step passed.
#
# GPU_CHECK_REHEARSAL=1 rehearses the whole flow here on the CPU (no install, demo models as
# stand-ins, the python3 first on PATH, e.g. PATH=$PWD/.venv/bin:$PATH): it checks the script,
# not the GPU.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PARTS=${ORT_PARTS:-/tmp/ortparts}
SITE=${GPU_SITE:-/tmp/site}
WORK=${GPU_WORK:-/tmp/inferd-gpu}
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
CARRY_LIMIT_MIB=64
REHEARSAL=${GPU_CHECK_REHEARSAL:-0}
DEVICE=cuda
[[ $REHEARSAL == 1 ]] && DEVICE=cpu

# -- preflight (here, no GPU) ---------------------------------------------------------------

if [[ ${1:-} == --preflight ]]; then
    echo "parts: the workplace's gpu-parts tool, with: pydantic pydantic-settings python-json-logger \\"
    echo "           ml-dtypes nvidia-ml-py \"pytest<8.4\""
    fail=0
    for i in 1 2 3 4 5; do
        if ! ls .gpu/p$i/part-* >/dev/null 2>&1; then
            echo "missing .gpu/p$i: run the gpu-parts tool as above"; fail=1
        fi
    done
    [[ -f .gpu/p5/WHEEL_NAME && -f .gpu/p5/ort.sha256 ]] || { echo "missing .gpu/p5/WHEEL_NAME or ort.sha256"; fail=1; }
    ls .gpu/extra/*.whl >/dev/null 2>&1 || { echo "missing .gpu/extra wheels"; fail=1; }
    [[ $fail == 0 ]] || exit 1
    mib() { du -sbc "$@" | tail -1 | awk '{printf "%.1f", $1 / 1048576}'; }
    # What travels with every call: tracked and untracked files that git does not ignore.
    tree=$(git ls-files -co --exclude-standard -z | python3 -c '
import os, sys
names = [n for n in sys.stdin.buffer.read().split(b"\0") if n]
print(f"{sum(os.path.getsize(n) for n in names if os.path.isfile(n)) / 2**20:.1f}")')
    p5=$(mib .gpu/p5); extra=$(mib .gpu/extra); p1=$(mib .gpu/p1)
    echo "work tree ${tree} MiB, p1 ${p1} MiB, p5 ${p5} MiB, extra ${extra} MiB (limit ${CARRY_LIMIT_MIB} MiB a call)"
    last=$(awk -v a="$tree" -v b="$p5" -v c="$extra" 'BEGIN {printf "%.1f", a + b + c}')
    echo "call 5 (p5 + extra + tree): ${last} MiB"
    for whl in grpcio- pydantic_core- pydantic- pydantic_settings- python_json_logger- ml_dtypes- nvidia_ml_py- pytest-; do
        ls .gpu/extra/${whl}*.whl >/dev/null 2>&1 || { echo "extra wheels lack ${whl%-}: add it to the gpu-parts tool's arguments"; fail=1; }
    done
    [[ $fail == 0 ]] || exit 1
    if awk -v t="$last" -v l="$CARRY_LIMIT_MIB" 'BEGIN {exit !(t < l - 0.5)}'; then
        extra_carry=5
    else
        extra_carry=1
        echo "p5 + extra does not fit one call: carry .gpu/extra with call 1 (copied to /tmp/extra)"
    fi
    echo "device calls (run tool), in order, on one warm machine:"
    for i in 1 2 3 4; do
        carry="[\".gpu/p$i\"]"; extra_cmd=""
        if [[ $i == 1 && $extra_carry == 1 ]]; then
            carry="[\".gpu/p1\", \".gpu/extra\"]"; extra_cmd=" && rm -rf /tmp/extra && cp -r .gpu/extra /tmp/extra"
        fi
        echo "  $i. carry=$carry timeout_s=120 command: mkdir -p /tmp/ortparts && cp .gpu/p$i/part-* /tmp/ortparts/${extra_cmd} && ls -l /tmp/ortparts"
    done
    if [[ $extra_carry == 5 ]]; then carry='[".gpu/p5", ".gpu/extra"]'; else carry='[".gpu/p5"]'; fi
    echo "  5. carry=$carry timeout_s=600 command: bash scripts/gpu_check.sh"
    exit 0
fi

# -- on the device ------------------------------------------------------------------------------

: "${OUT:?OUT must name the results directory (the device machine sets it)}"
mkdir -p "$OUT" "$WORK"
started=$SECONDS
failed=()
log() { printf '[gpu_check %4ds] %s\n' $((SECONDS - started)) "$*" | tee -a "$OUT/gpu_check.log"; }
left() { echo $((BUDGET_S - (SECONDS - started))); }
die() { log "FATAL: $*"; echo "FATAL: $*" >> "$OUT/status.txt"; exit 2; }

# step NAME LIMIT_S COMMAND...: run with a time limit (never past the budget), log to
# $OUT/NAME.log, record the outcome; a failure does not stop the script.
step() {
    local name=$1 limit=$2; shift 2
    local budget; budget=$(( $(left) - 15 ))
    if (( budget < 10 )); then
        log "$name: SKIPPED (budget spent)"; echo "$name skipped-budget" >> "$OUT/status.txt"
        failed+=("$name"); return 0
    fi
    (( limit > budget )) && limit=$budget
    log "$name: start (limit ${limit}s)"
    local t0=$SECONDS rc=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    if (( rc == 0 )); then
        log "$name: ok in $((SECONDS - t0))s"; echo "$name ok $((SECONDS - t0))s" >> "$OUT/status.txt"
    else
        log "$name: FAILED rc=$rc in $((SECONDS - t0))s (tail of $name.log follows)"
        tail -n 15 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
        echo "$name failed rc=$rc $((SECONDS - t0))s" >> "$OUT/status.txt"
        failed+=("$name")
    fi
    return 0
}

: > "$OUT/status.txt"
log "root $ROOT, budget ${BUDGET_S}s"

# 1. onnxruntime-gpu, assembled from the staged parts (skipped when this warm machine has it
#    already).
install_onnxruntime_gpu() {
    [[ -f .gpu/p5/WHEEL_NAME ]] || die ".gpu/p5 is missing: carry .gpu/p5 with this call"
    local wheel extra stamp nparts
    wheel=$(cat .gpu/p5/WHEEL_NAME)
    extra=.gpu/extra
    [[ -d $extra ]] || extra=/tmp/extra
    ls "$extra"/*.whl >/dev/null 2>&1 || die "no extra wheels in .gpu/extra or /tmp/extra: carry .gpu/extra"
    stamp="$SITE/.inferd-$(cat .gpu/p5/ort.sha256)-$(ls "$extra" | sha256sum | cut -c1-16)"
    if [[ -f $stamp ]]; then
        log "onnxruntime-gpu already installed in $SITE"
        return 0
    fi
    nparts=$(ls "$PARTS"/part-* 2>/dev/null | wc -l)
    (( nparts == 4 )) || die "$PARTS holds $nparts parts, expected 4 (part-00..part-03): run the four copy calls first"
    log "assembling $wheel"
    cat "$PARTS"/part-* .gpu/p5/part-* > "/tmp/$wheel"
    echo "$(cat .gpu/p5/ort.sha256)  /tmp/$wheel" | sha256sum -c - >> "$OUT/gpu_check.log" \
        || die "checksum of /tmp/$wheel does not match: a part is missing or stale"
    rm -rf "$SITE"
    timeout 240 python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" \
        "/tmp/$wheel" "$extra"/*.whl > "$OUT/install.log" 2>&1 \
        || { tail -20 "$OUT/install.log"; die "pip install into $SITE failed (install.log)"; }
    rm -f "/tmp/$wheel"
    touch "$stamp"
    log "installed into $SITE"
}

# inferd's packages laid out as `pip install .` installs them (pyproject.toml's package-dir:
# server/inferd -> inferd, loadtest/ -> inferd.loadtest, client/ -> inferd_client, inferd_wire),
# by copying: the device reaches no package index, and a copy needs no build backend there.
stage_inferd() {
    local src=$WORK/src
    rm -rf "$src"
    mkdir -p "$src/inferd/loadtest"
    tar -C server/inferd --exclude=__pycache__ -cf - . | tar -C "$src/inferd" -xf -
    tar -C loadtest --exclude=__pycache__ --exclude=./results -cf - . | tar -C "$src/inferd/loadtest" -xf -
    tar -C client --exclude=__pycache__ -cf - inferd_client inferd_wire | tar -C "$src" -xf -
    echo "$src"
}

if [[ $REHEARSAL == 1 ]]; then
    log "REHEARSAL on the CPU: no install, demo models stand in for the reference models"
    PYTHONPATH=$(stage_inferd)
    export PYTHONPATH
else
    install_onnxruntime_gpu
    SP=$(python3 -c "import site; print(site.getsitepackages()[0])")
    [[ -d $SP/nvidia ]] || die "$SP/nvidia is missing: no CUDA 13 / cuDNN 9 libraries on this image"
    PYTHONPATH=$SITE:$(stage_inferd)
    export PYTHONPATH
    LD_LIBRARY_PATH=$(find "$SP/nvidia" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)
    export LD_LIBRARY_PATH
fi
export PYTHONDONTWRITEBYTECODE=1

# 2. Every import the run needs, up front, with the wheel to add when one is missing.
GPU_SITE=$SITE REHEARSAL=$REHEARSAL timeout 120 python3 - > "$OUT/imports.log" 2>&1 <<'EOF' || { cat "$OUT/imports.log"; die "imports failed (imports.log)"; }
import importlib, sys
wheels = {
    "onnxruntime": "onnxruntime-gpu (.gpu/p1..p5)", "grpc": "grpcio",
    "grpc_health.v1": "grpcio-health-checking", "grpc_reflection.v1alpha": "grpcio-reflection",
    "google.protobuf": "protobuf", "numpy": "numpy (on the image)", "ml_dtypes": "ml-dtypes",
    "pydantic": "pydantic", "pydantic_settings": "pydantic-settings",
    "pythonjsonlogger": "python-json-logger", "opentelemetry.sdk.trace": "opentelemetry-sdk",
    "prometheus_client": "prometheus-client", "pynvml": "nvidia-ml-py", "pytest": "pytest",
    "torch": "torch (on the image)", "torchvision": "torchvision (on the image)",
    "transformers": "transformers (on the image)", "onnx": "onnx (on the image)",
}
import os
rehearsal = os.environ["REHEARSAL"] == "1"
if rehearsal:
    for module in ("torch", "torchvision", "transformers"):
        wheels.pop(module)
missing = []
for module, wheel in wheels.items():
    try:
        importlib.import_module(module)
    except Exception as exc:
        missing.append(f"  {module}: {type(exc).__name__}: {exc}  -> add {wheel}")
if missing:
    print("missing imports (give these to the workplace's gpu-parts tool as EXTRA):")
    print("\n".join(missing))
    sys.exit(1)
import onnxruntime as ort
import inferd.app, inferd.loadtest.cli, inferd.loadtest.bench.gpu  # noqa: E401,F401
import inferd_wire.proto.inferd.v1.predict_pb2, inferd_wire.proto.inference.grpc_service_pb2  # noqa: E401,F401
from inferd.core.runtime.session import cuda_usable
print("python", sys.version.split()[0], "onnxruntime", ort.__version__, ort.__file__)
print("providers", ort.get_available_providers())
site = os.environ["GPU_SITE"]
if rehearsal:
    sys.exit(0)
if not ort.__file__.startswith(site):
    sys.exit(f"onnxruntime comes from {ort.__file__}, not the onnxruntime-gpu in {site}")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("onnxruntime has no CUDAExecutionProvider: the CPU-only build shadows the GPU one")
if not cuda_usable():
    sys.exit("cuda_usable() is False: the driver does not answer (nvidia-smi?)")
EOF
log "imports ok: $(tail -n 2 "$OUT/imports.log" | head -1)"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  python3 -c "import onnxruntime, torch, grpc, numpy; print('onnxruntime', onnxruntime.__version__, '| torch', torch.__version__, torch.version.cuda, '| grpcio', grpc.__version__, '| numpy', numpy.__version__)"
  nproc; git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true; } > "$OUT/device.txt" 2>&1 || true
log "device: $(head -1 "$OUT/device.txt")"

# 3. Reference models, exported on the device.
if [[ $REHEARSAL == 1 ]]; then
    step export 60 python3 scripts/gpu_models.py --out "$WORK" --stand-ins
else
    step export 150 python3 scripts/gpu_models.py --out "$WORK"
fi
MODELS=$WORK/models
REPO=$WORK/repository
export INFERD_GPU_MODELS=$MODELS

# 4. GPU tests.
step gpu_tests 180 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -o addopts= \
    --junitxml "$OUT/gpu_tests.xml"

# 5. In-process ceiling (the figures served throughput is judged against).
if [[ -f $MODELS/resnet50.onnx ]]; then
    step ceiling_resnet50 120 python3 -m inferd.loadtest.bench.gpu ceiling --model "$MODELS/resnet50.onnx" --device $DEVICE \
        --name resnet50 --batches 1,8,32,128 --threads 4 --thread-batches 32 --graph-batches 1,8 \
        --seconds 1.5 --out "$OUT/ceiling_resnet50.json"
fi
if [[ -f $MODELS/bert.onnx ]]; then
    step ceiling_bert 90 python3 -m inferd.loadtest.bench.gpu ceiling --model "$MODELS/bert.onnx" --device $DEVICE \
        --name bert --batches 8,64 --threads 4 --thread-batches 8 --graph-batches "" --seq 128 \
        --seconds 1.5 --out "$OUT/ceiling_bert.json"
fi

# 6. inferd serving them, loaded by the harness.
server_pid=""
stop_server() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM "$server_pid" 2>/dev/null || true
        for _ in $(seq 1 30); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
trap stop_server EXIT

PLOTS=()
python3 -c "import matplotlib" 2>/dev/null || { PLOTS=(--no-plots); log "no matplotlib here: no plots"; }

# loadtest NAME LIMIT_S ARGS...: one harness run into $OUT/served/NAME.
loadtest() {
    local name=$1 limit=$2; shift 2
    local budget=$(( $(left) - 40 ))
    (( limit > budget )) && limit=$budget
    step "served_$name" "$limit" python3 -m inferd.loadtest --quiet "${PLOTS[@]}" --workers 4 \
        --warmup 1.5 --duration 3 --request-timeout 20 --time-limit $((limit - 10)) \
        --out "$OUT/served/$name" "$@"
}

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
if [[ -d $REPO ]]; then
    # Free ports, checked: a second gRPC server on a taken port starts without an error
    # (SO_REUSEPORT) and shares the connections with the first.
    PORT=${GPU_CHECK_PORT:-$(free_port)}
    METRICS_PORT=${GPU_CHECK_METRICS_PORT:-$(free_port)}
    log "starting inferd on 127.0.0.1:$PORT"
    python3 -m inferd.cli serve --model-repository "$REPO" --host 127.0.0.1 --port "$PORT" \
        --metrics-port "$METRICS_PORT" > "$OUT/server.log" 2>&1 &
    server_pid=$!
    ready=0
    for _ in $(seq 1 240); do
        (( $(left) > 60 )) || break
        kill -0 "$server_pid" 2>/dev/null || break
        if python3 -m inferd.cli health --url "127.0.0.1:$PORT" --timeout 2 >/dev/null 2>&1; then
            ready=1; break
        fi
        sleep 0.5
    done
    if (( ready )); then
        log "inferd SERVING after $((SECONDS - started))s"
        timeout 30 python3 -m inferd.cli status --url "127.0.0.1:$PORT" > "$OUT/server_status.txt" 2>&1 || true
        grep -q '^resnet50 ' "$OUT/server_status.txt" \
            || log "WARNING: 127.0.0.1:$PORT does not list resnet50 (server_status.txt)"
        A=127.0.0.1:$PORT
        # Native vs Open Inference Protocol, and shared session vs a session per slot.
        loadtest resnet50_protocols 80 --client-batch 8 --concurrency 4,16,64 --compare \
            "native:$A,model=resnet50,label=native" "oip:$A,model=resnet50,label=oip" \
            "native:$A,model=resnet50_spi,label=native-session-per-slot"
        # Peak throughput: larger requests, fewer round trips.
        loadtest resnet50_peak 40 --client-batch 32 --concurrency 8,24 \
            --target "native:$A,model=resnet50,label=native"
        # Batch-1 latency: CUDA graphs vs none.
        loadtest resnet50_batch1 40 --client-batch 1 --concurrency 1 --workers 1 --compare \
            "native:$A,model=resnet50_graphs,label=cuda-graphs" \
            "native:$A,model=resnet50,label=no-graphs"
        loadtest bert 60 --client-batch 8 --concurrency 4,16,64 --compare \
            "native:$A,model=bert,label=native" "oip:$A,model=bert,label=oip"
        timeout 10 curl -s "http://127.0.0.1:$METRICS_PORT/metrics" > "$OUT/metrics.txt" 2>/dev/null || true
    else
        log "inferd did not become SERVING (server.log follows)"
        tail -n 30 "$OUT/server.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
        echo "serve failed" >> "$OUT/status.txt"; failed+=(serve)
    fi
    stop_server
fi

# 6b. `inferd serve --workers N` (N frontends, one engine holding the models): ResNet-50 with 8
#     workers under resnet50_peak's load, judged like it (report: resnet50@8); then the tiny
#     model at --workers 1, 2, 4, 8 (goal: >= 0.7·N x one process). Run last and failure-safe:
#     whatever happens here, the report below still runs.
serve_workers() {
    local workers=$1 repo=$WORK/repository-workers port metrics ready=0
    if (( $(left) < 100 )); then
        log "resnet50_workers$workers: SKIPPED (budget spent)"
        echo "resnet50_workers$workers skipped-budget" >> "$OUT/status.txt"
        failed+=("resnet50_workers$workers"); return 0
    fi
    rm -rf "$repo" && mkdir -p "$repo" && cp -r "$REPO/resnet50" "$repo/" || return 1
    port=$(free_port) && metrics=$(free_port) || return 1
    log "starting inferd --workers $workers on 127.0.0.1:$port (resnet50 only)"
    python3 -m inferd.cli serve --model-repository "$repo" --host 127.0.0.1 --port "$port" \
        --metrics-port "$metrics" --workers "$workers" > "$OUT/server_workers$workers.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 1 240); do
        (( $(left) > 60 )) || break
        kill -0 "$server_pid" 2>/dev/null || break
        # Up once the supervisor says so (every frontend listening), then SERVING.
        if grep -q "inferd serving" "$OUT/server_workers$workers.log" 2>/dev/null \
            && python3 -m inferd.cli health --url "127.0.0.1:$port" --timeout 2 >/dev/null 2>&1; then
            ready=1; break
        fi
        sleep 0.5
    done
    if (( ready )); then
        log "inferd --workers $workers SERVING"
        loadtest "resnet50_workers$workers" 40 --client-batch 32 --concurrency 8,24 --connections 4 \
            --target "native:127.0.0.1:$port,model=resnet50,label=workers-$workers"
        timeout 10 curl -s "http://127.0.0.1:$metrics/metrics" > "$OUT/metrics_workers$workers.txt" 2>/dev/null || true
    else
        log "inferd --workers $workers did not become SERVING (server_workers$workers.log follows)"
        tail -n 30 "$OUT/server_workers$workers.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log"
    fi
    stop_server
    (( ready ))
}
if [[ -d $REPO/resnet50 ]]; then
    serve_workers 8 || { echo "serve_workers8 failed" >> "$OUT/status.txt"; failed+=(serve_workers8); }
fi
if [[ $REHEARSAL == 1 ]]; then
    scale=(--scale 1,2 --harness-workers 2 --scale-levels 8,32 --quick)
else
    scale=(--scale 1,2,4,8 --harness-workers 6 --connections 4 --scale-levels 64,192)
fi
step workers_scale 150 python3 -m inferd.loadtest.bench.workers "${scale[@]}" --quiet \
    --out "$OUT/workers_scale"

# 7. The table.
report_args=()
for c in "$OUT"/ceiling_*.json; do [[ -f $c ]] && report_args+=(--ceiling "$c"); done
for d in resnet50_protocols resnet50_peak resnet50_batch1 bert; do
    model=${d%%_*}
    report_args+=(--served "$model=$OUT/served/$d")
done
if [[ -d $OUT/served/resnet50_workers8 ]]; then
    report_args+=(--served "resnet50@8=$OUT/served/resnet50_workers8")
fi
step report 30 python3 -m inferd.loadtest.bench.gpu report "${report_args[@]}" --out "$OUT/summary.md"
if [[ -f $OUT/workers_scale/scale.md ]]; then
    { echo; cat "$OUT/workers_scale/scale.md"; } >> "$OUT/summary.md" 2>/dev/null || true
fi
{ echo; echo "## Device"; echo; sed 's/^/    /' "$OUT/device.txt"; echo; echo "## Steps"; echo
  sed 's/^/    /' "$OUT/status.txt"; } >> "$OUT/summary.md" 2>/dev/null || true

log "done in $((SECONDS - started))s; failed: ${failed[*]:-none}"
(( ${#failed[@]} == 0 ))
