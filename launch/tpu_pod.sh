#!/usr/bin/env bash
# Cloud TPU pod slice: copy this checkout to every worker, install the
# requirements there and start the same command on all of them. Creates
# nothing: the TPU VM must exist. The workdir must be on GCS (gs://...) so
# that all workers save and restore one checkpoint together.
#
#   bash launch/tpu_pod.sh my-tpu us-central2-b gs://bucket/runs/base \
#       configs/pretrain.py:base --config.sharding=fsdp
#
# jax.distributed finds the pod's workers by itself (TPU_WORKER_HOSTNAMES).
# Data: with a gs:// workdir each worker generates the synthetic world into
# its own local temp folder (ArrayRecord is read from local disk); real
# records go to --config.data.dir on a disk every worker can read.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE gs://WORKDIR [CONFIG] [--config.x=y ...]" >&2
  exit 2
fi
TPU=$1; ZONE=$2; WORKDIR=$3; CONFIG=${4:-configs/pretrain.py:base}
shift $(( $# > 4 ? 4 : $# ))
case "$WORKDIR" in gs://*) ;; *)
  echo "WORKDIR must be gs://... (shared by all workers), got $WORKDIR" >&2
  exit 2;;
esac
HERE=$(cd "$(dirname "$0")/.." && pwd)
SSH=(gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all)
tar -C "$HERE" --exclude=runs --exclude=.git -czf /tmp/cmal-jax.tgz .
gcloud compute tpus tpu-vm scp /tmp/cmal-jax.tgz "$TPU":~/ --zone="$ZONE" \
  --worker=all
"${SSH[@]}" --command="mkdir -p cmal-jax && tar -xzf cmal-jax.tgz -C cmal-jax \
  && cd cmal-jax && pip install -q -r requirements.txt 'jax[tpu]==0.10.2' gcsfs"
# nohup: the run survives the ssh session; each worker logs to its own file.
"${SSH[@]}" --command="cd cmal-jax && nohup python -m cmal_jax.main \
  --config=$CONFIG --workdir=$WORKDIR $* \
  > ~/cmal-jax.log 2>&1 &"
echo "Started on every worker of $TPU; logs: ~/cmal-jax.log on each worker,"
echo "metrics: $WORKDIR/metrics.jsonl (process 0)."
