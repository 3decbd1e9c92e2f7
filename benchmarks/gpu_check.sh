#!/usr/bin/env bash
# The GPU check, run once on a CUDA machine from the repository root:
#   benchmarks/gpu_check.sh [OUTDIR]
# 1. benchmarks.gpu_step --quick: step speed per modality, budget and precision, peak memory;
#    benchmarks.gpu_mfu: the 0.5b preset's tokens/s, peak memory and MFU per batch size;
# 2. the three-modality quick demo end to end on the GPU (bf16 training, evaluation, ask);
# 3. the test suite with CUDA visible (every path that picks the GPU when there is one).
# Where the project is not installed, wheels in .whl/ are installed into /tmp/site first.
set -uo pipefail
out=${1:-${OUT:-gpu-check}}
mkdir -p "$out"
py=${PYTHON:-python3}
if ! "$py" -c "import umbrella" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=/tmp/site:$PWD/src:$PWD
    else
        export PYTHONPATH=$PWD/src:$PWD
    fi
fi
scratch=$(mktemp -d)
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 NILEARN_DATA=$scratch/nilearn DIPY_HOME=$scratch/dipy \
    HF_HOME=$scratch/hf MPLCONFIGDIR=$scratch/mpl
nvidia-smi -L
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'cuda', torch.cuda.is_available())"
status=0
step() {  # step NAME CMD...: run, keep the log, time it, remember a failure
    local name=$1; shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}
step gpu_step "$py" -m benchmarks.gpu_step --quick
step gpu_mfu "$py" -m benchmarks.gpu_mfu --batches 1,4,16,32,64,128,256
step demo "$py" -m umbrella demo --quick --modalities T1,rsfMRI,dMRI --out "$scratch/demo"
step tests timeout 250 "$py" -m pytest -q -m "not slow" -p no:cacheprovider tests
exit $status
