#!/usr/bin/env bash
# The training stage's GPU check, in one run: the CUDA-marked tests of tests/test_train.py
# (AMP bf16 / fp16 + GradScaler / off, channels_last in 2D and 3D, torch.compile, exact
# deterministic resume on CUDA) and tests/test_distributed.py (2 GPUs x 4 with NCCL and
# SyncBatchNorm equal 1 GPU x 8; skipped on a node with one GPU), then bench/train.py on the
# GPU with AMP off, on (bf16 where supported) and fp16, printing samples/s of loader and
# training steps, peak GPU memory, the trainer against a plain loop, and 2 GPUs against 1
# (ranks2_vs_1_samples_ratio; "n/a" with one GPU). The lent device machine has one GPU: the
# 2-rank lines need a node with two.
#
# Run from the repository root on a CUDA machine:  bash bench/gpu_check.sh
# Results also go to $OUT (default /tmp/gpu_check). About 3-5 minutes on one H100.
#
# The device machines' python3 has torch, numpy, scipy, matplotlib, pyyaml, tqdm and pytest
# but not zarr or jsonschema. Fetch those as wheels here first (.whl/ is git-ignored), then
# carry .whl with the run:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 \
#     donfig==0.8.1.post1 google-crc32c==1.9.0 jsonschema==4.26.0 \
#     jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu_check}
WORKERS=${WORKERS:-8}
NEEDS="zarr, jsonschema"
. "$(dirname "$0")/gpu_setup.sh"

status=0
"$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_train.py tests/test_distributed.py 2>&1 \
    | tee "$OUT/cuda_tests.txt" || status=1

for amp in false true fp16; do
    echo "== bench/train.py --device cuda --amp $amp --workers $WORKERS"
    "$PY" bench/train.py --device cuda --amp "$amp" --workers "$WORKERS" 2>&1 \
        | tee "$OUT/bench_amp_$amp.txt" || status=1
done
exit $status
