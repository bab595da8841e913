#!/bin/bash
# CUB-200-2011 WSOL, ResNet-50 fine-tuned from ImageNet weights: CAM baseline.
# Default: one GPU at wsolevaluation's batch of 32. Starts from $PRETRAINED, by default
# $OUTPUT_ROOT/imagenet_baseline/model_final.safetensors (the ImageNet baseline run).
# Submit from the repository root:  sbatch slurm/cub_wsol_baseline.sh
# Settings: environment variables (top of slurm/launch.sh) and sbatch flags, which override the
# lines below (docs/slurm.md). Near the time limit the job checkpoints and requeues itself, and
# resumes in the same MLflow run.
#SBATCH --job-name=cub_wsol_baseline
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
root=${PIPELINE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
export RECIPE=recipes/cub_wsol/baseline.yaml
export PRETRAINED="${PRETRAINED:-${OUTPUT_ROOT:-$root/runs}/imagenet_baseline/model_final.safetensors}"
exec bash "$root/slurm/launch.sh" "$@"
