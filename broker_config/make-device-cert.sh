#!/usr/bin/env bash
# Issue a client certificate for one device (or the coordinator) from the development CA.
#
#   broker_config/make-device-cert.sh DIR NAME
#
# NAME becomes the certificate's CN, which the production broker uses as the user name
# (use_identity_as_username): an agent's NAME must be its agent id, the coordinator's
# "coordinator". Writes DIR/NAME.crt and DIR/NAME.key; DIR must hold ca.crt and ca.key.
set -euo pipefail
dir=${1:?usage: make-device-cert.sh DIR NAME}
name=${2:?usage: make-device-cert.sh DIR NAME}
case "$name" in
    *[!A-Za-z0-9_.:-]* | [!A-Za-z0-9]*) echo "invalid name: $name" >&2; exit 2 ;;
esac
umask 077
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/CN=$name" -keyout "$dir/$name.key" -out "$dir/$name.csr" 2>/dev/null
openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 825 -out "$dir/$name.crt" \
    -extfile <(printf 'extendedKeyUsage=clientAuth\n') 2>/dev/null
rm -f "$dir/$name.csr"
echo "certificate for $name in $dir/$name.crt"
