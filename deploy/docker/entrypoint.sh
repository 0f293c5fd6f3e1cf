#!/bin/sh
# Entrypoint of the edge-offload container images.
#
#   agent|coordinator|submit|agents|jobs [ARGS...]
#       runs `edge-offload [--log-json] --log-level $EDGE_OFFLOAD_LOG_LEVEL COMMAND
#       --broker $EDGE_OFFLOAD_BROKER ARGS...`; a --broker in ARGS wins (the last one does).
#   anything else
#       runs `edge-offload ARGS...` (schema, --help, ...).
#
# Why a script: `edge-offload agent` and `coordinator` connect to their built-in default
# broker (127.0.0.1:1883, useless in a container) unless --broker is given, even when
# EDGE_OFFLOAD_BROKER is set; an exec-form CMD cannot expand the variable itself.
# EDGE_OFFLOAD_USERNAME and EDGE_OFFLOAD_PASSWORD are read by edge-offload directly.
# `exec` makes edge-offload the process that receives SIGTERM (it drains, then exits).
set -eu

case "${1:-}" in
    agent | coordinator | submit | agents | jobs)
        command=$1
        shift
        if [ "${EDGE_OFFLOAD_LOG_JSON:-0}" = "1" ]; then
            set -- --log-json --log-level "${EDGE_OFFLOAD_LOG_LEVEL:-INFO}" "$command" \
                --broker "${EDGE_OFFLOAD_BROKER:-mqtt://broker:1883}" "$@"
        else
            set -- --log-level "${EDGE_OFFLOAD_LOG_LEVEL:-INFO}" "$command" \
                --broker "${EDGE_OFFLOAD_BROKER:-mqtt://broker:1883}" "$@"
        fi
        ;;
esac
exec edge-offload "$@"
