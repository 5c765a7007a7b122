#!/usr/bin/env bash
# One self-contained GPU session command: build if needed, log the environment, run stages.
#
#   bash benchmarks/gpu_session.sh STAGE [STAGE ...]
#
# Every invocation, in the repository root:
#   1. builds and installs (pip install --no-build-isolation --no-deps -e ., every CPU core for nvcc
#      and g++) unless the native modules import and match the sources (hash of csrc/, setup.py,
#      pyproject.toml kept in build/gpu_session.stamp);
#   2. writes $OUT/env.json and env.txt: nvidia-smi, nvcc, torch / triton / python versions, the
#      back-end report, the commit (git, else $COMMIT, else "unknown");
#   3. runs the stages in the order given, each step under `timeout`, writing its JSON/CSV, its log
#      and steps.jsonl (command, rc, seconds, budget) into $OUT/<stage>/;
#   4. writes $OUT/report.md (benchmarks/gpu_report.py) and prints its target summary.
# A step's budget is its own cap, cut to what is left of BUDGET seconds for the whole invocation
# (default 560: a command stays under ~9.5 minutes, build included); a step that does not get
# MIN_STEP seconds is recorded as "skipped: out of time". Exit status: 0 if no step failed.
#
# Stages (cap of each step in seconds; QUICK=1 shrinks every case):
#   build        only steps 1-2 (they run for every invocation anyway; cap 300)
#   test         pytest -q -rs, junit xml: the GPU test files (300), then every other test marked
#                gpu (120), then the rest of the suite if at least 150 s are left (else: run `suite`)
#   suite        the rest of the suite: every test outside the GPU files, not marked gpu (540)
#   agg_dense    bench_aggregation --cases mlp10,resnet10,resnet100 --max-time 40 (300)
#   agg_stream   bench_aggregation --cases stream1000 --stream-source device,host (240)
#   agg          agg_dense + agg_stream
#   order        bench_order, N = 400 .. 1e8 (180)
#   eval         bench_eval (fused nested evaluation vs separate forwards) (180), + the torch walk (90)
#   stream       bench_streaming, K=1000 x P=1e8 bf16 from pinned host memory (180)
#   scale        bench_scale --target (1000-client ResNet-18 round; 360), then with the time left
#                the MLP K=10,100,1000 (200) and ResNet-18 K=10,100 (200) sweeps
#   round        bench_round: the simulator's FedRAC MLP round vs the official loop, on ONE CPU thread
#                of the lent machine (it has no --device; no GPU target; synthetic data) (240)
#   extra        bench_sparsify (180), bench_gram (120), bench_submodel_methods (200)
#   all          every stage above but suite, in that order, within BUDGET
#   plan         print the recommended split into commands and exit
#
# Environment:
#   OUT=/tmp/gpu_out output folder          DEVICE=cuda|cpu   (cpu: CPU dry run)
#   PACK=auto|1|0    1: $OUT gets only <name>.tar.gz (the whole tree), <name>_report.md and
#                    <name>_session.log (the lent machine returns at most 8 files); auto = 1 on cuda
#   QUICK=1          tiny cases (a CPU dry run of every command line in a few minutes)
#   BUDGET=560       seconds for the whole invocation (0 = no limit)
#   MIN_STEP=30      a step needing at least this many seconds is skipped below it
#   COMMIT=<sha>     recorded when the tree has no .git
#   BUILD_MODE=pip|inplace|skip   (inplace: python setup.py build_ext --inplace; default pip)
#   FORCE_BUILD=1    rebuild even if the modules import
#   PYTHON=python3   interpreter (default: the first of python3 / python that imports torch)
#   STREAM_P=2e7     P of bench_aggregation's stream1000 case on CUDA (see below)
# Deliberately no `set -e`: every step runs under run_step, which records its status; a failing
# step or stage never stops the later ones.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

