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
# records go to --config.data.dir on a disk every worker can read, or:
#
# Sharded data on GCS (docs/data.md, "Sharded folders"): a folder written
# by `python -m cmal_jax.convert shard` and copied to the bucket,
#   gs://bucket/coco/{meta.json, regions-0000k-of-0000N.array_record(.index.json),
#                     pretrain-0000k-of-0000N.array_record, val.array_record,
#                     regions.array_record(.index.json)}
# With DATA_GCS set, each worker first copies its own shards (k % WORKERS ==
# WORKER; launch/fetch_shards.sh) and the files kept whole to DATA_LOCAL
# (default /tmp/cmal-data) on its local disk, and the run reads them with
# --config.data.read=own_shards --config.data.dir=DATA_LOCAL:
#
#   DATA_GCS=gs://bucket/coco bash launch/tpu_pod.sh my-tpu us-central2-b \
#       gs://bucket/runs/coco configs/pretrain.py:base \
#       --config.model.region_feat_dim=2048
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
DATA_FLAGS=""
if [ -n "${DATA_GCS:-}" ]; then
  DATA_LOCAL=${DATA_LOCAL:-/tmp/cmal-data}
  "${SSH[@]}" --command="cd cmal-jax && \
    bash launch/fetch_shards.sh $DATA_GCS $DATA_LOCAL"
  DATA_FLAGS="--config.data.read=own_shards --config.data.dir=$DATA_LOCAL"
fi
# nohup: the run survives the ssh session; each worker logs to its own file.
"${SSH[@]}" --command="cd cmal-jax && nohup python -m cmal_jax.main \
  --config=$CONFIG --workdir=$WORKDIR $DATA_FLAGS $* \
  > ~/cmal-jax.log 2>&1 &"
echo "Started on every worker of $TPU; logs: ~/cmal-jax.log on each worker,"
echo "metrics: $WORKDIR/metrics.jsonl (process 0)."
