#!/usr/bin/env bash
# The stack's TLS material, made by `make secrets` (scripts/secrets.sh calls this):
#
#   compose/secrets/tls_ca.crt        the stack's own CA: every verifier gets this one
#   compose/secrets/tls_ca.key        its key: stays on the operator's host, mounted nowhere
#   compose/secrets/gateway_tls.crt   the edge certificate (Nginx), signed by the CA
#   compose/secrets/gateway_tls.key
#   compose/secrets/engine_tls.crt    the engines' certificate (SGLang --ssl-certfile)
#   compose/secrets/engine_tls.key
#
# Names a certificate must cover beyond the defaults come from the environment, comma-
# separated, as DNS:name or IP:address: GATEWAY_TLS_SANS (the names clients use) and
# ENGINE_TLS_SANS (the node hosts' addresses). A user with their own CA or certificates
# puts their files at these paths: files already there are kept, never overwritten,
# unless `--rotate` is given (then the leaf certificates are issued again; the CA is kept,
# so verifiers need nothing new). Usage: tls-certs.sh [--rotate] [SECRETS_DIR]
set -euo pipefail
# shellcheck source=lib.sh
. "$(dirname "$0")/lib.sh"
have openssl || apt_install openssl
rotate=0
if [ "${1:-}" = --rotate ]; then rotate=1; shift; fi
dir="${1:-$(cd "$(dirname "$0")/.." && pwd)/compose/secrets}"
mkdir -p "$dir"
umask 077
days_ca=3650
days_leaf=397   # the longest lifetime public CAs issue; rotate with ROTATE=1

if [ ! -s "$dir/tls_ca.crt" ] || [ ! -s "$dir/tls_ca.key" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -days "$days_ca" -subj "/CN=sglang-ha stack CA" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/tls_ca.key" -out "$dir/tls_ca.crt" 2>/dev/null
  echo "made the stack CA: $dir/tls_ca.crt" >&2
fi

issue() {  # NAME SANS: NAME.crt + NAME.key, signed by the CA
  local name="$1" sans="$2"
  if [ "$rotate" = 0 ] && [ -s "$dir/$name.crt" ] && [ -s "$dir/$name.key" ]; then return; fi
  local tmp
  tmp="$(mktemp -d)"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -sha256 \
    -subj "/CN=sglang-ha $name" -keyout "$tmp/key" -out "$tmp/csr" 2>/dev/null
  printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
    "$sans" > "$tmp/ext"
  openssl x509 -req -in "$tmp/csr" -CA "$dir/tls_ca.crt" -CAkey "$dir/tls_ca.key" \
    -CAcreateserial -CAserial "$tmp/serial" -days "$days_leaf" -sha256 \
    -extfile "$tmp/ext" -out "$tmp/crt" 2>/dev/null
  # Rewritten in place (not renamed): a bind mount of the file sees the new content,
  # which is how a running Nginx or engine picks up a rotated certificate.
  cat "$tmp/key" > "$dir/$name.key"
  cat "$tmp/crt" > "$dir/$name.crt"
  rm -rf "$tmp"
  echo "issued $dir/$name.crt for $sans" >&2
}

join() { local IFS=,; echo "$*"; }
gateway_sans="DNS:localhost,IP:127.0.0.1,IP:::1,DNS:gateway,DNS:nginx"
engine_sans="DNS:localhost,IP:127.0.0.1,DNS:node-1,DNS:node-2,DNS:node-3,DNS:node-4,DNS:engine"
issue gateway_tls "$(join "$gateway_sans" ${GATEWAY_TLS_SANS:+"$GATEWAY_TLS_SANS"})"
issue engine_tls "$(join "$engine_sans" ${ENGINE_TLS_SANS:+"$ENGINE_TLS_SANS"})"
# Readable by the containers' unprivileged users through their bind mounts (the folder,
# 0700, keeps everyone else on this host out) -- except the CA key, which no container gets.
chmod 0644 "$dir"/gateway_tls.* "$dir"/engine_tls.* "$dir/tls_ca.crt"
chmod 0600 "$dir/tls_ca.key"
