#!/usr/bin/env bash
# GPU checks without TensorRT, on a CUDA machine with torch, Triton, onnx and CPU onnxruntime:
# the Triton memory-update kernel vs the reference, its AOT PTX launched like TensorRT does,
# the plugin's JIT path, the PyTorch runner with CUDA graphs vs eager, and the kernel's speed
# and bandwidth. Prints a table last; exit 1 if a check fails. No network; under 8 minutes.
#
#   scripts/gpu_check.sh [--quick]
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
export TRITON_INTERPRET=0                 # compiled kernels (tests set 1 for the CPU)
export TRITON_DEFAULT_FP_FUSION=1         # Triton's current default, stated (silences a warning)
if ! "$python" -c "import infini_trt.export, infini_trt.plugins" 2>/dev/null; then
    # not installed: map the infini_trt namespace onto the source folders, nothing to download
    shim="$(mktemp -d)"
    trap 'rm -rf "$shim"' EXIT
    mkdir -p "$shim/infini_trt"
    for part in export runtime plugins; do ln -s "$PWD/$part" "$shim/infini_trt/$part"; done
    export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi
timeout 470 "$python" scripts/gpu_check.py "$@"
