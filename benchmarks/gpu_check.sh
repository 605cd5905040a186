#!/usr/bin/env bash
# The GPU check (issue 22): everything the device machine is needed for, in one call of at most 9 minutes.
#
#   bash benchmarks/gpu_check.sh            # on the device: run it all, results under $OUT
#   bash benchmarks/gpu_check.sh --dry-run  # anywhere, no GPU: check that everything it would run is there
#
# Stages, each under its own time limit (together 9 minutes; a failed stage does not stop the next):
#   install  the wheels benchmarks/gpu_wheels.txt names, from .whl/, into a scratch site folder
#   tests    the CUDA tests CPU CI skips: pytest -m cuda
#   bench    benchmarks/bench_speed.py --profile: speed_cuda.json and speed_cuda.png
#   chapter  one book-profile chapter end to end (nbclient, as `jupyter execute`), timed, in a scratch
#            copy of the repository so that its exported records do not overwrite results/book
#   parity   benchmarks/gpu_parity.py: its KD runs against results/book's CPU runs of the same seeds
# What comes back ($OUT, at most 8 files as the device returns them): gpu_check.log, summary.json,
# speed_cuda.json, speed_cuda.png, the executed chapter, records_gpu.tar.gz, parity.json.
#
# The device call (the tree travels; .whl is git-ignored, so it is carried):
#   device run: command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 570
# Environment: PYTHON (default python3), OUT (default ./gpu_check_out), KDLIB_WHEELS (default ./.whl),
# GPU_CHECK_CHAPTER (default notebooks/01_baselines.ipynb), GPU_CHECK_SCRATCH (default a new temp folder);
# GPU_CHECK_BENCH_ARGS (default --profile) and GPU_CHECK_PROFILE (default book), for a rehearsal on a CPU.
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$REPO/gpu_check_out}
WHEELS=${KDLIB_WHEELS:-$REPO/.whl}
CHAPTER=${GPU_CHECK_CHAPTER:-notebooks/01_baselines.ipynb}
# A rehearsal on a CPU sets these to "--quick --device cpu" and smoke (seconds instead of minutes; the
# install and parity stages then fail, as they must without the wheels and a GPU: tests/test_gpu_check.py).
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---profile}
PROFILE=${GPU_CHECK_PROFILE:-book}
# Seconds per stage: 30 + 60 + 180 + 240 + 30 = 540 = 9 minutes at most.
LIMIT_INSTALL=30 LIMIT_TESTS=60 LIMIT_BENCH=180 LIMIT_CHAPTER=240 LIMIT_PARITY=30
OUTPUTS=(gpu_check.log summary.json speed_cuda.json speed_cuda.png "$(basename "$CHAPTER")" records_gpu.tar.gz
         parity.json)
NEEDED_FILES=(benchmarks/bench_speed.py benchmarks/speed_precision.py benchmarks/gpu_parity.py
              benchmarks/gpu_wheels.py benchmarks/gpu_wheels.txt benchmarks/gpu_device_packages.txt
              "$CHAPTER" results/book kdlib/precision.py tests pyproject.toml)
NEEDED_COMMANDS=(timeout date cp mkdir)
# What the run imports; on the device the wheels provide those it lacks.
IMPORTS="kdlib, kdlib.precision, torch, torchvision, numpy, matplotlib, scipy, pytest, pytorch_grad_cam, nbclient, \
nbformat, ipykernel, jupyter_client, IPython"

cd "$REPO" || exit 1

# --- the dry run -----------------------------------------------------------------------------------
dry_run() {
  local bad=0 f c
  echo "gpu_check dry run in $REPO (python: $PYTHON)"
  for f in "${NEEDED_FILES[@]}"; do
    if [[ -e $f ]]; then echo "  ok   file $f"; else echo "  FAIL file $f is missing"; bad=1; fi
  done
  for c in "$PYTHON" "${NEEDED_COMMANDS[@]}"; do
    if command -v "$c" >/dev/null; then echo "  ok   command $c"; else echo "  FAIL command $c not found"; bad=1; fi
  done
  if ((${#OUTPUTS[@]} <= 8)); then echo "  ok   ${#OUTPUTS[@]} output files (the device returns at most 8)"
  else echo "  FAIL ${#OUTPUTS[@]} output files: the device returns at most 8"; bad=1; fi
  ((bad)) && { echo "dry run FAILED: missing files or commands"; return 1; }

  "$PYTHON" benchmarks/gpu_wheels.py check --dir "$WHEELS"
  case $? in
    0) echo "  ok   wheels";;
    3) echo "  WARN wheels missing (above): download them before the device call";;
    *) echo "  FAIL wheels (above)"; bad=1;;
  esac
  if PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "import $IMPORTS"; then
    echo "  ok   python imports: $IMPORTS"
  else
    echo "  FAIL python cannot import what the run needs"; bad=1
  fi
  if PYTHONPATH="$REPO" "$PYTHON" benchmarks/bench_speed.py --help >/dev/null; then echo "  ok   bench_speed.py parses"
  else echo "  FAIL bench_speed.py --help"; bad=1; fi
  PYTHONPATH="$REPO" "$PYTHON" benchmarks/gpu_parity.py --dry-run | sed 's/^/  ok   /' || bad=1
  if "$PYTHON" -c "import nbformat, sys; nbformat.read(sys.argv[1], as_version=4)" "$CHAPTER"; then
    echo "  ok   chapter $CHAPTER is a notebook"
  else echo "  FAIL chapter $CHAPTER is not a readable notebook"; bad=1; fi
  local selected
  selected=$(PYTHONPATH="$REPO" "$PYTHON" -m pytest --collect-only -q -m cuda -p no:cacheprovider tests \
    --ignore=tests/test_browser.py 2>/dev/null | grep -c '::')
  if ((selected > 0)); then echo "  ok   pytest -m cuda selects $selected test(s)"
  else echo "  FAIL pytest -m cuda selects no test"; bad=1; fi
  ((bad)) && { echo "dry run FAILED"; return 1; }
  echo "dry run passed: on the device, bash benchmarks/gpu_check.sh writes ${OUTPUTS[*]} under \$OUT"
}

