#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one command (device time is scarce: minutes per task):
#   1. the environment (nvidia-smi, package versions);
#   2. tests/gpu (every method's forward/backward/merge on CUDA, bf16, PEFT parity, QLoRA with Lightning's
#      BitsandbytesPrecision);
#   3. the GPU benchmark (experiments/benchmarks/gpu.py: every method vs PEFT on a ~1B random Llama, bf16,
#      seq 2048), with the profiler's top-op tables.
# Logs and results go to $OUT (the device tool's folder that comes back) or ./gpu_out. Packages the machine lacks
# travel as wheels in .whl/ (git-ignored; see /work/.library/device/README.md): peft 0.21.2, hydra-core, omegaconf,
# antlr4, bitsandbytes. Budgets (seconds) are TEST_S (default 120; tests/gpu took 46 s on an H200) and BENCH_S
# (default 400; seven methods took 212 s at 30 rounds, BOFT did not fit in the 108 s left): with the machine's start,
# one call of timeout_s=560 fits a task's 15 minutes of device time. LA_BENCH_COMMIT names the measured commit.
# PYTHON (default python3), BENCH_ARGS (extra arguments of the benchmark, e.g. "--tiny --device cpu") and
# INSTALL_WHEELS=0 (use the installed packages) serve a dry run anywhere (tests/test_benchmarks.py runs one).
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ "${INSTALL_WHEELS:-1}" != 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "wheel install failed" >>"$OUT/env.txt"
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    date -u
    nvidia-smi
    "$PY" -c "import torch, transformers, peft, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'lightning', lightning.__version__)"
    "$PY" -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"
} >>"$OUT/env.txt" 2>&1
timeout "${TEST_S:-120}" "$PY" -m pytest tests/gpu -q -rA -p no:cacheprovider >"$OUT/pytest.log" 2>&1
echo "pytest exit $?" >>"$OUT/pytest.log"
timeout "${BENCH_S:-400}" "$PY" -m experiments.benchmarks.gpu --out "$OUT" --profile --steps "${STEPS:-30}" \
    --variants ${VARIANTS:-bf16} ${BENCH_ARGS:-} >"$OUT/bench.log" 2>&1
echo "bench exit $?" >>"$OUT/bench.log"
tail -3 "$OUT/pytest.log"
tail -3 "$OUT/bench.log"
