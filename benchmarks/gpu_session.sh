#!/usr/bin/env bash
# One device call's worth of GPU work, by part, in the order the open figures need them. Device calls
# are capped at 600 s and sessions at 30 min of device time, so each part fits one call:
#
#   bash benchmarks/gpu_session.sh check    # GPU tests: bf16/fp32 vs HF, int8 compiled vs eager, 2 GPUs (~3 min)
#   bash benchmarks/gpu_session.sh job      # a batch job through conveyor run, cold and warm, HF beside (~6 min)
#   bash benchmarks/gpu_session.sh job256   # the same at batchSize 256, 1,024 prompts (~5 min)
#   bash benchmarks/gpu_session.sh prefill  # attention's cost per new shape; eager prompt passes: packed,
#                                           # unpacked, torch's ops (PREFILL_RUNS picks some) (~3 min)
#   bash benchmarks/gpu_session.sh profile  # job256 with a profile of its warm generation: GPU busy, gaps,
#                                           # and warm with SDPA's cuDNN backend allowed (~5 min)
#   bash benchmarks/gpu_session.sh sweep    # the decode attention kernel's tiles, 16-bit and float8 cache,
#                                           # at the batch job's and long prompts' shapes (~2 min)
#   bash benchmarks/gpu_session.sh fp8      # float8 KV cache: its GPU tests, then job256 warm with it (~5 min)
#   bash benchmarks/gpu_session.sh stagger  # batch 256, sequences ending at different steps: lanes gathered
#                                           # before prompts join, against at once (~5 min)
#   bash benchmarks/gpu_session.sh decode   # 1 GPU, batch 1/16/64 + TTFT 2048, HF beside (~5 min;
#                                           # GPT_FAST=<gpt-fast checkout>: it too, ~3 min more)
#   bash benchmarks/gpu_session.sh tpdiag   # 2 GPUs: a tiny TP 2 generate, stacks of both ranks after 70 s,
#                                           # then with graphs off and with compile off (~3 min)
#   bash benchmarks/gpu_session.sh multi    # 2 GPUs: TP 2 at batch 1 and 16 (~5 min)
#   bash benchmarks/gpu_session.sh pipeline # 2 GPUs: 1 GPU and 2 stages at batch 16 and 64 per stage (~6 min)
#   bash benchmarks/gpu_session.sh train    # 2 GPUs: fine-tuning, 2 stages, 7B shape, against DeepSpeed's pipeline (~6 min)
#   bash benchmarks/gpu_session.sh train4   # 4 GPUs: the same at 2 stages x 2 tensor-parallel (~6 min)
#   bash benchmarks/gpu_session.sh int8     # int8 vs bf16 accuracy and decode speed (~4 min)
#   bash benchmarks/gpu_session.sh kernels  # the step's kernels, and cuBLAS vs the skinny matmul (~6 min)
#
# On the GPU machine the checkout runs with pydantic carried as wheels in the ignored .whl/ folder
# (docs/performance.md); results land in $OUT (the device tool's folder that comes back) or results/.
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:?usage: gpu_session.sh check|job|job256|prefill|profile|sweep|fp8|stagger|decode|tpdiag|multi|pipeline|train|train4|int8|kernels}"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"

if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/worker:$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')

