#!/usr/bin/env bash
# The GPU check and benchmark of the current commit, one command, about 6 minutes on an H100:
#   1. correctness: the GPU tests of torchws.fast (the cuda_graph engine and the equivalence matrix on CUDA);
#   2. path (a) and (d): SGD steps of ResNet-50 GN+WS against GN at batch 1 and 2, fp32 and bf16 autocast +
#      channels_last, every engine, timm, fold and torch.compile of both models, side by side in one process.
# Writes gpu_pytest.txt, gpu_fp32.{txt,json} and gpu_bf16cl.{txt,json} to $OUT (default ./results); exit 1 if a
# part failed. From the repo root:  OUT=/some/dir TORCHWS_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_bench.sh
# (TORCHWS_COMMIT is recorded in the JSON where the tree has no .git.)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee "$OUT/gpu_env.txt"
timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/fast/test_cuda_graph.py tests/fast/test_equivalence.py 2>&1 | tee "$OUT/gpu_pytest.txt"
check=${PIPESTATUS[0]}
VARIANTS=${VARIANTS:-gn,default,per_layer,torch,cuda_graph,timm,folded,compile_gn,compile_ws}
ARGS=(--device cuda --family resnet50 --batches "${BATCHES:-1,2}" --variants "$VARIANTS" --rounds 8 --block 20)
timeout 200 "$PY" benchmarks/bench_paths.py "${ARGS[@]}" --out "$OUT/gpu_fp32.json" 2>&1 | tee "$OUT/gpu_fp32.txt"
fp32=${PIPESTATUS[0]}
timeout 200 "$PY" benchmarks/bench_paths.py "${ARGS[@]}" --bf16 --channels-last --out "$OUT/gpu_bf16cl.json" 2>&1 \
  | tee "$OUT/gpu_bf16cl.txt"
bf16=${PIPESTATUS[0]}
echo "pytest exit $check, fp32 exit $fp32, bf16 exit $bf16"
[ "$check" -eq 0 ] && [ "$fp32" -eq 0 ] && [ "$bf16" -eq 0 ]
