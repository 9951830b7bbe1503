#!/bin/sh
# keyward agent wrapper: wait until the gateway of this pod is ready, then exec the command.
# POSIX sh (no bashisms). Readiness: a TCP connect to the gateway's explicit listener, or a
# ready file when KEYWARD_READY_FILE is set. Gives up after KEYWARD_READY_TIMEOUT seconds.
set -eu

port=${KEYWARD_READY_PORT:-8081}
timeout=${KEYWARD_READY_TIMEOUT:-30}
file=${KEYWARD_READY_FILE:-}

ready() {
    if [ -n "$file" ]; then
        [ -e "$file" ]
        return
    fi
    if command -v python3 >/dev/null 2>&1; then
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" "$port" 2>/dev/null
    elif command -v curl >/dev/null 2>&1; then
        curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null
        [ $? -ne 7 ]
    else
        # /dev/tcp is a bash feature; plain sh falls back to nc when present
        nc -z 127.0.0.1 "$port" 2>/dev/null
    fi
}

waited=0
until ready; do
    if [ "$waited" -ge "$((timeout * 10))" ]; then
        echo "keyward: gateway not ready after ${timeout}s" >&2
        exit 69
    fi
    sleep 0.1
    waited=$((waited + 1))
done

if [ "$#" -eq 0 ]; then
    set -- sh
fi
exec "$@"
