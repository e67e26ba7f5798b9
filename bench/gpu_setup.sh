# Sourced by bench/gpu_check.sh and bench/predict_gpu_check.sh (they set PY, OUT and NEEDS,
# the modules to import): installs the wheels carried in .whl/ when the device's Python lacks
# them, puts the package on PYTHONPATH, and records which GPU and torch the run got.
mkdir -p "$OUT"
if [ -d .whl ] && ! "$PY" -c "import $NEEDS" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt"
