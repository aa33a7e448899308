#!/usr/bin/env bash
# The GPU check, in one call of at most 5 minutes on an H200 with 16 cores, with the extension
# built on a CPU machine beforehand (tools/prebuilt_cuda.py; with the machine's start, two such
# calls and a short rerun fit a session's 15 minutes of device time):
#
#   stage       limit  what                                                        kernels
#   env           15 s  nvidia-smi, torch/CUDA/nvcc versions, revision              -
#   build        100 s  tools/cuda_library.sh: the prebuilt library (.prebuilt-cuda,  -
#                       carried) where its stamp fits these sources, this torch and
#                       this GPU and it runs an IDD step: about 15 s; else the
#                       extension with CUDA, in place (sm_90, MAX_JOBS=nproc)
#                       (then, in the background: torch.compile of the perf rows' references)
#   tests        115 s  the GPU tests (-m gpu), xdist -n 10, first files 1st  } run    default
#   tests-next   115 s  with next: the same tests -n 10, tests then -n 4      } side   IDD_OPS_NEXT_SET
#   demo         115 s  the demo's quick preset on the GPU                    } by side the newest set
#   perf         100 s  report --guard: key rows, fused (each set), eager reference,
#                       torch.compile(reference), bound; fails on a guard or target miss  each
#   train         50 s  real training step (torchvision DeepLabV3-R101 / R50, B=8,
#                       512x1024, bf16): each loss's cost per step, fused vs reference    each
#   in all       280 s  and the build (15 + 115 + 100 + 50; the three middle stages share one 115 s
#                       window): 300 s with the prebuilt library, 380 s building there
#
#   KERNELS names the kernel sets checked: "default", or "default next" while GPU code is behind
#   IDD_OPS_CUDA_NEXT (csrc/common/cuda_next.h); then tests-next runs beside tests, the demo takes
#   the next set, and perf and train time both. The test stages give the candidate set (next, or
#   default alone) most workers. On 2026-11-30 the 1511 GPU
#   tests did not finish in 150 s even alone with 15 workers (818 ran). The likeliest costs, both
#   changed since: the CUDA gradchecks (fast mode now) and 15 workers of 16 torch threads each on
#   16 cores (one thread each now). The tests that compile (torch.compile, opcheck, CUDA graphs)
#   run first, handed out one at a time (IDD_OPS_SLOW_FIRST, tests/conftest.py); the rest in the
#   order of the files in FIRST below, so a time limit cuts the broad parametrisations, and each
#   stage's per-test log (tests/result_log.py) says what ran, what failed with how it ended, and
#   the slowest tests.
#   perf and train run one child process per kernel set (2:1 and 3:2 of their time); a child
#   stopped at its share still reports the rows it finished.
#
#   bash tools/gpu_check.sh                       # every stage
#   bash tools/gpu_check.sh --only tests,perf     # a subset (build added if the extension is not built)
#   bash tools/gpu_check.sh --skip train          # all but these
#   bash tools/gpu_check.sh --dry-run             # anywhere: every stage's prerequisites, nothing run
#   bash tools/gpu_check.sh --list                # the stages and their limits
#
# Output ($OUT, default ./gpu-check-out): summary.md (every stage's status and time, test counts
# and failures, the perf table and every target missed, the training-step table, the end of each
# failed stage's log), RESULTS-cuda.md, TRAIN_STEP-cuda.md, perf.json and logs.tar.gz (every
# log; the logs are written to $LOGS, default a new /tmp/gpu-check-logs.*). Five files: the device tool
# brings back at most 8. The summary is printed at the end. Exit status: the number of failed stages.
# Limits can be overridden: ENV_S BUILD_S TESTS_S PERF_S TRAIN_S (seconds); WORKERS and
# DEFAULT_WORKERS (xdist workers of the candidate set's stage and of tests beside tests-next, 10
# and 4); GPU_TESTS (the test stages' selection, default: every GPU test; paths or ids split on
# spaces, or one a line where an id has a space); GPU_TESTS_FILE (instead: a file of ids, one a
# line, as tools/gpu_rerun.py writes the tests a cut-short stage left); PERF_CASES (the perf
# stage's cases, one a line, default: the guard's rows, e.g. those a call cut short left); KERNELS
# ("default next", or "default" where nothing is behind IDD_OPS_CUDA_NEXT); IDD_OPS_NEXT_SET (the
# next set's IDD_OPS_CUDA_NEXT, default 1: every group; "all,-skd" or "skd,ifvd" checks some of
# its groups, csrc/common/next_groups.h, where one failed; no spaces); REV (the revision to name,
# ahead of git's: the device's copy may hold no .git, or a stale one that names another revision;
# the dry run prints the call with it).
set -uo pipefail
cd "$(dirname "$0")/.."

