#!/usr/bin/env bash
# The GPU checks, as one prepared script for a machine with CUDA (the device tool's machine):
# the suite with the runs most tests make on cuda (CAUSAL_TEST_DEVICE), then the sweep benchmark on
# cuda in float32. Figures land in $OUT (or ./gpu-check) to quote in the README.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
# The machine's own CUDA torch is used; the project's other packages must already import there
# (the device tool's README: wheels carried in .whl and installed to a --target on PYTHONPATH).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    >> "$out/gpu.txt" 2>&1
CAUSAL_TEST_DEVICE=cuda timeout 420 python3 -m pytest -q -x -p no:cacheprovider \
    > "$out/suite.txt" 2>&1; echo "suite rc=$?" >> "$out/gpu.txt"
timeout 150 python3 benchmarks/sweep.py --device cuda --repeats 3 > "$out/sweep.txt" 2>&1
echo "sweep rc=$?" >> "$out/gpu.txt"
tail -3 "$out/suite.txt" "$out/sweep.txt"
