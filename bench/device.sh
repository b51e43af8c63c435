#!/usr/bin/env bash
# One GPU's figures (bench/device.py), offline, from this checkout and the wheels it carries.
#
#   bench/device.sh --prepare   here, with PyPI: download bench/device_requirements.txt as wheels for the device's
#                               Python (DEVICE_PYTHON, default 3.12, the GPU image's) into bench/device_wheels/
#                               (gitignored; about 5 MiB) and check that they install offline
#   bench/device.sh [FLAGS]     on the GPU machine, no network: install those wheels under /tmp, run bench/device.py
#   bench/device.sh --smoke     any machine with the test environment: tiny shapes, XLA attention (tests run it)
#
# FLAGS go to bench/device.py (--steps, --new_tokens). The GPU image has jax with CUDA; nothing else is fetched.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
wheels="${DEVICE_WHEELS:-bench/device_wheels}"
python="${PYTHON:-python3}"
device_python="${DEVICE_PYTHON:-3.12}"

case "${1:-}" in
  --prepare)
    mkdir -p "$wheels"
    platforms=()
    for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
      platforms+=(--platform "$tag")
    done
    target=(--python-version "$device_python" --implementation cp --only-binary=:all: "${platforms[@]}")
    "$python" -m pip download -q --no-deps "${target[@]}" -d "$wheels" -r bench/device_requirements.txt
    "$python" -m pip install -q --dry-run --no-index --no-deps --find-links "$wheels" "${target[@]}" \
      --target "$(mktemp -d)" -r bench/device_requirements.txt
    du -ch "$wheels"/*.whl | tail -1
    ;;
  --smoke)
    shift
    exec "$python" bench/device.py --smoke "$@"
    ;;
  *)
    site=/tmp/llama_hk_device_site
    "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
    PYTHONPATH="$root:$site${PYTHONPATH:+:$PYTHONPATH}" exec "$python" bench/device.py "$@"
    ;;
esac