case "$part" in
  check)
    python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
      tests/worker/inference/test_gpu.py tests/worker/inference/test_gpu_bf16.py \
      tests/worker/inference/test_gpu_multi.py tests/worker/inference/pipeline/test_quantize.py 2>&1 | tee "$out/gpu_tests.txt"
    ;;
  job)
    python3 -u benchmarks/job.py --prompts 256 --prompt-lens 32,255 --new-tokens 128 --batch-size 64 \
      --out "$out/job_b64.json"
    python3 -u benchmarks/job.py --prompts 64 --prompt-lens 1000,2000 --new-tokens 256 --batch-size 64 \
      --runs warm --out "$out/job_long.json"
    ;;
  job256)
    # issue 21's throughput target: 12,000 output tokens/s at batchSize 256 (and the decode rate in the job)
    python3 -u benchmarks/job.py --prompts 1024 --prompt-lens 32,255 --new-tokens 128 --batch-size 256 \
      --runs cold,warm --hf-passes 1 --hf-job-runs 1 --out "$out/job_b256.json"
    ;;
  prefill)
    # what a new attention shape costs by backend (cuDNN builds a plan per shape), then the eager
    # prompt passes as they run, without packing (CONVEYOR_PACK_PROMPTS=0), and with torch's ops
    # (CONVEYOR_TRITON_KERNELS=0 keeps every kernel of ours off, packing aside), then the GPU tests.
    # LANES=128 on an 80 GB card: 256 lanes of 513 positions are 69 GB of cache
    python3 -u benchmarks/attention_shapes.py --out "$out/attention_shapes.json"
    for run in "default:" "unpacked:CONVEYOR_PACK_PROMPTS=0" "torch:CONVEYOR_TRITON_KERNELS=0 CONVEYOR_PACK_PROMPTS=0"; do
      case " ${PREFILL_RUNS:-default unpacked torch} " in *" ${run%%:*} "*) ;; *) continue ;; esac
      # shellcheck disable=SC2086  # the flags split into env's arguments
      env ${run#*:} python3 -u benchmarks/batch_step.py --lanes "${LANES:-256}" --contexts 200 --steps 10 \
        --prefill 50x160,16x500,50x32-255 --out "$out/batch_step_${run%%:*}.json"
    done
    python3 -m pytest -q -p no:cacheprovider -rs tests/worker/inference/kernels/test_gpu_eager_prefill.py \
      tests/worker/inference/kernels/test_kernels.py 2>&1 | tee "$out/elementwise_tests.txt"
    ;;
  profile)
    # where the batch-256 job's generation time goes: the GPU's busy time, its idle gaps, its kernels
    python3 -u benchmarks/job.py --prompts 1024 --prompt-lens 32,255 --new-tokens 128 --batch-size 256 \
      --runs "cold,warm,warm:CONVEYOR_PROFILE_DIR=$out/profile,warm:CONVEYOR_CUDNN_ATTENTION=1" \
      --hf-passes 0 --hf-job-runs 0 \
      --out "$out/job_b256_profiled.json"
    ;;
  sweep)
    # a layer's decode attention by (keys per block, warps, stages), against the copy bandwidth
    python3 -u benchmarks/decode_attention_sweep.py --caches bf16,fp8 --out "$out/decode_attention_sweep.json"
    python3 -u benchmarks/decode_attention_sweep.py --caches bf16,fp8 --lanes 64 --positions 1000,2000 \
      --out "$out/decode_attention_sweep_long.json"
    ;;
  fp8)
    # the float8 cache's kernel and accuracy on the GPU, then the batch-256 job with it, bf16 beside it
    python3 -m pytest -q -p no:cacheprovider -rs tests/worker/inference/test_gpu_fp8.py \
      tests/worker/inference/kernels/test_kernels.py 2>&1 | tee "$out/fp8_tests.txt"
    python3 -u benchmarks/batch_step.py --kv-cache-dtype fp8 --prefill 50x160 --out "$out/batch_step_fp8.json"
    python3 -u benchmarks/job.py --prompts 1024 --prompt-lens 32,255 --new-tokens 128 --batch-size 256 \
      --runs cold,warm --hf-passes 0 --hf-job-runs 0 --kv-cache-dtype fp8 --out "$out/job_b256_fp8.json"
    python3 -u benchmarks/job.py --prompts 1024 --prompt-lens 32,255 --new-tokens 128 --batch-size 256 \
      --runs warm --hf-passes 0 --hf-job-runs 0 --out "$out/job_b256_bf16.json"
    ;;
  stagger)
    # each prompt's own max_new_tokens (16-240): lanes free a few at a time, as at EOS in real text
    python3 -u benchmarks/job.py --prompts 1024 --prompt-lens 32,255 --new-tokens 128 --new-tokens-spread 16,240 \
      --batch-size 256 --runs cold,warm,warm:CONVEYOR_ADMISSION=immediate --hf-passes 0 --hf-job-runs 1 \
      --out "$out/job_b256_stagger.json"
    ;;
  decode)
    python3 -u benchmarks/generate.py --model-shape llama2-7b --batch-sizes 1,16,64 --layouts 1x1 \
      --ttft-prompt-len 2048 ${GPT_FAST:+--gpt-fast "$GPT_FAST"} --out "$out/generate_1gpu.json"
    ;;
  tpdiag)
    if [ "$gpus" -lt 2 ]; then echo "tpdiag needs 2 GPUs, this machine has $gpus" >&2; exit 2; fi
    python3 -c "from conveyor.testing.tiny import save_tiny; save_tiny('llama', '/tmp/tiny')"
    gen() {
      CONVEYOR_LOG_FORMAT=json NCCL_DEBUG=WARN timeout "$1" python3 -m conveyor generate --model /tmp/tiny \
        --tensor-parallel 2 --device cuda --dtype bfloat16 --max-new-tokens 10 --prompt hello --prompt "the fox"
    }
    gen 85 >"$out/tp2_default.log" 2>&1 &
    sleep 70
    spy=$(command -v py-spy || echo /tmp/site/bin/py-spy)
    for p in $(pgrep -f "conveyor"); do
      echo "== $p $(tr '\0' ' ' </proc/$p/cmdline | cut -c1-200)"
      "$spy" dump --pid "$p" 2>&1 | head -80
    done >"$out/tp2_stacks.txt" 2>&1 || true
    wait || echo "default: exit $?"
    CONVEYOR_CUDA_GRAPHS=0 gen 60 >"$out/tp2_eager.log" 2>&1; echo "graphs off: exit $?"
    CONVEYOR_TORCH_COMPILE=0 gen 60 >"$out/tp2_no_compile.log" 2>&1; echo "compile off: exit $?"
    ;;
  multi)
    if [ "$gpus" -lt 2 ]; then echo "multi needs 2 GPUs, this machine has $gpus" >&2; exit 2; fi
    python3 -u benchmarks/generate.py --model-shape llama2-7b --batch-sizes 1,16 --layouts 1x2 \
      --skip-hf --out "$out/generate_tp2.json"
    ;;
  pipeline)
    if [ "$gpus" -lt 2 ]; then echo "pipeline needs 2 GPUs, this machine has $gpus" >&2; exit 2; fi
    # one GPU and two stages in the same run; two stages keep a batch per stage in flight
    python3 -u benchmarks/generate.py --model-shape llama2-7b --batch-sizes 16,64 --layouts 1x1,2x1 \
      --fill-stages --skip-hf --out "$out/generate_pp2.json"
    ;;
  train | train4)
    # seq 2048, 8 micro-batches of 1 a step (bubble 1/9 on 2 stages), 2 warm-up + 6 timed steps a side
    if [ "$part" = train ]; then need=2; layout=(--stages 2 --tensor-parallel 1); name=train_pp2
    else need=4; layout=(--stages 2 --tensor-parallel 2); name=train_pp2_tp2; fi
    if [ "$gpus" -lt "$need" ]; then echo "$part needs $need GPUs, this machine has $gpus" >&2; exit 2; fi
    python3 -u benchmarks/train_pipeline.py --model-shape llama2-7b "${layout[@]}" --seq-length 2048 \
      --micro-batch-size 1 --global-batch-size 8 --warmup-steps 2 --steps 6 --timeout 200 \
      --workdir /tmp/conveyor-bench --out "$out/$name.json" 2>&1 | tee "$out/$name.log" || status=$?
    # each side's rank logs, for a side that failed
    cp /tmp/conveyor-bench/conveyor/conveyor-run.log "$out/$name.conveyor.log" 2>/dev/null || true
    for f in /tmp/conveyor-bench/deepspeed/ds.rank*.log; do [ -f "$f" ] && cp "$f" "$out/$name.$(basename "$f")"; done
    exit "${status:-0}"
    ;;
  int8)
    python3 -u benchmarks/quantization.py --model-shape llama2-7b --batch-sizes 1,16 \
      --out "$out/quantization.json"
    ;;
  kernels)
    python3 -u benchmarks/decode_step.py --batch-sizes 1,16,64 --variants product --profile-top 12 \
      --out "$out/decode_step.json"
    python3 -u benchmarks/skinny_matmul.py --batch-sizes 1,16,64 --budget-s 240 --out "$out/skinny_matmul.json"
    ;;
  *)
    echo "unknown part $part: check|job|job256|fp8|stagger|decode|tpdiag|multi|pipeline|train|train4|int8|kernels" >&2
    exit 2
    ;;
esac
