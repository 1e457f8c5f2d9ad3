#!/usr/bin/env bash
# Entry point of the image. The cluster description ($CLUSTER_CONFIG, mounted) says what
# each node runs; $NODE_NAME says which node this container is.
#   head | worker   run this node's part: Ray (head or worker), the LMCache server where the
#                   description puts it, and on the head `vllm serve` (vllm-ampere cluster launch)
#   render          print every node's commands and the per-stage memory table
#   check           memory fit; with NODE_NAME set also the live services of this node
#   health          the image's HEALTHCHECK: this node's live services (exit 0 when healthy)
#   lmcache         only the LMCache server, in the foreground (arguments as its own)
set -euo pipefail
cmd=${1:-help}
shift || true
need_node() {
    if [[ -z "${NODE_NAME:-}" ]]; then
        echo "vllm-ampere-entrypoint: set NODE_NAME to this node's name in $CLUSTER_CONFIG" >&2
        exit 2
    fi
}
case "$cmd" in
    head | worker)
        need_node
        exec vllm-ampere cluster launch "$CLUSTER_CONFIG" --node "$NODE_NAME" --role "$cmd" "$@"
        ;;
    render)
        exec vllm-ampere cluster render "$CLUSTER_CONFIG" "$@"
        ;;
    check)
        if [[ -n "${NODE_NAME:-}" ]]; then
            exec vllm-ampere cluster check "$CLUSTER_CONFIG" --live --node "$NODE_NAME" "$@"
        fi
        exec vllm-ampere cluster check "$CLUSTER_CONFIG" "$@"
        ;;
    health)
        need_node
        vllm-ampere cluster check "$CLUSTER_CONFIG" --live --node "$NODE_NAME" > /dev/null
        ;;
    lmcache)
        exec python -m lmcache.v1.multiprocess.http_server "$@"
        ;;
    help | --help | -h)
        sed -n '2,11p' "$0"
        ;;
    *)
        exec "$cmd" "$@"
        ;;
esac
