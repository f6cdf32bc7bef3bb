#!/usr/bin/env bash
# The prepared device check (`make gpu-check`): on one CUDA GPU, in at most ~8 minutes, with only what a GPU image
# holds (torch, transformers, accelerate, tokenizers, sacrebleu, safetensors, scipy, scikit-learn, pytest): the
# CUDA tests, then the training-step and decoding benchmarks against transformers, into one results file.
#   bash scripts/gpu_check.sh [RESULTS_DIR]     (default: runs/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export ROFORMER_CACHE="$out/cache"
py="${PYTHON:-python3}"
{
  echo "# GPU check, $(date -u +%F' '%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  "$py" -c "import torch; print('device:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
} | tee "$out/results.md"
status=0
section() { echo -e "\n## $1\n" | tee -a "$out/results.md"; }
section "pytest -m gpu"
timeout 300 "$py" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider 2>&1 | tail -15 | tee -a "$out/results.md" || status=1
section "training step: ours vs transformers (bf16, BERT-base)"
timeout 240 "$py" benchmarks/bench_model.py --device cuda --dtype bf16 --sizes bert-base-128 bert-base-512 \
  --json "$out/bench_model.json" 2>&1 | tee -a "$out/results.md" || status=1
section "beam-4 decoding: ours vs MarianMTModel.generate (Transformer-base)"
timeout 120 "$py" benchmarks/bench_translate.py --device cuda --size base --repeats 3 2>&1 | tee -a "$out/results.md" || status=1
echo -e "\nresults: $out/results.md" ; exit $status
