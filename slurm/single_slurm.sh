#!/bin/bash
# One CoDeQ training run on one GPU.  Submit from this directory:
#   cd slurm && sbatch single_slurm.sh [CONFIG] [extra run_training.py args]
# e.g. sbatch single_slurm.sh ../configs/deadzone_vit.yaml --set epochs=100
#SBATCH --job-name=codeq
#SBATCH --output=codeq-%j.out
#SBATCH --error=codeq-%j.err
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --gres=gpu:1
#SBATCH --mem=32G
#SBATCH --time=24:00:00

set -euo pipefail

CONFIG=${1:-../configs/deadzone_resnet20.yaml}
shift || true

# Activate your environment here, e.g.:
# source ../.venv/bin/activate
nvidia-smi || true

# Paths in the config are relative to this directory: point data and runs at the repo root.
# To continue a run after a time limit: add --resume RUN_DIR/checkpoint.th
python ../run_training.py --config "$CONFIG" --device cuda \
    --set dataset.root=../data --set save_dir=../save_temp "$@"
