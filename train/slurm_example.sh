#!/usr/bin/env bash
# Open-Sora 1.0's recipe on 8 nodes x 8 GPUs under Slurm: one torchrun per node, rendezvous on the first node.
#
#   sbatch train/slurm_example.sh                          # submit; re-submitting resumes (finished stages skipped)
#   sbatch --nodes 2 train/slurm_example.sh --set stages.1.steps=1000   # extra arguments go to train/train.py
#
# Pre-emption: --signal asks Slurm for SIGTERM 5 minutes before the time limit; torchrun passes it to the
# trainers, which finish the current step, write a checkpoint and exit 0; the script then requeues the job
# (--requeue also lets Slurm requeue it after a node failure) and the next run resumes from that checkpoint. --shutdown-timeout is how long torchrun waits for
# that checkpoint before it kills the trainers (default 30 s: too short for a sharded XL/2 checkpoint).
# Multi-rank runs look at the signal every `logging.log_every` steps, so keep log_every x step time plus one
# checkpoint save well under the 300 s of notice.
#SBATCH --job-name=opensora-v1
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:TERM@300
#SBATCH --requeue
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

CONFIG=${CONFIG:-configs/opensora_v1/recipe.yaml}
OUTPUT_DIR=${OUTPUT_DIR:-runs/opensora-v1}      # must be on a file system every node sees
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# srun runs in the background so that this shell can catch Slurm's TERM (B:TERM goes to the batch shell only),
# pass it on (srun forwards it to torchrun, torchrun to the trainers) and requeue the job once they have saved.
srun --kill-on-bad-exit=1 .venv/bin/torchrun \
    --nnodes "$SLURM_NNODES" --nproc_per_node 8 \
    --rdzv_backend c10d --rdzv_endpoint "$HEAD_NODE:29500" --rdzv_id "$SLURM_JOB_ID" \
    --shutdown-timeout 280 \
    train/train.py --config "$CONFIG" --output-dir "$OUTPUT_DIR" "$@" &
SRUN_PID=$!
REQUEUE=0
trap 'REQUEUE=1; kill -TERM "$SRUN_PID"' TERM
set +e
wait "$SRUN_PID"; STATUS=$?
if [ "$REQUEUE" = 1 ]; then
    wait "$SRUN_PID"; STATUS=$?            # the first wait was interrupted by the signal
    scontrol requeue "$SLURM_JOB_ID"       # the next run resumes from the checkpoint just written
fi
exit "$STATUS"