STAGES=(env build tests tests-next demo perf train)
OUT=${OUT:-$PWD/gpu-check-out}
PY=${PYTHON:-python3}
ENV_S=${ENV_S:-15} BUILD_S=${BUILD_S:-100} TESTS_S=${TESTS_S:-115} PERF_S=${PERF_S:-100} TRAIN_S=${TRAIN_S:-50}
WORKERS=${WORKERS:-10} DEFAULT_WORKERS=${DEFAULT_WORKERS:-4}
KERNELS=${KERNELS:-default next}  # "default" alone where nothing is behind IDD_OPS_CUDA_NEXT
# the next set's IDD_OPS_CUDA_NEXT (its groups: csrc/common/next_groups.h), for the benchmarks too
export IDD_OPS_NEXT_SET=${IDD_OPS_NEXT_SET:-1}
has_next() { [[ " $KERNELS " == *" next "* ]]; }
nonblank_lines() { printf '%s\n' "$1" | sed '/^ *$/d'; }  # TEXT: its lines, blank ones dropped
perf_cases=()  # PERF_CASES: case names, one a line (names have spaces); default the guard's rows
[ -n "${PERF_CASES:-}" ] && mapfile -t perf_cases < <(nonblank_lines "$PERF_CASES")
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/idd-ops-inductor-cache}

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
DRY=0 ONLY="" SKIP=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="${2:-}"; shift ;;
    --skip) SKIP="${2:-}"; shift ;;
    --list) usage | sed -n '/^  stage  *limit/,/^$/p'; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
ONLY=${ONLY//,/ } SKIP=${SKIP//,/ }
for s in $ONLY $SKIP; do
  [[ " ${STAGES[*]} " == *" $s "* ]] || { echo "unknown stage: $s (stages: ${STAGES[*]})" >&2; exit 2; }
done
[ -z "${GPU_TESTS_FILE:-}" ] || [ -s "$GPU_TESTS_FILE" ] ||
  { echo "GPU_TESTS_FILE: no such file, or empty: $GPU_TESTS_FILE (carried with the call?)" >&2; exit 2; }
# a next set the switch cannot read would fail every next test minutes in, and one of no group
# would run the default set twice: both refused here (spaces too, which the commands would split)
NEXT_CHECK="import importlib.util as u, sys
s = u.spec_from_file_location('switches', 'idd_ops/_switches.py'); m = u.module_from_spec(s); s.loader.exec_module(m)
sys.exit(not m.next_groups(sys.argv[1]) and bool(m.NEXT_GROUPS))"
has_next && { [[ "$IDD_OPS_NEXT_SET" == *[[:space:]]* ]] || ! "$PY" -c "$NEXT_CHECK" "$IDD_OPS_NEXT_SET"; } &&
  { echo "IDD_OPS_NEXT_SET: '$IDD_OPS_NEXT_SET' is no next set (groups of csrc/common/next_groups.h, comma-separated" \
      "without spaces, at least one; the error above, if any)" >&2; exit 2; }
[[ " $ONLY " == *" tests-next "* ]] && ! has_next &&
  { echo "tests-next runs the next kernel set: KERNELS must name it (KERNELS=\"default next\")" >&2; exit 2; }
selected() {
  [ "$1" = tests-next ] && ! has_next && return 1  # nothing is behind IDD_OPS_CUDA_NEXT
  { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]]; } && [[ " $SKIP " != *" $1 "* ]]
}

