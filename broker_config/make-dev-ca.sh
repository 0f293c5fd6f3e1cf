#!/usr/bin/env bash
# Create a development CA and the broker's server certificate with openssl.
#
#   broker_config/make-dev-ca.sh DIR [HOSTNAME]...
#
# Writes DIR/ca.crt, DIR/ca.key (keep it offline in real life), DIR/server.crt and
# DIR/server.key. The server certificate names every HOSTNAME given (default: localhost)
# plus 127.0.0.1 and ::1, so clients can verify the host they connect to.
# Then issue one certificate per device with make-device-cert.sh.
set -euo pipefail
dir=${1:?usage: make-dev-ca.sh DIR [HOSTNAME]...}
shift
hosts=("${@:-localhost}")
mkdir -p "$dir"
umask 077

san="IP:127.0.0.1,IP:::1"
for h in "${hosts[@]}"; do san="DNS:$h,$san"; done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 825 \
    -subj "/CN=edge-offload development CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null

openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=${hosts[0]}" -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 825 -out "$dir/server.crt" \
    -extfile <(printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth\n' "$san") 2>/dev/null
rm -f "$dir/server.csr"
chmod 644 "$dir/ca.crt" "$dir/server.crt"
echo "CA and server certificate for ${hosts[*]} in $dir"
