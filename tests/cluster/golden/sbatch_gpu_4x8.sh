#!/bin/bash

# Parameters
#SBATCH --account=diffusion
#SBATCH --constraint='h100&ib'
#SBATCH --cpus-per-task=8
#SBATCH --error=<JOB_DIR>/logs/%j_0_log.err
#SBATCH --exclude=gpu009
#SBATCH --gpus-per-node=8
#SBATCH --job-name=lamamba-golden
#SBATCH --mem=900GB
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --open-mode=append
#SBATCH --output=<JOB_DIR>/logs/%j_0_log.out
#SBATCH --partition=gpu
#SBATCH --qos=high
#SBATCH --requeue
#SBATCH --signal=USR2@180
#SBATCH --time=240
#SBATCH --wckey=submitit

# setup
export LAMAMBA_JOB_DIR=<JOB_DIR>
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=8
export NCCL_SOCKET_IFNAME=ib0

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <JOB_DIR>/logs/%j_%t_log.out --error <JOB_DIR>/logs/%j_%t_log.err --kill-on-bad-exit=1 python3 -u -m submitit.core._submit <JOB_DIR>/logs
