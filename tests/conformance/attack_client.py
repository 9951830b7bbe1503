"""A hostile agent: sends hand-made HTTP/1.1 bytes or HTTP/2 frames and reports what came back.

Runs as the agent, under `keyward run` (the proxy variables are set: it tunnels with CONNECT)
or in a pod (no proxy variables: it dials the name and the kernel redirects it). Reads a JSON
list of attacks on stdin, prints one JSON object {name: {"statuses": [...], "error": ...}}
(HTTP/1.1 also "body": the start of what follows the first response head).
Standard library plus `h2` (installed with mitmproxy) only. `{env:NAME}` anywhere in an attack is
the agent's value of NAME (a placeholder it was given).
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import sys
from typing import Any
from urllib.parse import urlsplit

READ_BOUND = 15.0  # seconds: a bound on a hung exchange, never an assertion


def dial(host: str, port: int, tunnel: bool) -> socket.socket:
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy and tunnel:
        p = urlsplit(proxy)
        sock = socket.create_connection((p.hostname, p.port), timeout=READ_BOUND)
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("proxy closed during CONNECT")
            head += chunk
        if b" 200 " not in head.split(b"\r\n", 1)[0] + b" ":
            raise ConnectionError(head.split(b"\r\n", 1)[0].decode("latin-1"))
        return sock
    return socket.create_connection((host, port), timeout=READ_BOUND)


def wrap(sock: socket.socket, sni: str, alpn: list[str]) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ctx.set_alpn_protocols(alpn)
    return ctx.wrap_socket(sock, server_hostname=sni)


def read_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (TimeoutError, OSError):
        pass
    return out


def h1(attack: dict[str, Any]) -> dict[str, Any]:
    sock: socket.socket = dial(attack["host"], attack["port"], attack.get("tunnel", True))
    if attack.get("tls", True):
        sock = wrap(sock, attack.get("sni", attack["host"]), ["http/1.1"])
    for part in attack["raw"]:
        sock.sendall(part.encode("latin-1"))
    data = read_all(sock)
    sock.close()
    statuses = [int(m) for m in re.findall(rb"HTTP/1\.[01] (\d{3}) ", data)]
    reasons = [m.decode() for m in re.findall(rb"X-Keyward-Reason: ([^\r\n]*)", data, re.I)]
    body = data.partition(b"\r\n\r\n")[2][:4096].decode("latin-1")  # the first response's
    return {"statuses": statuses, "reasons": reasons, "body": body}


def h2(attack: dict[str, Any]) -> dict[str, Any]:
    import h2.config
    import h2.connection
    import h2.events

    sock = wrap(dial(attack["host"], attack["port"], True), attack["host"], ["h2"])
    if sock.selected_alpn_protocol() != "h2":
        return {"statuses": [], "alpn": sock.selected_alpn_protocol()}
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
    )
    conn.initiate_connection()
    body = attack.get("body", "").encode("latin-1")
    headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in attack["headers"]]
    trailers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in attack.get("trailers", [])]
    conn.send_headers(1, headers, end_stream=not (body or trailers))
    if body:
        conn.send_data(1, body, end_stream=not trailers)
    if trailers:
        conn.send_headers(1, trailers, end_stream=True)
    sock.sendall(conn.data_to_send())
    statuses: list[int] = []
    reasons: list[str] = []
    done = reset = False
    try:
        while not done and (data := sock.recv(65536)):
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    hd = dict(ev.headers)
                    statuses.append(int(hd[b":status"]))
                    if b"x-keyward-reason" in hd:
                        reasons.append(hd[b"x-keyward-reason"].decode())
                elif isinstance(
                    ev,
                    (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated),
                ):
                    done = True
            sock.sendall(conn.data_to_send())
    except (TimeoutError, OSError):
        pass
    sock.close()
    reset = reset or not done  # closed without finishing the stream: refused by the h2 layer
    return {"statuses": statuses, "reasons": reasons, "alpn": "h2", "reset": reset}


def from_env(text: str) -> str:
    """`{env:NAME}` in an attack becomes the agent's own value of NAME (its placeholders)."""
    return re.sub(r"\{env:([A-Z0-9_]+)\}", lambda m: os.environ.get(m.group(1), ""), text)


def main() -> None:
    results: dict[str, Any] = {}
    for attack in json.loads(from_env(sys.stdin.read())):
        try:
            results[attack["name"]] = h2(attack) if attack.get("h2") else h1(attack)
        except Exception as e:  # report, keep going: one attack's failure is its own result
            results[attack["name"]] = {"statuses": [], "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
