#!/usr/bin/env bash
# An air-gapped GPU install: collect every wheel on a machine with the registries, build Transformer
# Engine's torch extension on (a copy of) the target image, install offline there.
#
#   1. online, any x86-64 Linux:      bash scripts/wheelhouse.sh download WHEELHOUSE
#      -> WHEELHOUSE/ holds every package the CPU install resolved (scripts/install.sh's .venv, frozen:
#         torch and the CUDA libraries left out, the target image has its own), Transformer Engine's
#         core + Python wheels pinned in requirements-gpu.txt, and the sdist of TE's torch extension
#         (PyPI ships no wheel of it).
#   2. on the target image (its torch, nvcc; no network needed):
#                                      bash scripts/wheelhouse.sh build-te-torch WHEELHOUSE
#      -> WHEELHOUSE/transformer_engine_torch-*.whl built against that torch and CUDA (~80 s on 16
#         cores for one architecture; NVTE_CUDA_ARCHS=90 for H100/H200, "90;100" adds Blackwell).
#   3. on every node:                  bash scripts/wheelhouse.sh install WHEELHOUSE
#      -> pip install --no-index from WHEELHOUSE into the current Python (a venv or the container's),
#         then this package in editable mode; prints the versions it imported.
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
house=${2:-}
[ -n "$mode" ] && [ -n "$house" ] || { sed -n '2,16p' "$0"; exit 2; }
PY=${PYTHON:-python3}
te_version=$(sed -n 's/^transformer-engine\[[^]]*\]==\([0-9.]*\).*/\1/p' requirements-gpu.txt)
[ -n "$te_version" ] || { echo "wheelhouse: no transformer-engine pin in requirements-gpu.txt" >&2; exit 1; }

case "$mode" in
download)
  mkdir -p "$house"
  platform=(--python-version 3.12 --implementation cp --only-binary=:all:
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
  # Exactly what requirements.txt resolved to on this machine, minus torch and NVIDIA's CUDA wheels.
  bash scripts/install.sh
  .venv/bin/python -m pip freeze --exclude-editable | grep -viE '^(torch|triton|cuda-[a-z-]*|nvidia-(cu[a-z0-9-]*|nccl[a-z0-9-]*|nvjitlink|nvtx|nvshmem[a-z0-9-]*))==' \
    > "$house/requirements-frozen.txt"
  "$PY" -m pip download -q -d "$house" "${platform[@]}" --no-deps -r "$house/requirements-frozen.txt"
  "$PY" -m pip download -q -d "$house" "${platform[@]}" --no-deps \
    "transformer-engine==$te_version" "transformer-engine-cu13==$te_version"
  # TE's Python dependencies (torch excluded: nvdlfw-inspect, the one that asks for it, goes --no-deps).
  printf '%s\n' einops onnx onnxscript importlib-metadata > "$house/requirements-te.txt"
  "$PY" -m pip download -q -d "$house" "${platform[@]}" -r "$house/requirements-te.txt"
  "$PY" -m pip download -q -d "$house" "${platform[@]}" --no-deps nvdlfw-inspect
  echo nvdlfw-inspect >> "$house/requirements-te.txt"
  "$PY" -m pip download -q -d "$house" --no-deps --no-binary :all: --no-build-isolation \
    "transformer-engine-torch==$te_version"
  ls "$house" | wc -l | xargs echo "wheelhouse: files in $house:"
  ;;
build-te-torch)
  sdist=$(ls "$house"/transformer_engine_torch-"$te_version".tar.gz)
  "$PY" -m pip install -q --no-index --find-links "$house" --no-deps "transformer-engine-cu13==$te_version"
  NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS:-$(nproc)} NVTE_CUDA_ARCHS=${NVTE_CUDA_ARCHS:-90} \
    "$PY" -m pip wheel --no-build-isolation --no-deps --no-index -w "$house" "$sdist"
  ls "$house"/transformer_engine_torch-*.whl
  ;;
install)
  # torch is the image's own: every requirement on it is met by what is installed.
  "$PY" -m pip install --no-index --find-links "$house" -r "$house/requirements-frozen.txt" \
    -r "$house/requirements-te.txt"
  # --no-deps: TE's torch extension names the cu12 core package in its metadata whatever CUDA it
  # was built for.
  "$PY" -m pip install --no-index --no-deps --find-links "$house" "transformer-engine==$te_version" \
    "transformer-engine-cu13==$te_version" "transformer-engine-torch==$te_version"
  "$PY" -m pip install --no-deps --no-build-isolation -e .
  "$PY" -c "import torch, transformer_engine, megatron.core as m; print('torch', torch.__version__, '| TE', transformer_engine.__version__, '| megatron-core', m.__version__)"
  ;;
*)
  echo "wheelhouse: unknown mode $mode (download | build-te-torch | install)" >&2; exit 2
  ;;
esac
