#!/usr/bin/env bash
# The accelerator measurements of one short lease, in order of importance, each step bounded
# by its own timeout so that one failure does not cost the others:
#   1. decode tokens/s at batch 1 against the HBM roofline, and at batch 64, transformers on
#      the same GPU as the peer; batch 1 again in a sampler of 32 rows, as a server runs it,
#      and with the decode loop recorded as CUDA graphs;
#   2. batch-64 decode with its rows spread over 4 LoRA adapters of rank 32, PEFT's
#      mixed-batch generate on the same GPU as the peer;
#   3. where a batch-1 decode step's GPU time goes, per kernel and per JAX operation;
#   4. LoRA training MFU of a Qwen3-1.7B-shaped bf16 model (cuDNN attention), torch+PEFT on
#      the same GPU as the peer;
#   5. the same with our einsum attention (what the fused kernel buys);
#   6. sampler-vs-trainer logprob agreement in fp32 and bf16 on a mid-sized model;
#   7. LoRA training of the Qwen3-30B-A3B MoE shape.
# Logs go to $OUT (or /tmp/bench_accelerator). Runs from a checkout without installing it:
#   bash scripts/bench_accelerator.sh
# MODEL_ARGS replaces the preset (a CPU smoke run: MODEL_ARGS="--hidden 64 --layers 2 ...").
# Steps 1-4 take up to ~13 minutes and all of them ~21; STEPS="sample profile" runs only those
# (a device call is limited to 10 minutes: run "versions sample sample_graphs" in one call,
# then "sample_server_rows sample_adapters profile" in the next). Each sampling step compiles a
# decode program per KV-cache length its rows pass through (32, 48, 64, 96, 128, 160 here). Compiled programs are kept between the steps in
# JAX's persistent cache ($JAX_COMPILATION_CACHE_DIR, default /tmp/bench_accelerator_jax).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# JAX would take 75% of the GPU up front, leaving the torch peer in the same process too little.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/bench_accelerator_jax}"
out="${OUT:-/tmp/bench_accelerator}"
mkdir -p "$out"
model_dir="${MODEL_DIR:-/tmp/bench_accelerator_model}"
model_args=(${MODEL_ARGS:---preset qwen3-1.7b})
torch_device="${TORCH_DEVICE:-cuda}"
py="${PYTHON:-python3}"

step() {  # step NAME SECONDS COMMAND...: runs one measurement, logging to $out/NAME.log
    local name=$1 seconds=$2
    shift 2
    if [[ -n "${STEPS:-}" && " $STEPS " != *" $name "* ]]; then return; fi
    echo "=== $name ($(date +%T))"
    timeout "$seconds" "$@" 2>&1 | grep -v -i "warn" | tee "$out/$name.log"
    echo "=== $name exit ${PIPESTATUS[0]}"
}

step versions 45 "$py" -c "import jax, flax, optax, transformers, torch; \
print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, \
'transformers', transformers.__version__, 'torch', torch.__version__); print(jax.devices())"
step sample 240 "$py" scripts/bench_sample.py "${model_args[@]}" --model-dir "$model_dir" \
    --batches 1,64 --torch-device "$torch_device"
# Batch 1 as a server runs it: one request in a sampler of 32 rows, every row decoded each step
# (XLA's GPU backend turns the one-row q, k|v and o matmuls into a multiply and a reduction).
step sample_server_rows 90 "$py" scripts/bench_sample.py "${model_args[@]}" \
    --model-dir "$model_dir" --batches 1 --rows 32 --no-torch
# Batch 1 again with the decode loop recorded as CUDA graphs: XLA records fusions and library
# calls by default, not while loops or conditionals, so each of a step's ~900 kernels is
# launched on its own. The engine does not set this flag: measure it first.
step sample_graphs 120 env XLA_FLAGS="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
    "$py" scripts/bench_sample.py "${model_args[@]}" --model-dir "$model_dir" --batches 1 --no-torch
step sample_adapters 160 "$py" scripts/bench_sample.py "${model_args[@]}" \
    --model-dir "$model_dir" --batches 64 --adapters 4 --rank 32 --torch-device "$torch_device"
step profile 90 "$py" scripts/profile_decode.py "${model_args[@]}" --model-dir "$model_dir" \
    --batch 1 --new-tokens 32 --top 25 --by-op
# The profiled decode program's optimised HLO, to read its kernels by name after the lease.
dump=$(sed -n 's/^HLO dump: //p' "$out/profile.log" 2>/dev/null | tail -1)
for f in ${dump:+"$dump"/*decode*after_optimizations.txt}; do
    [[ -f "$f" ]] && gzip -c "$f" > "$out/$(basename "$f").gz"
done
step train_cudnn 170 "$py" scripts/bench_train.py "${model_args[@]}" --model-dir "$model_dir" \
    --batch 8 --seq 1024 --steps 5 --attention cudnn --torch-device "$torch_device"
step train_einsum 110 "$py" scripts/bench_train.py "${model_args[@]}" --model-dir "$model_dir" \
    --batch 8 --seq 1024 --steps 5 --attention einsum --no-torch
step logprobs 60 "$py" scripts/measure_logprob_agreement.py --hidden 512 --layers 8 --heads 8 \
    --kv-heads 4 --head-dim 64 --intermediate 1536 --vocab 32000
# The MoE shape needs ~61 GB of bf16 weights: an H200 (or a mesh of several chips).
step train_moe 300 "$py" scripts/bench_train.py --preset qwen3-30b-a3b --no-torch \
    --model-dir "${MOE_MODEL_DIR:-/tmp/bench_accelerator_moe}" --batch 4 --seq 2048 --steps 3 \
    --attention cudnn
