#!/usr/bin/env bash
# The prediction stage's GPU check, in one run: the CUDA-marked tests of tests/test_predict.py
# (batched tiles with and without autocast against the CPU pass), then bench/predict.py on the
# GPU with AMP off and on (bf16 where supported), printing megapixels/s of unetflow, of a pure
# forward over the same tiles (host -> GPU -> host) and of MONAI, and their ratios.
#
# Run from the repository root on a CUDA machine:  bash bench/predict_gpu_check.sh
# Results also go to $OUT (default /tmp/predict_gpu_check). SIZE=8192 TILE=1024 BATCH=4 by
# default (67 megapixels: seconds on an H100, so the figures are not start-up noise).
#
# The device machines' python3 has torch, numpy, scipy, matplotlib, pyyaml, tqdm and pytest.
# Fetch the rest as wheels here first (.whl/ is git-ignored), then carry .whl with the run:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl zarr==3.1.6 numcodecs==0.16.6 \
#     donfig==0.8.1.post1 google-crc32c==1.9.0 dask==2026.8.0 toolz==1.2.0 \
#     cloudpickle==3.1.3 partd==1.4.2 locket==1.0.0 ome-zarr==0.18.0 ome-zarr-models==1.7 \
#     pydantic==2.12.5 pydantic-core==2.41.5 pydantic-zarr==0.9.2 annotated-types==0.8.0 \
#     typing-inspection==0.4.5 scikit-image==0.26.0 imageio==2.38.1 lazy-loader==0.6 \
#     tifffile==2026.3.3 deprecated==1.3.1 wrapt==2.5.2 requests==2.34.2 urllib3==2.8.0 \
#     idna==3.20 certifi==2026.10.19.post1 charset-normalizer==3.5.3 aiohttp==3.14.5 \
#     aiosignal==1.4.0 aiohappyeyeballs==2.7.1 frozenlist==1.8.0 multidict==7.2.1 \
#     propcache==0.5.4 yarl==1.25.1 attrs==26.1.0 jsonschema==4.26.0 \
#     jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 \
#     monai==1.6.1
set -uo pipefail
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/predict_gpu_check}
SIZE=${SIZE:-8192}
TILE=${TILE:-1024}
BATCH=${BATCH:-4}
THREADS=${THREADS:-8}
NEEDS="zarr, dask, ome_zarr, ome_zarr_models"
. "$(dirname "$0")/gpu_setup.sh"

status=0
"$PY" -m pytest -q -m cuda -p no:cacheprovider tests/test_predict.py 2>&1 \
    | tee "$OUT/cuda_tests.txt" || status=1

echo "== bench/predict.py --device cuda --amp both --size $SIZE --tile $TILE --batch-size $BATCH"
"$PY" bench/predict.py --device cuda --amp both --size "$SIZE" --tile "$TILE" \
    --batch-size "$BATCH" --threads "$THREADS" --skip-rss 2>"$OUT/bench_stderr.txt" \
    | tee "$OUT/bench.txt" || status=1
exit $status
