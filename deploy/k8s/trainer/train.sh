#!/bin/sh
# Train a model into a new directory of MODELS_DIR, the daemons' model.path: `streamlstm train --out`
# writes it under a hidden temporary name and renames it into place, and a daemon serves (and hot-reloads
# to) the sub-directory whose model.json is newest, so it never sees a half-written model. Keeps the
# newest KEEP_RELEASES; to roll back, touch an older one's model.json.
set -eu
models="${MODELS_DIR:-/models}"
release="model-$(date -u +%Y%m%dT%H%M%S.%NZ)"
streamlstm train --data "${TRAIN_DATA:-/data/events.jsonl}" --out "$models/$release" "$@"
ls -1d "$models"/model-* | head -n "-${KEEP_RELEASES:-5}" | xargs -r rm -rf
echo "published $models/$release"
