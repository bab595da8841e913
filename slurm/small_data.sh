#!/bin/bash
# CIFAR-10/100 or Tiny-ImageNet, PreAct ResNet-18 (or WRN-16-8), the paper's Table 1 setting on
# one GPU: 2,000 CIFAR epochs (1,200 for Tiny-ImageNet) at the authors' batch and lr.
# Submit from the repository root, naming the recipe (default: CIFAR-100 AlignMixup):
#   RECIPE=recipes/cifar10/alignmixup.yaml DATA_ROOT=/datasets/cifar10 sbatch slurm/small_data.sh
#   EXTRA_OVERRIDES="model.name=wrn16_8" RUN_NAME=cifar100/alignmixup_wrn16_8 sbatch slurm/small_data.sh
# Settings: environment variables (top of slurm/launch.sh) and sbatch flags, which override the
# lines below (docs/small_data.md). Near the time limit the job checkpoints and requeues itself,
# and resumes in the same MLflow run.
#SBATCH --job-name=small_data
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
root=${PIPELINE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
export RECIPE=${RECIPE:-recipes/cifar100/alignmixup.yaml}
exec bash "$root/slurm/launch.sh" "$@"