# The interpreter that holds torch: $PYTHON, else the first of python3 / python that imports it
# (the GPU machines' image documents `python3` as the one with PyTorch; `python` may be absent).
pick_python() {
    local c
    for c in python3 python; do
        if command -v "$c" >/dev/null 2>&1 && "$c" -c "import torch" >/dev/null 2>&1; then
            echo "$c"
            return
        fi
    done
    echo python3
}
PY=${PYTHON:-$(pick_python)}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
BUDGET=${BUDGET:-560}
MIN_STEP=${MIN_STEP:-30}
RESERVE=${RESERVE:-15}          # seconds kept for the report and the file transfer
BUILD_MODE=${BUILD_MODE:-pip}
# bench_aggregation's stream1000 case sizes its device copy probe on the dense byte model
# (K*P*2 + 8P bytes: two buffers of half that each), i.e. 200 GB at the default P = 1e8, which no
# GPU holds; P = 2e7 (a 40 GB probe + a 4 GB chunk) fits an 80 GB H100 and an H200.
STREAM_P=${STREAM_P:-20000000}
OUT=${OUT:-${TMPDIR:-/tmp}/gpu_out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# The lent machine returns at most 8 files from $OUT (<= 16 MiB each, <= 2 folders deep), far fewer
# than a session writes: with PACK=1 the tree goes to a scratch folder and $OUT receives only
# gs_<time>_<stages>.tar.gz (the whole tree), ..._report.md and ..._session.log.
PACK=${PACK:-auto}
if [[ "$PACK" == auto ]]; then
    if [[ "$DEVICE" == cuda ]]; then PACK=1; else PACK=0; fi
fi
DEST=$OUT
if [[ "$PACK" == 1 ]]; then
    OUT=$(mktemp -d "${TMPDIR:-/tmp}/gpu_session.XXXXXX") || { echo "gpu_session.sh: mktemp failed" >&2; exit 2; }
fi
NPROC=$(nproc 2>/dev/null || echo 4)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

ALL_STAGES=(test agg_dense agg_stream order eval stream scale round extra)
SUITE_MIN=${SUITE_MIN:-150}     # test: the rest of the suite runs only with this many seconds left
FAILED=()
SKIPPED=()
STEP_LINES=()

log() { printf '[gpu_session %4ds] %s\n' "$SECONDS" "$*" | tee -a "$OUT/session.log"; }

usage() {
    sed -n '2,/^# Deliberately/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

plan() {
    cat <<'EOF'
Recommended split (each command < 9.5 min on a fresh machine, build included; ~25 min in all;
the machine keeps the build between commands only while it stays warm):
  COMMIT=<sha> bash benchmarks/gpu_session.sh build test
  COMMIT=<sha> bash benchmarks/gpu_session.sh agg order eval
  COMMIT=<sha> bash benchmarks/gpu_session.sh stream scale
optional, with device time left:
  COMMIT=<sha> bash benchmarks/gpu_session.sh suite
  COMMIT=<sha> bash benchmarks/gpu_session.sh extra round
A stage skipped for lack of time is listed at the end of the run: give it to the next command.
EOF
}

# ---- budgets ------------------------------------------------------------------------------------
# budget_for CAP: the seconds a step may use: CAP, cut to what is left of BUDGET.
budget_for() {
    local cap=$1
    if [[ "$BUDGET" == 0 ]]; then echo "$cap"; return; fi
    local left=$((BUDGET - SECONDS - RESERVE))
    if ((left < cap)); then echo "$left"; else echo "$cap"; fi
}

time_left() {
    if [[ "$BUDGET" == 0 ]]; then echo 999999; else echo $((BUDGET - SECONDS - RESERVE)); fi
}

# record STAGE NAME STATUS RC SECONDS BUDGET NOTE CMD...: one line of $OUT/STAGE/steps.jsonl
record() {
    local stage=$1
    mkdir -p "$OUT/$stage"
    "$PY" - "$OUT/$stage/steps.jsonl" "$SECONDS" "$@" <<'PYEOF' || true
import json, shlex, sys, time
path, at, stage, name, status, rc, secs, budget, note, *cmd = sys.argv[1:]
rec = {"stage": stage, "step": name, "status": status, "rc": int(rc) if rc.lstrip("-").isdigit() else None,
       "seconds": int(secs) if secs.isdigit() else None, "budget_s": int(budget) if budget.lstrip("-").isdigit() else None,
       "note": note, "cmd": shlex.join(cmd), "end": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
       "end_elapsed_s": int(at)}
with open(path, "a") as f:
    f.write(json.dumps(rec) + "\n")
PYEOF
}

# run_step STAGE NAME CAP CMD...: run CMD under timeout; log to $OUT/STAGE/NAME.log
run_step() {
    local stage=$1 name=$2 cap=$3
    shift 3
    local dir="$OUT/$stage"
    mkdir -p "$dir"
    local b
    b=$(budget_for "$cap")
    if ((b < MIN_STEP)); then
        log "[$stage/$name] SKIPPED: out of time (${b}s left of BUDGET=${BUDGET}s)"
        record "$stage" "$name" skipped "" 0 "$b" "out of time: run this stage in a next command" "$@"
        SKIPPED+=("$stage")
        STEP_LINES+=("$(printf '%-11s %-14s %-8s %5s %6s %6s' "$stage" "$name" skipped - - "$b")")
        return 0
    fi
    log "[$stage/$name] start (budget ${b}s): $*"
    local t0=$SECONDS rc=0
    timeout -k 20 "$b" "$@" >"$dir/$name.log" 2>&1 </dev/null || rc=$?
    local dt=$((SECONDS - t0)) status=ok note=""
    if ((rc == 124 || rc == 137)); then
        status=timeout
        note="killed after the ${b}s budget"
    elif ((rc != 0)); then
        status=failed
    fi
    record "$stage" "$name" "$status" "$rc" "$dt" "$b" "$note" "$@"
    STEP_LINES+=("$(printf '%-11s %-14s %-8s %5s %6s %6s' "$stage" "$name" "$status" "$rc" "$dt" "$b")")
    log "[$stage/$name] $status (rc $rc) in ${dt}s; last lines of $stage/$name.log:"
    tail -n "${TAIL_LINES:-25}" "$dir/$name.log" | sed 's/^/    /'
    if [[ "$status" != ok ]]; then FAILED+=("$stage/$name"); fi
    return 0
}

note_step() {  # note_step STAGE NAME NOTE: a stage that is skipped on purpose
    log "[$1/$2] skipped: $3"
    record "$1" "$2" skipped "" 0 "" "$3"
    STEP_LINES+=("$(printf '%-11s %-14s %-8s %5s %6s %6s' "$1" "$2" skipped - - -)")
}

# ---- build --------------------------------------------------------------------------------------
src_hash() {
    {
        find csrc -type f | LC_ALL=C sort | xargs sha256sum
        sha256sum setup.py pyproject.toml
        echo "device=$DEVICE arch=${FEDRAC_CUDA_ARCH:-90} native=${FEDRAC_NATIVE_ARCH:-0}"
    } | sha256sum | cut -c1-16
}

# the native modules import, from this tree (an editable install of another checkout could
# otherwise serve its own build)
modules_import() {
    local mods=_cpu
    if [[ "$DEVICE" == cuda ]]; then mods="_cpu _cuda"; fi
    "$PY" - "$ROOT" $mods >/dev/null 2>&1 <<'PYEOF'
import importlib, os, sys
root = os.path.realpath(sys.argv[1]) + os.sep
for name in sys.argv[2:]:
    mod = importlib.import_module("fedrac_kernels." + name)
    if not os.path.realpath(mod.__file__).startswith(root):
        sys.exit(f"{mod.__file__} is outside {root}")
PYEOF
}

ensure_build() {
    mkdir -p build "$OUT/build"
    local stamp=build/gpu_session.stamp want why=""
    want=$(src_hash)
    if [[ "$BUILD_MODE" == skip ]]; then
        note_step build build "BUILD_MODE=skip"
        return 0
    fi
    if [[ "${FORCE_BUILD:-0}" == 1 ]]; then
        why="FORCE_BUILD=1"
    elif ! modules_import; then
        why="native modules not importable"
    elif [[ -f "$stamp" && "$(cat "$stamp")" != "$want" ]]; then
        why="sources changed since the last build"
    fi
    if [[ -z "$why" ]]; then
        log "[build] native modules import and match the sources: no build"
        record build build ok 0 0 "" "up to date (no build)"
        STEP_LINES+=("$(printf '%-11s %-14s %-8s %5s %6s %6s' build build uptodate 0 0 -)")
        return 0
    fi
    log "[build] building ($why), $NPROC parallel compiler jobs"
    local -a envs=(env FEDRAC_NVCC_JOBS="$NPROC" FEDRAC_CXX_JOBS="$NPROC" MAX_JOBS="$NPROC")
    if [[ "$DEVICE" == cuda ]]; then
        envs+=(FEDRAC_BUILD_CUDA="${FEDRAC_BUILD_CUDA:-1}")
    else
        envs+=(FEDRAC_BUILD_CUDA="${FEDRAC_BUILD_CUDA:-0}")   # CPU dry run: the C++ module only
    fi
    local ok=0
    if [[ "$BUILD_MODE" == pip ]]; then
        run_step build pip_install 300 "${envs[@]}" "$PY" -m pip install --no-build-isolation --no-deps -e .
        if modules_import; then
            ok=1
        else
            log "[build] pip install did not give importable modules: python setup.py build_ext --inplace"
        fi
    fi
    if ((ok == 0)); then
        run_step build build_ext 300 "${envs[@]}" "$PY" setup.py build_ext --inplace
        modules_import && ok=1
    fi
    if ((ok == 1)); then
        echo "$want" >"$stamp"
        log "[build] ok"
    else
        log "[build] FAILED: the native modules still do not import (see $OUT/build/*.log)"
        FAILED+=("build/import")
    fi
}

# ---- environment --------------------------------------------------------------------------------
write_env() {
    local commit="${COMMIT:-}"
    if git rev-parse --short HEAD >/dev/null 2>&1; then
        commit=$(git rev-parse --short HEAD)
        if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then commit="$commit+dirty"; fi
    fi
    commit=${commit:-unknown}
    local smi="nvidia-smi: not found" smiq="" nvccv="nvcc: not found"
    if command -v nvidia-smi >/dev/null 2>&1; then
        smi=$(nvidia-smi 2>&1 || true)
        smiq=$(nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max,clocks.max.sm,clocks.max.memory,power.limit --format=csv 2>&1 || true)
    fi
    if command -v nvcc >/dev/null 2>&1; then nvccv=$(nvcc --version 2>&1 | tail -n 2 || true); fi
    SMI="$smi" SMIQ="$smiq" NVCCV="$nvccv" GS_COMMIT="$commit" GS_ARGS="$*" "$PY" - "$OUT" <<'PYEOF' || log "env.json: FAILED"
import datetime, json, os, platform, sys
out = sys.argv[1]
env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "out": out,
       "root": os.getcwd(),
       "commit": os.environ["GS_COMMIT"], "stages": os.environ["GS_ARGS"].split(),
       "device_kind": os.environ.get("DEVICE", "cuda"), "quick": os.environ.get("QUICK", "0") == "1",
       "budget_s": int(os.environ.get("BUDGET", "560")), "host": platform.node(), "python": platform.python_version(),
       "cpu_count": os.cpu_count(), "nvidia_smi": os.environ["SMI"], "nvidia_smi_query": os.environ["SMIQ"],
       "nvcc": os.environ["NVCCV"]}
try:
    with open("/proc/cpuinfo") as f:
        env["cpu"] = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "")
except OSError:
    pass
try:
    import torch
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(p.total_memory / 2**30, 1),
                   gpu_sm_count=p.multi_processor_count, gpu_capability=f"{p.major}.{p.minor}",
                   gpu_l2_mib=round(getattr(p, "L2_cache_size", 0) / 2**20, 1))
