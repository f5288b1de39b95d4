#!/usr/bin/env bash
# Trains on one GPU machine: one process drives all of its GPUs.
#
# Usage:
#   launch/gpu/single_node.sh CONFIG WORKDIR [more flags for launch/train.py ...]
#   launch/gpu/single_node.sh configs/owt_base.py /ckpt/owt \
#       --config.data.train_files='/data/owt/train_*.npy' --config.data.val_files=/data/owt/val.npy
#   CUDA_VISIBLE_DEVICES=0,1,2,3 launch/gpu/single_node.sh configs/slimpajama.py:66M /ckpt/sp66m ...
#
# Install first: pip install -e ".[cuda]". The batch is split over every visible
# GPU (mesh.shape (-1, 1, 1)); add --config.mesh.shape='(2,-1,1)' for data x FSDP.
# Environment: PYTHON (default python), XLA_FLAGS and XLA_PYTHON_CLIENT_MEM_FRACTION
# (defaults below), LOG (default WORKDIR/train.log when WORKDIR is local).
set -euo pipefail

if [[ $# -lt 2 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 2
fi
CONFIG="$1"
WORKDIR="$2"
shift 2
PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/../.."

# GPU performance flags (XLA_FLAGS is read when JAX starts; flag names change between jaxlib versions,
# and an unknown flag stops XLA, so only a long-standing one is on by default):
#   --xla_gpu_enable_latency_hiding_scheduler=true   overlap collectives with compute (multi-GPU)
# Worth trying per workload:
#   --xla_gpu_enable_triton_gemm=false                cuBLAS for every matmul instead of Triton
#   --xla_gpu_all_reduce_combine_threshold_bytes=134217728   fewer, larger gradient all-reduces
#   --xla_gpu_enable_highest_priority_async_stream=true      collectives on a high-priority stream
#   --xla_gpu_enable_command_buffer=                  disables CUDA graphs (debugging launch overheads)
# Environment variables:
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.9   share of GPU memory JAX preallocates (default 0.75)
#   NCCL_DEBUG=INFO                      print NCCL's topology and transport choices
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export PYTHONUNBUFFERED=1

if [[ -z "${LOG:-}" && "${WORKDIR}" != *://* ]]; then
  mkdir -p "${WORKDIR}"
  LOG="${WORKDIR}/train.log"
fi
echo "XLA_FLAGS=${XLA_FLAGS}"
"${PYTHON}" -c 'import jax; print(jax.device_count(), "device(s):", jax.devices()[0].device_kind)'
"${PYTHON}" launch/train.py --config="${CONFIG}" --workdir="${WORKDIR}" "$@" 2>&1 | tee -a "${LOG:-/dev/null}"
