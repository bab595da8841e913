#!/bin/bash
# ImageNet, ResNet-50, 300 epochs: PuzzleMix.
# Default: one node of 8 GPUs at 128 images each, the authors' batch of 1024 at lr 0.1.
# Submit from the repository root:  sbatch slurm/imagenet_puzzlemix.sh
# Settings: environment variables (top of slurm/launch.sh) and sbatch flags, which override the
# lines below (docs/slurm.md). Near the time limit the job checkpoints and requeues itself, and
# resumes in the same MLflow run.
#SBATCH --job-name=imagenet_puzzlemix
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
root=${PIPELINE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
export RECIPE=recipes/imagenet/puzzlemix.yaml
exec bash "$root/slurm/launch.sh" "$@"