except Exception as exc:
    env["torch"] = f"import failed: {exc}"
try:
    import triton
    env["triton"] = triton.__version__
except Exception as exc:
    env["triton"] = f"unavailable: {type(exc).__name__}"
try:
    import fedrac_kernels as fk
    env["backends"] = fk.backend_report()
    from fedrac_kernels.backends import cpu as cb
    if cb.available()[0]:
        env["cpu_backend"] = cb.build_info()
except Exception as exc:
    env["backends"] = f"fedrac_kernels import failed: {exc}"
with open(os.path.join(out, "env.json"), "w") as f:
    json.dump(env, f, indent=1, default=str)
with open(os.path.join(out, "env.txt"), "w") as f:
    for k, v in env.items():
        if k not in ("nvidia_smi",):
            f.write(f"{k}: {v}\n")
    f.write("\n" + env["nvidia_smi"] + "\n")
print(f"env: {env.get('gpu', env.get('cpu'))}, torch {env.get('torch')}, triton {env.get('triton')}, "
      f"commit {env['commit']}")
print(f"backends: {env.get('backends')}")
PYEOF
}

# ---- stages -------------------------------------------------------------------------------------
quick() { [[ "$QUICK" == 1 ]]; }

TEST_FILES=(tests/test_backend_cuda.py tests/test_cuda_build.py tests/test_backend_triton.py tests/test_streaming.py
            tests/test_library.py tests/test_triton_aot.py tests/test_api.py)
