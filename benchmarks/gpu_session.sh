#!/usr/bin/env bash
# Everything issue 4 needs a GPU for, in stages that each fit a 10-minute call on a lent machine
# (torch and triton preinstalled there; the machine has no network).
#
#   bash benchmarks/gpu_session.sh tests      GPU-only tests: kernels at full SD sizes, CUDA graphs
#   bash benchmarks/gpu_session.sh attention  benchmarks/attention.py, then the tile sweep at 4096x40
#   bash benchmarks/gpu_session.sh pipeline   benchmarks/pipeline.py (diffusers and ours, all rows)
#
# The machine lacks diffusers and ldm's own ftfy, wcwidth, torchsde and trampoline: put their
# wheels in build/gpu-wheels/ here (pip download --no-deps diffusers ftfy wcwidth torchsde
# trampoline -d build/gpu-wheels) and carry that folder.
# Output goes to stdout and, when $OUT is set, to $OUT/<stage>.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?"stage: tests, attention or pipeline"}
log=${OUT:-/tmp}/$stage.txt

if [ -d build/gpu-wheels ]; then
    pip install -q --no-deps build/gpu-wheels/*.whl
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # ldm from this tree (no build step offline)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$log"

case $stage in
    tests)
        python -m pytest -q -rs tests/test_flash_attention.py tests/test_norm_geglu_kernels.py \
            tests/test_compile_and_graphs.py tests/test_attention_dispatch.py 2>&1 | tee -a "$log" ;;
    attention)
        python benchmarks/attention.py 2>&1 | tee -a "$log"
        python benchmarks/attention.py --sweep --only "64x64 self" --runs 30 2>&1 | tee -a "$log" ;;
    pipeline)
        python benchmarks/pipeline.py --repeats 5 2>&1 | tee -a "$log" ;;
    *)
        echo "unknown stage $stage (tests, attention or pipeline)" >&2
        exit 2 ;;
esac
