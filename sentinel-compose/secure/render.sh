#!/bin/sh
# Print secure/<FILE> with its placeholders filled in from the environment:
# TLS_DIR (where ca.crt, redis.crt and redis.key are), DATA_PASSWORD,
# WARREN_PASSWORD, SENTINEL_PASSWORD, and MASTER_NAME (mymaster). Used by
# local.sh and compose.secure.yaml (POSIX sh: it runs in the redis image).
#
#   render.sh redis.conf|sentinel.conf
set -eu
[ $# -eq 1 ] || { echo "usage: $0 redis.conf|sentinel.conf" >&2; exit 64; }
: "${TLS_DIR:?}" "${DATA_PASSWORD:?}" "${WARREN_PASSWORD:?}" "${SENTINEL_PASSWORD:?}"
sed -e "s|@TLS_DIR@|$TLS_DIR|g" -e "s|@DATA_PASSWORD@|$DATA_PASSWORD|g" \
    -e "s|@WARREN_PASSWORD@|$WARREN_PASSWORD|g" \
    -e "s|@SENTINEL_PASSWORD@|$SENTINEL_PASSWORD|g" \
    -e "s/ mymaster / ${MASTER_NAME:-mymaster} /" "$(dirname "$0")/$1"