TEST_IGNORES=()
for _f in "${TEST_FILES[@]}"; do TEST_IGNORES+=("--ignore=$_f"); done

stage_test() {
    local d="$OUT/test" f
    local -a files=("${TEST_FILES[@]}")
    if quick; then
        files=(tests/test_library.py tests/test_triton_aot.py)   # the CPU dry run: two quick files
    fi
    # junit_<step>.xml next to <step>.log (gpu_report.py reads the log when a cut step wrote no xml)
    run_step test named 300 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$d/junit_named.xml" "${files[@]}"
    # every other test marked gpu (tests/conftest.py skips them without a GPU; pyproject: markers)
    run_step test gpu_marked 120 "$PY" -m pytest -q -rs -p no:cacheprovider -m gpu --junitxml="$d/junit_gpu_marked.xml" \
        tests "${TEST_IGNORES[@]}"
    if quick; then
        note_step test suite "QUICK=1: the rest of the suite is not run (stage suite runs it)"
    elif (($(time_left) >= SUITE_MIN)); then
        stage_suite
    else
        note_step test suite "$(time_left)s left (< SUITE_MIN=${SUITE_MIN}s): run \`bash benchmarks/gpu_session.sh suite\`"
        SKIPPED+=(suite)
    fi
}

# the rest of the suite: not the GPU files, not marked gpu (those ran in stage test)
stage_suite() {
    local d="$OUT/test"
    if quick; then
        run_step test suite 120 "$PY" -m pytest -q -rs -p no:cacheprovider --junitxml="$d/junit_suite.xml" \
            tests/test_layout.py
    else
        run_step test suite 540 "$PY" -m pytest -q -rs -p no:cacheprovider -m "not gpu" \
            --junitxml="$d/junit_suite.xml" tests "${TEST_IGNORES[@]}"
    fi
}

