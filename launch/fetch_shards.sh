#!/usr/bin/env bash
# Copies this TPU worker's own shards of a sharded folder on GCS (python -m
# cmal_jax.convert shard; docs/data.md, "Sharded folders") to its local
# disk, for --config.data.read=own_shards: meta.json, the store and caption
# shards k with k % WORKERS == WORKER, and the files kept whole (the val
# split and its images). Run from the checkout, on every worker;
# launch/tpu_pod.sh does when DATA_GCS is set.
#
#   bash launch/fetch_shards.sh gs://bucket/coco /tmp/cmal-data
#
# WORKER is TPU_WORKER_ID, else the TPU VM's metadata agent-worker-number;
# WORKERS counts TPU_WORKER_HOSTNAMES, else the metadata's
# worker-network-endpoints (where jax.distributed finds them too). One
# process a worker: the run's process count is WORKERS, which must divide
# the shard count (refused here otherwise, naming both).
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 gs://BUCKET/FOLDER LOCAL_DIR" >&2
  exit 2
fi
SRC=${1%/}; DEST=$2
MD=http://metadata.google.internal/computeMetadata/v1/instance/attributes
metadata() { curl -sf -H Metadata-Flavor:Google "$MD/$1"; }
WORKER=${TPU_WORKER_ID:-$(metadata agent-worker-number)}
HOSTS=${TPU_WORKER_HOSTNAMES:-$(metadata worker-network-endpoints)}
WORKERS=$(tr ',' '\n' <<< "$HOSTS" | grep -c .)
mkdir -p "$DEST"
gcloud storage cp "$SRC/meta.json" "$DEST/"
FILES=$(python -m cmal_jax.data.shards "$DEST" --process_index="$WORKER" \
  --process_count="$WORKERS")
mapfile -t URLS < <(sed "s|^|$SRC/|" <<< "$FILES")
gcloud storage cp "${URLS[@]}" "$DEST/"
echo "Worker $WORKER of $WORKERS: ${#URLS[@]} files of $SRC in $DEST."
