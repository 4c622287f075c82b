#!/bin/sh
# Train a model into a new release directory, then point MODELS_DIR/current at it with one rename: a
# daemon (re)starting at any moment loads the old model or the new one, never a half-written one.
# `streamlstm train --out` itself writes under a temporary name and renames; this keeps older releases
# (the last KEEP_RELEASES) for a rollback: ln -sfn releases/<older> current.tmp && mv -T current.tmp current
set -eu
models="${MODELS_DIR:-/models}"
release="releases/$(date -u +%Y%m%dT%H%M%SZ)"
streamlstm train --data "${TRAIN_DATA:-/data/events.jsonl}" --out "$models/$release" "$@"
ln -sfn "$release" "$models/.current.tmp"
mv -T "$models/.current.tmp" "$models/current"
ls -1d "$models"/releases/* | head -n "-${KEEP_RELEASES:-5}" | xargs -r rm -rf
echo "published $release as $models/current"
