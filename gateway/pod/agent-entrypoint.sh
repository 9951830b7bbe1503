#!/bin/sh
# keyward-agent-entrypoint: wait until the keyward gateway of this pod is ready, then exec "$@".
#
# Ready means either of:
#   - a TCP connect to 127.0.0.1:$KEYWARD_READY_PORT succeeds (default 8081, the gateway's
#     explicit listener; the agent shares the gateway's network namespace), or
#   - the file $KEYWARD_READY_FILE exists (when set; `keyward serve --ready-file` writes it).
# KEYWARD_READY_PORT=0 disables the TCP probe (then KEYWARD_READY_FILE must be set).
# Gives up after $KEYWARD_READY_TIMEOUT seconds (default 30) with exit status 124.
# With no command, starts /bin/sh. POSIX sh: runs under dash, busybox sh and bash.
set -eu

port=${KEYWARD_READY_PORT:-8081}
timeout=${KEYWARD_READY_TIMEOUT:-30}
file=${KEYWARD_READY_FILE:-}

say() { echo "keyward-agent-entrypoint: $*" >&2; }

case $port in '' | *[!0-9]*) say "KEYWARD_READY_PORT must be a number, got '$port'"; exit 2 ;; esac
case $timeout in '' | *[!0-9]*) say "KEYWARD_READY_TIMEOUT must be whole seconds, got '$timeout'"; exit 2 ;; esac
if [ "$port" -eq 0 ] && [ -z "$file" ]; then
    say "KEYWARD_READY_PORT=0 needs KEYWARD_READY_FILE"
    exit 2
fi

# How to try one TCP connect, picked once: the first tool this image has.
probe=
if [ "$port" -ne 0 ]; then
    if command -v bash >/dev/null 2>&1; then
        probe=bash
    elif command -v python3 >/dev/null 2>&1; then
        probe=python3
    elif command -v nc >/dev/null 2>&1; then
        probe=nc
    elif command -v curl >/dev/null 2>&1; then
        probe=curl
    elif [ -z "$file" ]; then
        say "no way to probe 127.0.0.1:$port (needs bash, python3, nc or curl); set KEYWARD_READY_FILE"
        exit 2
    fi
fi

tcp_ready() {
    case $probe in
    bash) bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' keyward-probe "$port" 2>/dev/null ;;
    python3)
        python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1).close()' \
            "$port" 2>/dev/null
        ;;
    nc) nc -z -w 1 127.0.0.1 "$port" 2>/dev/null ;;
    curl)
        # exit 7: could not connect; any other outcome means something accepted the connection
        rc=0
        curl -s -o /dev/null --connect-timeout 1 --max-time 1 "http://127.0.0.1:$port/" 2>/dev/null || rc=$?
        [ "$rc" -ne 7 ] && [ "$rc" -ne 28 ]
        ;;
    *) return 1 ;;
    esac
}

ready() {
    if [ -n "$file" ] && [ -e "$file" ]; then
        return 0
    fi
    [ -n "$probe" ] && tcp_ready
}

# Fractional sleeps where the image's sleep has them. Time is counted in naps (a lower bound of
# the time spent, as each probe takes some too) and capped by the wall clock.
if sleep 0.01 2>/dev/null; then nap=0.2 naps_per_s=5; else nap=1 naps_per_s=1; fi
naps=0
start=$(date +%s)
until ready; do
    if [ "$naps" -ge $((timeout * naps_per_s)) ] || [ $(($(date +%s) - start)) -gt "$timeout" ]; then
        what="127.0.0.1:$port"
        [ "$port" -eq 0 ] && what=$file
        [ "$port" -ne 0 ] && [ -n "$file" ] && what="$what or $file"
        say "gateway not ready after ${timeout}s (waited for $what)"
        exit 124
    fi
    sleep "$nap"
    naps=$((naps + 1))
done

if [ "$#" -eq 0 ]; then
    set -- /bin/sh
fi
exec "$@"