stage_agg_dense() {
    local d="$OUT/agg"
    if quick; then
        run_step agg dense 240 "$PY" -m benchmarks.bench_aggregation --device "$DEVICE" \
            --cases mlp10,resnet10,resnet100 --resnet-width 0.05 --reps 3 --warmup 1 --max-time 5 --out "$d/dense"
    else
        run_step agg dense 300 "$PY" -m benchmarks.bench_aggregation --device "$DEVICE" \
            --cases mlp10,resnet10,resnet100 --max-time 40 --out "$d/dense"
    fi
}

stage_agg_stream() {
    local d="$OUT/agg"
    if quick; then
        run_step agg stream 120 "$PY" -m benchmarks.bench_aggregation --device "$DEVICE" --cases stream1000 \
            --stream-source device,host --stream-K 20 --stream-P 100000 --stream-chunk 5 --reps 3 --max-time 5 \
            --out "$d/stream"
    else
        run_step agg stream 240 "$PY" -m benchmarks.bench_aggregation --device "$DEVICE" --cases stream1000 \
            --stream-source device,host --stream-P "$STREAM_P" --max-time 30 --out "$d/stream"
    fi
}

stage_order() {
    if quick; then
        run_step order order 120 "$PY" -m benchmarks.bench_order --device "$DEVICE" --sizes 400,10000 --reps 3 \
            --max-time 5 --out "$OUT/order"
    else
        run_step order order 180 "$PY" -m benchmarks.bench_order --device "$DEVICE" --max-time 20 --out "$OUT/order"
    fi
}

