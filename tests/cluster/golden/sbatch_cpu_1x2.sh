#!/bin/bash

# Parameters
#SBATCH --error=<JOB_DIR>/logs/%j_0_log.err
#SBATCH --job-name=lamamba-golden
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --open-mode=append
#SBATCH --output=<JOB_DIR>/logs/%j_0_log.out
#SBATCH --partition=cpu
#SBATCH --requeue
#SBATCH --signal=USR2@120
#SBATCH --time=30
#SBATCH --wckey=submitit

# setup
export LAMAMBA_JOB_DIR=<JOB_DIR>
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
export OMP_NUM_THREADS=1
export DS_ACCELERATOR=cpu

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output <JOB_DIR>/logs/%j_%t_log.out --error <JOB_DIR>/logs/%j_%t_log.err --kill-on-bad-exit=1 python3 -u -m submitit.core._submit <JOB_DIR>/logs