LOGS=${LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-logs.XXXXXX")}
mkdir -p "$OUT" "$LOGS"; rm -f "$LOGS"/stages "$LOGS"/*.status "$LOGS"/*.log "$LOGS"/*.section.md "$LOGS"/*.xml "$LOGS"/*.jsonl \
  "$LOGS"/*.cmd "$LOGS"/dry-run.problems "$LOGS"/prebuilt.check "$LOGS"/demo-results.md "$LOGS"/*.pid "$LOGS"/stopped
rm -f "$OUT"/summary.md "$OUT"/logs.tar.gz "$OUT"/RESULTS-cuda.md "$OUT"/TRAIN_STEP-cuda.md "$OUT"/perf.json
echo "$(date -u +%FT%TZ) dry=$DRY only=${ONLY:-all} skip=${SKIP:-none} kernels=${KERNELS// /,}" \
  "next=$IDD_OPS_NEXT_SET rev=${REV:-unset}" > "$LOGS/check.info"
START=$SECONDS

finish() {  # the summary from what $LOGS holds; the logs packed into $OUT; both safe to run twice,
  # and each file written whole before it replaces the last (a kill midway leaves the one before)
  "$PY" tools/gpu_check_summary.py "$LOGS" "$OUT/.summary.md" $((SECONDS - START)) &&
    mv -f "$OUT/.summary.md" "$OUT/summary.md" || echo "summary failed" >&2
  tar -czf "$OUT/.logs.tar.gz" -C "$LOGS" . 2> /dev/null; mv -f "$OUT/.logs.tar.gz" "$OUT/logs.tar.gz"
}
# A signal (the device tool's time limit) stops every stage: each running stage's timeout process
# is in $LOGS/NAME.pid (it leads its own process group, which the signal does not reach).
on_signal() {
  echo "stopped by a signal after $((SECONDS - START)) s" > "$LOGS/stopped"
  # shellcheck disable=SC2046  # lists of process ids
  kill $(cat "$LOGS"/*.pid 2> /dev/null) $(jobs -p) 2> /dev/null
  finish; exit 130
}
trap on_signal INT TERM
# every_20s PID...: waits for the processes (polling every 0.2 s); in the main shell, the summary
# and the logs packed every 20 s meanwhile, so that a call cut short brings back what ran so far.
every_20s() {
  local n=0 pid
  for pid in "$@"; do
    while kill -0 "$pid" 2> /dev/null; do
      sleep 0.2
      [ "$BASHPID" = "$$" ] && [ $((++n % 100)) = 0 ] && finish
    done
  done
}

# stage NAME LIMIT CMD...: runs CMD under a time limit, log in $LOGS/NAME.log, status in
# $LOGS/NAME.status ("rc seconds limit"), the order of stages in $LOGS/stages.
stage() {
  local name=$1 limit=$2 t0=$SECONDS; shift 2
  echo "$name" >> "$LOGS/stages"
  printf '%q ' "$@" > "$LOGS/$name.cmd"
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOGS/$name.log"
  if [ "$DRY" = 1 ]; then
    echo "dry 0 $limit" > "$LOGS/$name.status"
    return 0
  fi
  [ "$BASHPID" = "$$" ] && finish  # the stage named as running in the summary, should the call be cut short
  # in the background, waited for: a signal's trap then runs at once, not when the stage ends
  timeout --kill-after=5 "$limit" "$@" >> "$LOGS/$name.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$LOGS/$name.pid"
  every_20s "$pid"
  wait "$pid"
  local rc=$?
  rm -f "$LOGS/$name.pid"
  echo "$rc $((SECONDS - t0)) $limit" > "$LOGS/$name.status"
  [ $rc -eq 0 ] && echo "   $name passed in $((SECONDS - t0)) s" || echo "   $name FAILED (rc $rc) in $((SECONDS - t0)) s"
  return $rc
}

# ---- the dry run's checks: each stage's files, tools and Python entry points
if [ "$DRY" = 1 ]; then
  {
    for f in setup.py tools/gpu_check_summary.py; do [ -f "$f" ] || echo "missing: $f"; done
    for tool in timeout tar; do command -v $tool > /dev/null || echo "missing: $tool"; done
    if selected build; then
      "$PY" -c "import torch.utils.cpp_extension as c; c.verify_ninja_availability()" 2> /dev/null || echo "missing: ninja"
    fi
    for pair in perf:benchmarks.report train:benchmarks.train_step demo:idd_ops.demo.cli; do
      selected "${pair%%:*}" || continue
      "$PY" -m "${pair#*:}" --help > /dev/null || echo "broken: python -m ${pair#*:} --help"
    done
    if selected perf || selected train; then
      "$PY" -m benchmarks.targets > "$LOGS/targets.md" || echo "broken: python -m benchmarks.targets"
    fi
    if selected perf && [ ${#perf_cases[@]} -gt 0 ]; then
      "$PY" -c 'import sys; from benchmarks import cases
unknown = [c for c in sys.argv[1:] if c not in cases.CUDA_FULL + cases.GUARD]
sys.exit(f"PERF_CASES: unknown cases {unknown}" if unknown else 0)' "${perf_cases[@]}"
    fi
    if selected build; then  # not a problem when it does not fit: the stage then builds there
      "$PY" tools/prebuilt_cuda.py use --check --sources-only > "$LOGS/prebuilt.check" 2>&1
    fi
  } > "$LOGS/dry-run.problems" 2>&1
  cat "$LOGS/dry-run.problems"
  [ -f "$LOGS/prebuilt.check" ] && cat "$LOGS/prebuilt.check"
  # the device's copy has no .git: the revision goes in the call, written out here (as the reports name it)
  echo "the call on the device: REV='$("$PY" -c 'from benchmarks import common; print(common.revision())')'" \
    "bash tools/gpu_check.sh"
fi

# ---- the stages
ENV_PY='import importlib, importlib.metadata, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "GPU visible:", torch.cuda.is_available())
for module, dist in (("torchvision", "torchvision"), ("xdist", "pytest-xdist"), ("pytest_timeout", "pytest-timeout")):
    try:
        importlib.import_module(module)
        print(dist, importlib.metadata.version(dist))
    except Exception as error:
        print(dist, "missing:", error)'
if selected env; then
  stage env "$ENV_S" bash -c "nvidia-smi; nproc; free -g | head -2; \
    if [ -n \"\${REV:-}\" ]; then echo \"revision: \$REV\"; \
    else (git rev-parse HEAD && git status --short | head -20) 2> /dev/null || echo 'revision: unknown (no .git)'; fi; \
    nvcc --version | tail -2; $PY -c '$ENV_PY'"
fi

# The build runs when asked, or when a later stage needs it and the extension lacks its CUDA kernels
# or was built from other sources than these (a rerun on a warm machine after a fix here: the
# library of the call before stays in idd_ops/, as ignored files do).
need_build=0
if selected build; then need_build=1
elif [ "$DRY" = 0 ] && { selected tests || selected tests-next || selected demo || selected perf || selected train; } &&
     ! "$PY" tools/prebuilt_cuda.py built; then  # says why
  echo "building first"; need_build=1
fi

if [ $need_build = 1 ]; then  # the prebuilt library where it fits and runs, else built (tools/cuda_library.sh)
  stage build "$BUILD_S" env PYTHON="$PY" bash tools/cuda_library.sh \
    || { finish; cat "$OUT/summary.md"; echo "the build failed: no later stage can run"; exit 1; }
  finish
fi

# torch.compile of the perf rows' references, in the background while the tests run (after the
# build, whose nvcc jobs it would slow where the prebuilt library does not fit):
# it fills the on-disk inductor cache, from which the perf stage then compiles in about a second a case.
WARM_PID=""
if selected perf && [ "$DRY" = 0 ]; then
  timeout "$TESTS_S" "$PY" -m benchmarks.report --device cuda --guard --warm-compile \
    ${perf_cases[@]+--cases "${perf_cases[@]}"} \
    > "$LOGS/compile-warm.log" 2>&1 &
  WARM_PID=$!
fi

# Tests (each kernel set) and the demo run side by side: none of them is timed.
# The test files in the order a time limit should cut them: the CUDA-specific checks first, the
# large parametrisations of code the other files reach too last (xdist hands out tests in order).
FIRST="cuda_runtime cuda_parity fuzz cosine_slots precision many_classes centroids distance idd_loss class_sums sums_path
  label_paths baselines skd_formulations position training api bad_input"
LAST="kernel_shapes compile cuda_compile op_args idd_tail"
ordered_tests() {
  local f name listed; listed=" $(echo $FIRST $LAST) "  # one space between names
  for name in $FIRST; do [ -f "tests/test_$name.py" ] && echo "tests/test_$name.py"; done
  for f in tests/test_*.py; do name=${f#tests/test_}; name=${name%.py}
    [[ "$listed" == *" $name "* ]] || echo "$f"; done
  for name in $LAST; do [ -f "tests/test_$name.py" ] && echo "tests/test_$name.py"; done
}
TIMEOUT=""
"$PY" -c "import pytest_timeout" 2> /dev/null && TIMEOUT="--timeout=$((TESTS_S - 15))"
# -rfE: failures at the end of a finished run; IDD_OPS_TEST_LOG (tests/result_log.py): every result
# as it comes, with its time and the end of each failure, kept when the time limit stops the run
# pytest-xdist, and one test at a time per worker where it can (--maxschedchunk, 3.3 on), so the
# slow tests that IDD_OPS_SLOW_FIRST puts first spread over the workers instead of going to the
# first worker in one chunk; asked once, of the module (pytest --help would load torch, 5 s)
XDIST=none
"$PY" -c "import xdist" 2> /dev/null && XDIST=plain
"$PY" -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 3))" 2> /dev/null \
  && XDIST=chunked
pytest_stage() {  # NAME NEXT(IDD_OPS_CUDA_NEXT's value) WORKERS PATHS...
  local name=$1 next=$2 workers=$3; shift 3
  local xdist=""
  [ "$XDIST" != none ] && xdist="-n $workers"
  [ "$XDIST" = chunked ] && xdist="$xdist --maxschedchunk 1"
  rm -f "$LOGS/$name.jsonl"
  if [ "$DRY" = 1 ]; then  # the stage's own arguments collected: a path pytest cannot find fails here
    local log="$LOGS/$name.collect.log"
    "$PY" -m pytest -q --collect-only -m gpu -p no:cacheprovider "$@" > "$log" 2>&1 ||
      echo "broken: $name: pytest --collect-only -m gpu of its arguments ($name.collect.log)" \
        >> "$LOGS/dry-run.problems"
    grep -q "::" "$log" || echo "no GPU tests collected for $name" >> "$LOGS/dry-run.problems"
  fi
  # OMP_NUM_THREADS=1: 14 workers and the demo share 16 cores (a worker's torch otherwise takes
  # a thread per core, and the CPU references of the GPU tests crawl)
  # shellcheck disable=SC2086  # xdist, TIMEOUT: empty or options
  stage "$name" "$TESTS_S" env IDD_OPS_CUDA_NEXT="$next" IDD_OPS_TEST_LOG="$LOGS/$name.jsonl" OMP_NUM_THREADS=1 \
    IDD_OPS_SLOW_FIRST=1 \
    "$PY" -m pytest -q -rfE $xdist $TIMEOUT -m gpu -p no:cacheprovider --junitxml="$LOGS/$name.xml" "$@"
}
# GPU_TESTS: one id a line where an id has a space (parametrisations such as [idd_loss cityscapes]),
# else split on spaces; never globbed (test_x[cuda-a] is no glob)
if [ -n "${GPU_TESTS_FILE:-}" ]; then mapfile -t gpu_tests < <(nonblank_lines "$(< "$GPU_TESTS_FILE")")
elif [[ "${GPU_TESTS:-}" == *$'\n'* ]]; then mapfile -t gpu_tests < <(nonblank_lines "$GPU_TESTS")
else read -r -a gpu_tests <<< "${GPU_TESTS:-}"; fi
[ ${#gpu_tests[@]} -gt 0 ] || mapfile -t gpu_tests < <(ordered_tests)
NEWEST=0 TESTS_WORKERS=$WORKERS  # the newest kernel set: next where KERNELS holds it
has_next && NEWEST=$IDD_OPS_NEXT_SET
selected tests-next && TESTS_WORKERS=$DEFAULT_WORKERS  # the candidate set's stage has most workers
pids=()
if selected tests; then
  pytest_stage tests 0 "$TESTS_WORKERS" "${gpu_tests[@]}" & pids+=($!)
fi
if selected tests-next; then
  pytest_stage tests-next "$IDD_OPS_NEXT_SET" "$WORKERS" "${gpu_tests[@]}" & pids+=($!)
fi
DEMO_OUT=${TMPDIR:-/tmp}/gpu-check-demo  # checkpoints stay out of the logs; its results.md joins them
if selected demo; then
  rm -rf "$DEMO_OUT"
  stage demo "$TESTS_S" env IDD_OPS_CUDA_NEXT="$NEWEST" "$PY" -m idd_ops.demo.cli --preset quick --device cuda \
    --out "$DEMO_OUT" & pids+=($!)
fi
[ ${#pids[@]} -gt 0 ] && every_20s "${pids[@]}"
for pid in "${pids[@]}"; do wait "$pid"; done
selected demo && [ -f "$DEMO_OUT/results.md" ] && cp "$DEMO_OUT/results.md" "$LOGS/demo-results.md"
[ ${#pids[@]} -gt 0 ] && finish  # a summary so far, should the call be cut short later

if [ -n "$WARM_PID" ]; then  # what it has not compiled by now, perf compiles itself
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$WARM_PID" 2> /dev/null || break; sleep 1; done
  kill "$WARM_PID" 2> /dev/null; wait "$WARM_PID" 2> /dev/null
fi
# shellcheck disable=SC2086  # KERNELS: a list
if selected perf; then
  stage perf "$PERF_S" "$PY" -m benchmarks.report --device cuda --guard --kernels $KERNELS --time-limit $((PERF_S - 10)) \
    ${perf_cases[@]+--cases "${perf_cases[@]}"} \
    --out "$OUT/RESULTS-cuda.md" --json "$OUT/perf.json" --summary "$LOGS/perf.section.md"
  finish
fi
# shellcheck disable=SC2086
if selected train; then
  stage train "$TRAIN_S" "$PY" -m benchmarks.train_step --device cuda --network auto --kernels $KERNELS --repeat 3 \
    --time-limit $((TRAIN_S - 10)) --no-peak --targets --out "$OUT/TRAIN_STEP-cuda.md" --summary "$LOGS/train.section.md"
fi
finish
cat "$OUT/summary.md"
failed=$(cat "$LOGS"/*.status 2> /dev/null | awk '$1 != "dry" && $1 != 0' | wc -l)
[ "$DRY" = 1 ] && [ -s "$LOGS/dry-run.problems" ] && failed=$((failed + 1))
exit "$failed"