stage_eval() {
    if quick; then
        run_step eval eval 120 "$PY" -m benchmarks.bench_eval --device "$DEVICE" --mlp-batch 200 --resnet-batch 4 \
            --resnet-candidates 4 --reps 1 --resnet-reps 1 --out "$OUT/eval/eval.json"
    else
        mkdir -p "$OUT/eval"
        run_step eval eval 180 "$PY" -m benchmarks.bench_eval --device "$DEVICE" --out "$OUT/eval/eval.json"
        # the same MLP case with the torch walk instead of the one-launch Triton walk (not judged:
        # walk_torch.json is for comparing the two by hand)
        run_step eval walk_torch 90 env FEDRAC_EVAL_WALK=torch "$PY" -m benchmarks.bench_eval --device "$DEVICE" \
            --cases mlp --out "$OUT/eval/walk_torch.json"
    fi
}

stage_stream() {
    mkdir -p "$OUT/stream"
    if quick; then
        # without a GPU bench_streaming prints why and exits 0 (no JSON): this checks the command line
        run_step stream streaming 60 "$PY" benchmarks/bench_streaming.py --device "$DEVICE" --clients 16 \
            --params 100000 --chunk-clients 4 --reps 1 --kernel-reps 2 --json "$OUT/stream/streaming.json"
    else
        run_step stream streaming 180 "$PY" benchmarks/bench_streaming.py --device "$DEVICE" \
            --json "$OUT/stream/streaming.json"
    fi
}

stage_scale() {
    local d="$OUT/scale" b ct
    if quick; then
        # --target is fixed at 1000 ResNet-18 clients: on the CPU the same flags run 4 clients
        run_step scale target 150 "$PY" benchmarks/bench_scale.py --device "$DEVICE" --models resnet18 --clients 4 \
            --rounds 1 --nproc 0 --train-size 200 --test-size 50 --case-timeout 120 --out "$d/target"
        run_step scale mlp 90 "$PY" benchmarks/bench_scale.py --device "$DEVICE" --models mlp --clients 10 \
            --rounds 1 --nproc 0 --train-size 500 --test-size 100 --case-timeout 60 --out "$d/mlp"
        return 0
    fi
    # two cases (sequential, then batched), each in its own process; bench_scale raises (and writes
    # no JSON) when a case exceeds --case-timeout, so each case gets under half of the step's budget
    b=$(budget_for 360)
    ct=$(((b - 20) / 2))
    if ((ct < 60)); then ct=60; fi
    run_step scale target 360 "$PY" benchmarks/bench_scale.py --device "$DEVICE" --target --rounds 3 \
        --case-timeout "$ct" --out "$d/target"
    b=$(budget_for 200)
    ct=$(((b - 20) / 6))
    if ((ct < 30)); then ct=30; fi
    run_step scale mlp 200 "$PY" benchmarks/bench_scale.py --device "$DEVICE" --models mlp --clients 10,100,1000 \
        --nproc 0 --case-timeout "$ct" --out "$d/mlp"
    b=$(budget_for 200)
    ct=$(((b - 20) / 4))
    if ((ct < 30)); then ct=30; fi
    run_step scale resnet18 200 "$PY" benchmarks/bench_scale.py --device "$DEVICE" --models resnet18 \
        --clients 10,100 --nproc 0 --case-timeout "$ct" --out "$d/resnet18"
}

stage_round() {
    # a CPU benchmark (no --device): the simulator's round vs the official loop on one thread of the
    # lent machine's CPU; no GPU target, recorded for completeness
    mkdir -p "$OUT/round"
    if quick; then
        run_step round round 120 "$PY" benchmarks/bench_round.py --rounds 2 --synthetic --logging paper \
            --json "$OUT/round/round.json"
    else
        run_step round round 240 "$PY" benchmarks/bench_round.py --rounds 4 --synthetic --logging paper \
            --json "$OUT/round/round.json"
    fi
}

