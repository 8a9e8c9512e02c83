#!/bin/bash
# One CoDeQ training run on several nodes x GPUs (DDP through torchrun).
# Submit from this directory:
#   cd slurm && sbatch multi_node.sh [CONFIG] [extra run_training.py args]
# e.g. sbatch --nodes 4 multi_node.sh ../configs/deadzone_vit.yaml --set epochs=100
#
# srun starts ONE torchrun per node; each torchrun starts GPUS_PER_NODE
# training processes and they meet at the c10d rendezvous on the first node.
# batch_size in the config is PER PROCESS: the global batch is
# batch_size x nodes x GPUS_PER_NODE (the learning rate is not rescaled).
# The checkpoint, data set and config paths must be visible on every node
# (shared file system); only rank 0 writes the run directory.
#SBATCH --job-name=codeq-ddp
#SBATCH --output=codeq-ddp-%j.out
#SBATCH --error=codeq-ddp-%j.err
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --cpus-per-task=32
#SBATCH --mem=128G
#SBATCH --time=24:00:00

set -euo pipefail

CONFIG=${1:-../configs/deadzone_resnet20.yaml}
shift || true

GPUS_PER_NODE=${GPUS_PER_NODE:-4}   # keep equal to --gres=gpu:N
NNODES=${SLURM_NNODES:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR MASTER_PORT

# DataLoader workers per process: the CPUs of a node shared by its GPUs.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# A failed or stuck NCCL collective is aborted after dist_timeout_min (config,
# default 30 min) and brings the job down instead of hanging it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# Uncomment to debug NCCL set-up problems:
# export NCCL_DEBUG=INFO

# Activate your environment here, e.g.:
# source ../.venv/bin/activate

echo "nodes $NNODES x $GPUS_PER_NODE GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT"

# Paths in the config are relative to this directory: point data and runs at the repo root.
# To continue a run after a time limit: add --resume RUN_DIR/checkpoint.th (any world size).
srun --kill-on-bad-exit=1 torchrun \
    --nnodes "$NNODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    ../run_training.py --config "$CONFIG" --device cuda \
    --set dataset.root=../data --set save_dir=../save_temp "$@"
