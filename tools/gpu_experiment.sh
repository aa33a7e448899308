#!/usr/bin/env bash
# The experiment at GPU scale in one device call (issue 23): the loss weights tuned on the tune
# split at the preset's size (python -m idd_ops.demo.tune), then the preset with those weights and
# the tuning's teacher (idd-distill). Run it after tools/gpu_check.sh has passed, with the kernels
# it passed. On an H200 (2026-12-04, results/full) the preset's step took 208 s of its 240 s limit,
# with the teacher trained there; the tuning's 180 s is still an estimate (20 runs of 600 steps).
#
#   bash tools/gpu_experiment.sh              # on the GPU machine: the full preset (128x256)
#   PRESET=quick DEVICE=cpu TUNE_ARGS="--grid idd=1 --seeds 0 --student-steps 2 --teacher-steps 2" \
#     RUN_ARGS="--configs ce ce+idd --seeds 0 --student-steps 2 --teacher-steps 2" \
#     bash tools/gpu_experiment.sh            # the same pipeline in about a minute on 2 CPU cores
#
# Output ($OUT, default ./gpu-experiment-out): summary.md (each step's status and time, then tune.md
# and results.md), results.tar.gz (both folders but their checkpoints: unpack it in the repository
# root and commit results/full and results/full-tune) and teacher.pt (the tuning's teacher, 14 MB).
# The runs' checkpoints (2 MB each) stay on the machine: too many to bring back. A call stopped at a
# time limit loses the runs of the step it was in; to resume, put teacher.pt in results/full-tune/,
# give the device tool carry=["results/full-tune/teacher.pt"] (git ignores it) and call again: the
# teacher is reused. A finished tuning (results/full-tune/tune.json, committed from a CPU run) is
# not redone unless RETUNE=1; the preset then trains its own teacher where no teacher.pt is there.
# On a machine without the CUDA library of these sources (a fresh one) it puts one in place first
# (tools/cuda_library.sh: the carried .prebuilt-cuda, or a build within BUILD_S, 100 s). The summary
# and the archive are rewritten after each step and when a signal stops the call, so a call cut off
# at the device tool's limit (give it timeout_s 480 where it tunes: 420 s of steps, the library and
# the packing; 360 for the preset alone) still brings back the steps before, the step it stopped,
# and the teacher once the tuning has trained it. Settings: PRESET (full), DEVICE (cuda), RESULTS
# (results; the preset runs with the weights of $RESULTS/<preset>-tune/tune.json), TUNE_S and
# RUN_S (time limits in seconds: 180 and 240), TUNE_ARGS (default: the seeds and grid of the
# committed results/full-tune) and RUN_ARGS (more options of each command).
# Exit status: the number of failed steps; 130 when a signal stopped the call.
set -uo pipefail
cd "$(dirname "$0")/.."

PRESET=${PRESET:-full} DEVICE=${DEVICE:-cuda} RESULTS=${RESULTS:-results}
TUNE_S=${TUNE_S:-180} RUN_S=${RUN_S:-240} BUILD_S=${BUILD_S:-100}
TUNE_ARGS=${TUNE_ARGS-"--seeds 100 101 --grid idd=0.3,1,3,10 --grid pid=0.3,1,3 --grid cwd=0.3,1,3,10,30,100"}
OUT=${OUT:-$PWD/gpu-experiment-out}
PY=${PYTHON:-python3}
TUNED=$RESULTS/$PRESET-tune FINAL=$RESULTS/$PRESET
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$TUNED" "$FINAL"
rm -f "$OUT/summary.md" "$OUT/results.tar.gz" "$OUT/teacher.pt"
# pieces a stopped call left half-written (experiment.save_piece; a carried folder brings them),
# and the shared run files a killed (not terminated) call could not remove (runs/shared-*.pt)
find "$TUNED" "$FINAL" \( -name '*.part-*' -o -name 'shared-*.pt' \) -delete
failed=0 rows=""