stage_extra() {
    local d="$OUT/extra"
    mkdir -p "$d"
    if quick; then
        run_step extra sparsify 60 "$PY" -m benchmarks.bench_sparsify --device "$DEVICE" --cases mlp10 --reps 2 \
            --warmup 1 --max-time 3 --threads 1 --out "$d/sparsify"
        run_step extra gram 60 "$PY" -m benchmarks.bench_gram --device "$DEVICE" --cases mlp --reps 1 --out "$d/gram"
        run_step extra submodel 60 "$PY" -m benchmarks.bench_submodel_methods --device "$DEVICE" --models mlp \
            --methods heterofl --K 10 --repeats 1 --no-memory --out "$d/submodel_methods.json"
    else
        run_step extra sparsify 180 "$PY" -m benchmarks.bench_sparsify --device "$DEVICE" \
            --cases mlp10,resnet10,mlp100 --max-time 20 --out "$d/sparsify"
        run_step extra gram 120 "$PY" -m benchmarks.bench_gram --device "$DEVICE" --out "$d/gram"
        run_step extra submodel 200 "$PY" -m benchmarks.bench_submodel_methods --device "$DEVICE" \
            --out "$d/submodel_methods.json"
    fi
}

# ---- main ---------------------------------------------------------------------------------------
if (($# == 0)); then usage; exit 2; fi
STAGES=()
for s in "$@"; do
    case "$s" in
        -h|--help|help) usage; exit 0 ;;
        plan) plan; exit 0 ;;
        all) STAGES+=("${ALL_STAGES[@]}") ;;
        agg) STAGES+=(agg_dense agg_stream) ;;
        build|test|suite|agg_dense|agg_stream|order|eval|stream|scale|round|extra) STAGES+=("$s") ;;
        *) echo "gpu_session.sh: unknown stage '$s' (see --help)" >&2; exit 2 ;;
    esac
done
if [[ "$DEVICE" != cuda && "$DEVICE" != cpu ]]; then echo "gpu_session.sh: DEVICE must be cuda or cpu" >&2; exit 2; fi

log "stages: ${STAGES[*]} | DEVICE=$DEVICE QUICK=$QUICK BUDGET=${BUDGET}s OUT=$OUT"
ensure_build
write_env "${STAGES[@]}"
for s in "${STAGES[@]}"; do
    [[ "$s" == build ]] && continue
    "stage_$s"
done

log "report: $OUT/report.md"
"$PY" benchmarks/gpu_report.py "$OUT" >"$OUT/report.md" 2>"$OUT/report.err" || log "gpu_report.py failed (see report.err)"
"$PY" benchmarks/gpu_report.py --targets-only "$OUT" 2>/dev/null || true

echo
printf '%-11s %-14s %-8s %5s %6s %6s\n' stage step status rc secs budget
printf '%s\n' "${STEP_LINES[@]}"
if ((${#SKIPPED[@]})); then
    mapfile -t todo < <(printf '%s\n' "${SKIPPED[@]}" | awk '!seen[$0]++')
    log "out of time for: ${todo[*]} -> next command: bash benchmarks/gpu_session.sh ${todo[*]}"
fi
if [[ "$PACK" == 1 ]]; then
    name="gs_$(date -u +%Y%m%dT%H%M%SZ)_$(IFS=-; echo "${STAGES[*]}")"
    name=${name//[^A-Za-z0-9._-]/_}
    cp "$OUT/report.md" "$DEST/${name}_report.md" 2>/dev/null || true
    cp "$OUT/session.log" "$DEST/${name}_session.log" 2>/dev/null || true
    if tar czf "$DEST/$name.tar.gz" -C "$OUT" . 2>"$DEST/${name}_tar.err"; then
        rm -f "$DEST/${name}_tar.err"
        log "packed: $DEST/$name.tar.gz ($(du -h "$DEST/$name.tar.gz" | cut -f1)); report: $DEST/${name}_report.md"
    else
        log "tar FAILED (see $DEST/${name}_tar.err); the unpacked tree is in $OUT"
        FAILED+=("pack")
    fi
fi
log "done in ${SECONDS}s; outputs in $DEST"
if ((${#FAILED[@]})); then
    log "FAILED steps: ${FAILED[*]}"
    exit 1
fi
exit 0
