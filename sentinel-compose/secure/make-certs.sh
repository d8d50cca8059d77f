#!/usr/bin/env bash
# Make a throwaway CA and one certificate for every node of the secured
# topology (data nodes and sentinels share it), plus a client certificate
# for Warren:
#
#   make-certs.sh DIR
#
# writes DIR/ca.crt, DIR/redis.crt, DIR/redis.key, DIR/client.crt and
# DIR/client.key. The node certificate names the compose host names and
# 127.0.0.1 (local.sh): a client checks it against the address it dialled,
# which for a data node is the one Sentinel announces. For production, use
# certificates from your own CA.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 DIR" >&2; exit 64; }
DIR=$1
mkdir -p "$DIR"
cd "$DIR"
ossl() { openssl "$@" 2>/dev/null; }
ossl req -x509 -new -nodes -newkey rsa:2048 -sha256 -days 30 \
  -keyout ca.key -out ca.crt -subj "/CN=warren-test-ca"
sans="DNS:localhost,DNS:redis-primary,DNS:redis-replica-1,DNS:redis-replica-2"
sans="$sans,DNS:sentinel-1,DNS:sentinel-2,DNS:sentinel-3,IP:127.0.0.1"
leaf() { # name subject extensions
  ossl req -new -nodes -newkey rsa:2048 -keyout "$1.key" -out "$1.csr" -subj "/CN=$2"
  printf '%s\n' "$3" > "$1.ext"
  ossl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial \
    -days 30 -sha256 -extfile "$1.ext" -out "$1.crt"
  rm -f "$1.csr" "$1.ext"
}
leaf redis redis "subjectAltName=$sans
extendedKeyUsage=serverAuth,clientAuth"
leaf client warren "extendedKeyUsage=clientAuth"
# redis-server runs as the invoking user in local.sh, as redis (uid 999)
# in the image: the keys must be readable by it.
chmod 0644 redis.key client.key
