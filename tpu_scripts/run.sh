#!/usr/bin/env bash
# Start the same command on every worker, detached, each with its own log:
#   ~/podformer-logs/$RUN_NAME.<hostname>.log, and the exit code in ~/podformer-logs/$RUN_NAME.exit.
#   TPU_NAME=pf ZONE=us-central2-b tpu_scripts/run.sh python3 train.py --config=configs/gpt.py:gpt2_small \
#       --workdir=gs://my-bucket/gpt2_small
# jax.distributed finds the other workers by itself on TPU VMs; the same command resumes after a preemption.
# shellcheck source-path=SCRIPTDIR
source "$(dirname "$0")/common.sh"
if [ $# -eq 0 ]; then
  echo "usage: tpu_scripts/run.sh python3 train.py|finetune.py [flags...]" >&2
  exit 2
fi

logs="\$HOME/podformer-logs" # expanded on the workers
# The previous run's exit code is removed first, so the babysitter never mistakes it for this run's.
job="$(printf '%q ' "$@"); echo \$? > $logs/$RUN_NAME.exit"
on_workers "mkdir -p $logs && rm -f $logs/$RUN_NAME.exit && cd ~/$REMOTE_DIR && \
nohup bash -c ${job@Q} > $logs/$RUN_NAME.\$(hostname).log 2>&1 < /dev/null &"
