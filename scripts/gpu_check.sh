#!/usr/bin/env bash
# The device check in one command (README, "GPU"): the devices, the numerics tests on the GPU
# against the CPU values stored beside them, then scripts/gpu_bench.py (diagnose and training
# throughput, HVP/s, compile times, peak memory). Everything lands in $OUT (default
# ./gpu-check-out): nvidia-smi.txt, numerics.log, bench.log, gpu_rows.csv (the benchmark's
# rows in results/summary.csv's columns; copy them to results/gpu-<device>.csv).
#
#   scripts/gpu_check.sh [--dry-run] [--commit SHA] [--budget-s 420]
#
# On a machine whose jax has no GPU backend it installs the CUDA build of the project's jax
# from the package index (jax[cuda12]==<the installed jax>); carried wheels in .whl/ (for a
# machine without an index) are installed into a scratch site first. --dry-run: toy sizes on
# whatever backend there is (the default test suite runs it on the CPU).
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
out="${OUT:-$root/gpu-check-out}"
dry="" commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" budget=420
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry="--dry-run" ;;
    --commit) commit="$2"; shift ;;
    --budget-s) budget="$2"; shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --commit SHA, --budget-s S)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
py="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-check-site .whl/*.whl || { echo "gpu_check.sh: carried wheels did not install" >&2; exit 1; }
  export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
backend() { "$py" -c 'import jax; print(jax.default_backend())' 2>/dev/null; }
if [ -z "$dry" ] && [ "$(backend)" != "gpu" ]; then
  version="$("$py" -c 'import jax; print(jax.__version__)')"
  echo "gpu_check.sh: jax $version has no GPU backend; installing jax[cuda12]==$version"
  "$py" -m pip install -q "jax[cuda12]==$version" || { echo "gpu_check.sh: no CUDA jax could be installed" >&2; exit 1; }
  [ "$(backend)" = "gpu" ] || { echo "gpu_check.sh: jax still sees no GPU" >&2; exit 1; }
fi
{ command -v nvidia-smi >/dev/null && nvidia-smi; "$py" -c 'import jax; print("jax", jax.__version__, jax.devices())'; } \
  >"$out/nvidia-smi.txt" 2>&1
cat "$out/nvidia-smi.txt"
status=0
if [ -z "$dry" ]; then  # the dry run's caller (the CPU suite) runs the numerics tests itself
  "$py" -m pytest -q -p no:cacheprovider tests/test_numerics.py 2>&1 | tee "$out/numerics.log" || status=1
fi
"$py" scripts/gpu_bench.py --out "$out" $dry --commit "$commit" --budget-s "$budget" 2>&1 \
  | tee "$out/bench.log" || status=1
exit $status