# pack: summary.md and the archive from what the steps left so far (after each step, so that a
# call cut off at its limit still brings back the steps before), each written whole, then moved in
pack() {
  {
    echo "# GPU experiment: preset $PRESET on $DEVICE"
    echo
    echo "$(date -u +%FT%TZ), revision ${REV:-$(git rev-parse --short HEAD 2> /dev/null || echo unknown)}," \
      "$SECONDS s in all. Results: results.tar.gz ($TUNED and $FINAL without checkpoints), teacher.pt."
    echo
    echo "| step | status | seconds | limit |"
    echo "|---|---|---:|---:|"
    printf '%s' "$rows"
    for md in "$TUNED/tune.md" "$FINAL/results.md"; do
      [ -f "$md" ] && { echo; cat "$md"; }
    done
    for log in "$TUNED/tune.log" "$FINAL/run.log"; do
      [ -f "$log" ] && { echo; echo "## the end of $log"; echo; echo '```'; tail -15 "$log"; echo '```'; }
    done
  } > "$OUT/.summary.md"
  mv -f "$OUT/.summary.md" "$OUT/summary.md"  # (the group's status is its last test's, not the write's)
  tar -czf "$OUT/.results.tar.gz" --exclude='*.pt' --exclude='*.part-*' "$TUNED" "$FINAL" &&
    mv -f "$OUT/.results.tar.gz" "$OUT/results.tar.gz"
  [ -f "$TUNED/teacher.pt" ] && cp "$TUNED/teacher.pt" "$OUT/teacher.pt"
}

# A signal (the device tool's time limit) stops the running step's command too (its timeout
# process leads a process group of its own, which the signal does not reach), records the step as
# stopped and packs what the steps left, so that the summary says where the call was cut off.
running="" running_name="" running_t0=0
on_signal() {
  trap '' INT TERM  # once: a second signal while this packs would add the step again
  if [ -n "$running_name" ]; then
    # $! where the signal came between the step's fork and its `running=$!`
    local pid=${running:-${!:-}}
    kill "$pid" 2> /dev/null
    wait "$pid" 2> /dev/null  # the step's last output in its log (timeout kills within 5 s)
    failed=$((failed + 1))
    rows="$rows| $running_name | stopped by a signal (resume in the next call) | $((SECONDS - running_t0)) | - |"$'\n'
  fi
  pack
  exit 130
}
trap on_signal INT TERM

# step NAME LIMIT LOG CMD...: CMD under a time limit, its output in LOG (inside the archive); in
# the background, waited for, so that a signal's trap runs at once, not when the step ends
step() {
  local name=$1 limit=$2 log=$3 t0=$SECONDS rc; shift 3
  echo "== $name (limit ${limit}s): $*"
  running_name=$name running_t0=$t0
  timeout --kill-after=5 "$limit" "$@" > "$log" 2>&1 &
  running=$!
  wait "$running"
  rc=$?
  running="" running_name=""
  local status="passed"
  [ $rc -ne 0 ] && status="FAILED, rc $rc" && failed=$((failed + 1))
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && status="$status (time limit: resume in the next call)"
  echo "   $name: $status in $((SECONDS - t0)) s"
  rows="$rows| $name | $status | $((SECONDS - t0)) | $limit |"$'\n'
  pack
  return $rc
}

# On a fresh machine (the GPU check's went back) or after a change here: the library first, the
# carried prebuilt one where it fits and runs, else built (tools/cuda_library.sh)
if [ "$DEVICE" != cpu ] && ! "$PY" tools/prebuilt_cuda.py built > /dev/null; then
  step library "$BUILD_S" "$FINAL/library.log" env PYTHON="$PY" bash tools/cuda_library.sh || { pack; exit 1; }
fi

# A finished tuning (its tune.json; committed, or left by an earlier call) is not redone unless
# RETUNE=1: the preset runs with its weights (--tuning), and trains its own teacher where the tuning's
# is not at hand (a tuning committed from another machine; git ignores checkpoints)
tuned() {
  if [ -f "$TUNED/tune.json" ] && [ "${RETUNE:-0}" != 1 ]; then
    rows="$rows| tune | skipped: $TUNED/tune.json exists (RETUNE=1 tunes again) | 0 | - |"$'\n'
    return 0
  fi
  # shellcheck disable=SC2086  # TUNE_ARGS: a list of options
  step tune "$TUNE_S" "$TUNED/tune.log" "$PY" -m idd_ops.demo.tune --preset "$PRESET" --device "$DEVICE" \
    --out "$TUNED" $TUNE_ARGS
}

if tuned; then
  teacher=()
  [ -f "$TUNED/teacher.pt" ] && teacher=(--teacher "$TUNED/teacher.pt")
  # shellcheck disable=SC2086  # RUN_ARGS: a list of options
  step run "$RUN_S" "$FINAL/run.log" "$PY" -m idd_ops.demo.cli --preset "$PRESET" --device "$DEVICE" \
    --out "$FINAL" --tuning "$TUNED/tune.json" "${teacher[@]}" ${RUN_ARGS:-}
else  # weights not tuned yet: the next call resumes the tuning rather than report carried-over weights
  rows="$rows| run | not run: the tuning did not finish | - | $RUN_S |"$'\n'
fi

pack
cat "$OUT/summary.md"
exit "$failed"
