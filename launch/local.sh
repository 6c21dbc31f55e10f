#!/usr/bin/env bash
# One machine: all local devices on the `data` mesh axis (the default).
#   bash launch/local.sh runs/pretrain configs/pretrain.py:small [--config.x=y ...]
set -euo pipefail
WORKDIR=${1:-runs/pretrain}
CONFIG=${2:-configs/pretrain.py}
shift $(( $# > 2 ? 2 : $# ))
python -m cmal_jax.main --config="$CONFIG" --workdir="$WORKDIR" "$@"
