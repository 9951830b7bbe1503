"""A hostile agent that keeps every byte it receives: raw HTTP/1.1 exchanges, run inside the
sandbox (standard library only). Reads a JSON list of requests on stdin, prints a JSON list of
base64 raw responses (status line, headers, body framing, trailers: nothing interpreted).

A request: {"via": "proxy"|"service"|"direct", "tls": bool, "host": str, "port": int,
"path": str, "headers": {..}}. "proxy" tunnels through $HTTPS_PROXY with CONNECT (explicit
mode); "service" dials $KEYWARD_SERVICE_API_URL (host and port are taken from it); "direct"
dials host:port (transparent mode).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import sys
from urllib.parse import urlsplit


def target(req: dict) -> tuple[str, int]:
    if req.get("via") == "service":
        url = urlsplit(os.environ["KEYWARD_SERVICE_API_URL"])
        return str(url.hostname), int(url.port or 80)
    return req["host"], int(req["port"])


def dial(req: dict) -> socket.socket:
    host, port = target(req)
    if req.get("via") == "proxy":
        proxy = urlsplit(os.environ["HTTPS_PROXY"])
        sock = socket.create_connection((proxy.hostname, proxy.port), timeout=20)
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                raise OSError("proxy closed the tunnel")
            answer += data
        if b" 200 " not in answer.split(b"\r\n", 1)[0] + b" ":
            raise OSError(answer.split(b"\r\n", 1)[0].decode("latin-1"))
    else:
        sock = socket.create_connection((host, port), timeout=20)
    if req.get("tls"):
        ctx = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"))
        ctx.set_alpn_protocols(["http/1.1"])
        sock = ctx.wrap_socket(sock, server_hostname=host)
    return sock


def exchange(req: dict) -> bytes:
    sock = dial(req)
    host, port = target(req)
    authority = host if port in (80, 443) else f"{host}:{port}"
    headers = {"Host": authority, "Connection": "close", **req.get("headers", {})}
    head = f"GET {req['path']} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall((head + "\r\n").encode("latin-1"))
    out = b""
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            out += data
    except (TimeoutError, ssl.SSLError, OSError):
        pass
    sock.close()
    return out


def main() -> None:
    results = []
    for req in json.load(sys.stdin):
        try:
            results.append(base64.b64encode(exchange(req)).decode())
        except OSError as e:
            results.append(base64.b64encode(f"ERROR {e}".encode()).decode())
    print(json.dumps(results))


if __name__ == "__main__":
    main()