if [[ ${1:-} == "--dry-run" ]]; then dry_run; exit $?; fi
[[ $# -eq 0 ]] || { echo "usage: $0 [--dry-run]" >&2; exit 2; }

# --- the run ---------------------------------------------------------------------------------------
mkdir -p "$OUT" || exit 1
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
if [[ -n ${GPU_CHECK_SCRATCH:-} ]]; then
  SCRATCH=$GPU_CHECK_SCRATCH
else  # the cache, the wheels' site folder and the chapter's copy of the repository; gone at the end
  SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/kdlib-gpu-check.XXXXXX") || exit 1
  trap 'rm -rf "$SCRATCH"' EXIT
fi
SITE=$SCRATCH/site
export PYTHONUNBUFFERED=1 KDLIB_CACHE=$SCRATCH/cache MPLBACKEND=Agg
STAGES=()

stage() {  # stage NAME LIMIT COMMAND...: run it under `timeout`, log its exit status and wall time
  local name=$1 limit=$2 t0 rc
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  t0=$(date +%s.%N)
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@"  # through bash: a stage may be a function (exported)
  rc=$?
  STAGES+=("$name $rc $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') $limit")
  echo "=== $name: exit $rc"
}

install_wheels() {
  local files
  files=$("$PYTHON" benchmarks/gpu_wheels.py files --dir "$WHEELS") || return 1
  # shellcheck disable=SC2086  # one wheel path a line, no spaces (wheel names have none)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" $files
}

run_chapter() {  # in a scratch copy: the chapter exports its records into the copy's results/book
  mkdir -p "$SCRATCH/repo" && cp -r kdlib notebooks results pyproject.toml "$SCRATCH/repo/" || return 1
  PYTHONPATH="$SCRATCH/repo:$SITE" KDLIB_PROFILE=$PROFILE "$PYTHON" -c "from nbclient.cli import main; main()" \
    --inplace --timeout=-1 --kernel_name=python3 "$SCRATCH/repo/$CHAPTER"
  local rc=$?
  cp "$SCRATCH/repo/$CHAPTER" "$OUT/" || true
  return $rc
}

export -f install_wheels run_chapter
export PYTHON OUT WHEELS CHAPTER SCRATCH SITE PROFILE
echo "gpu_check: $(date -u +%FT%TZ) in $REPO, scratch $SCRATCH, out $OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
stage install "$LIMIT_INSTALL" install_wheels
export PYTHONPATH="$REPO:$SITE" PATH="$SITE/bin:$PATH"
"$PYTHON" -c "import torch, kdlib.precision as p; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
      '| policy', p.resolve_precision('cuda').name if torch.cuda.is_available() else '-')"
stage tests "$LIMIT_TESTS" "$PYTHON" -m pytest -q -rs -m cuda -p no:cacheprovider tests --ignore=tests/test_browser.py
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
stage bench "$LIMIT_BENCH" "$PYTHON" benchmarks/bench_speed.py $BENCH_ARGS --out "$OUT/speed_cuda.json" \
  --figure "$OUT/speed_cuda.png"
stage chapter "$LIMIT_CHAPTER" run_chapter
stage parity "$LIMIT_PARITY" "$PYTHON" benchmarks/gpu_parity.py --cpu "$REPO/results/book" \
  --gpu "$SCRATCH/repo/results/book" --out "$OUT/parity.json" --tar "$OUT/records_gpu.tar.gz"

"$PYTHON" - "$OUT/summary.json" "$CHAPTER" "${STAGES[@]}" <<'EOF'
import json, sys, time
import torch
path, chapter, *stages = sys.argv[1:]
rows = [dict(zip(("stage", "exit", "seconds", "limit_s"), s.split())) for s in stages]
for r in rows:
    r["exit"], r["seconds"], r["limit_s"] = int(r["exit"]), float(r["seconds"]), int(r["limit_s"])
cuda = torch.cuda.is_available()
summary = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "stages": rows, "chapter": chapter,
           "chapter_wall_time_s": next((r["seconds"] for r in rows if r["stage"] == "chapter"), None),
           "device": torch.cuda.get_device_name() if cuda else "no CUDA device", "torch": torch.__version__}
if cuda:
    from kdlib.precision import resolve_precision
    summary["precision_policy"] = resolve_precision("cuda").name
json.dump(summary, open(path, "w"), indent=1)
print(json.dumps(summary, indent=1))
EOF
printf '%s\n' "${STAGES[@]}" | awk '{ printf "%-8s exit %-3s %7.1f s (limit %s s)\n", $1, $2, $3, $4; bad += ($2 != 0) }
  END { exit bad > 0 }'
