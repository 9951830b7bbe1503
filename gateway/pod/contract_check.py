"""The sandbox contract (DESIGN §6), attempted from inside the agent. Standard library only:
this file is copied into the agent and run with its python3, as the agent's user.

It is given *hashes* of the real secrets and of the CA key, never the values, and reports one
result per attack as JSON on stdout. Every check is an attempt with an observable outcome.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from typing import Any

TOKEN = re.compile(rb"[A-Za-z0-9_\-.+/=:~]{6,}")
SKIP_DIRS = ("/proc", "/sys", "/dev", "/run/keyward-none")
MAX_FILE = 4 * 1024 * 1024
FAST = 3.0  # a refusal slower than this counts as a hang
PTRACE_SEIZE = 0x4206


def _result(check: str, ok: bool, detail: str) -> dict[str, object]:
    return {"check": check, "ok": ok, "detail": detail}


def _windows(blob: bytes, lengths: set[int]) -> Iterator[bytes]:
    for m in TOKEN.finditer(blob):
        tok = m.group(0)
        for n in lengths:
            if len(tok) == n:
                yield tok
            elif len(tok) > n:
                for i in range(len(tok) - n + 1):
                    yield tok[i : i + n]


def _find_hashes(blob: bytes, wanted: dict[int, set[str]]) -> bool:
    lengths = set(wanted)
    return any(hashlib.sha256(w).hexdigest() in wanted[len(w)] for w in _windows(blob, lengths))


def _readable_files(roots: list[str], budget: float) -> Iterator[str]:
    deadline = time.monotonic() + budget
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            if time.monotonic() > deadline:
                return
            dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in SKIP_DIRS]
            for f in filenames:
                yield os.path.join(dirpath, f)


def check_secrets(spec: dict[str, Any]) -> list[dict[str, object]]:
    wanted: dict[int, set[str]] = {}
    for h in spec.get("secret_hashes", []):
        wanted.setdefault(int(h["len"]), set()).add(h["sha256"])
    out = []
    env_blob = "\n".join(f"{k}={v}" for k, v in os.environ.items()).encode()
    out.append(
        _result(
            "no secret in environment",
            not _find_hashes(env_blob, wanted),
            f"{len(os.environ)} variables searched",
        )
    )
    proc_hits, procs = [], 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for part in ("environ", "cmdline"):
            try:
                with open(f"/proc/{pid}/{part}", "rb") as fh:
                    blob = fh.read(MAX_FILE)
            except OSError:
                continue
            procs += 1
            if _find_hashes(blob, wanted):
                proc_hits.append(f"/proc/{pid}/{part}")
    out.append(
        _result(
            "no secret in /proc (environ, cmdline)",
            not proc_hits,
            ", ".join(proc_hits) or f"{procs} readable entries searched",
        )
    )
    file_hits, key_hits, files = [], [], 0
    key_line = spec.get("ca_key_line_sha256")
    for path in _readable_files(spec.get("scan_roots", ["/"]), spec.get("scan_seconds", 60)):
        try:
            if not os.path.isfile(path) or os.path.getsize(path) > MAX_FILE:
                continue
            with open(path, "rb") as fh:
                blob = fh.read()
        except OSError:
            continue
        files += 1
        if wanted and _find_hashes(blob, wanted):
            file_hits.append(path)
        if key_line and b"PRIVATE KEY" in blob:
            for line in blob.splitlines():
                if hashlib.sha256(line.strip()).hexdigest() == key_line:
                    key_hits.append(path)
                    break
    out.append(
        _result(
            "no secret in readable files",
            not file_hits,
            ", ".join(file_hits[:5]) or f"{files} files searched",
        )
    )
    out.append(
        _result(
            "CA private key not readable",
            not key_hits,
            ", ".join(key_hits[:5]) or f"{files} files searched",
        )
    )
    return out


def _gateway_pids(spec: dict[str, Any]) -> list[int]:
    """Gateway processes this agent can see: those named in the spec, and any whose command
    line runs keyward (`keyward ...`, `python -m gateway ...`); never this process."""
    pids = {int(p) for p in spec.get("gateway_pids", [])}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                argv = fh.read(4096).split(b"\0")
        except OSError:
            continue
        names = [os.path.basename(a) for a in argv[:2]]
        if b"keyward" in names or argv[1:3] == [b"-m", b"gateway"]:
            pids.add(int(entry))
    return sorted(pids)


def _read_memory(pid: int) -> tuple[bool, str]:
    """True if any of `pid`'s memory could be read through /proc/PID/mem."""
    try:
        with open(f"/proc/{pid}/maps") as fh:
            regions = [line.split()[:2] for line in fh]
        mem = open(f"/proc/{pid}/mem", "rb", buffering=0)  # noqa: SIM115
    except OSError as e:
        return False, f"{pid}: {e.strerror or e}"
    with mem:
        for span, perms in regions:
            if perms.startswith("r"):
                try:
                    mem.seek(int(span.split("-")[0], 16))
                    if mem.read(64):
                        return True, f"{pid}: memory read"
                except (OSError, OverflowError, ValueError):
                    continue
    return False, f"{pid}: no region readable"


def _ptrace(pid: int) -> tuple[bool, str]:
    """True if `pid` could be traced. Tried from a forked process: PTRACE_SEIZE does not stop
    the target, and the tracer's exit detaches it again."""
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - child
        libc = ctypes.CDLL(None, use_errno=True)
        libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        rc = libc.ptrace(PTRACE_SEIZE, pid, None, None)
        os.write(w, json.dumps([rc, ctypes.get_errno()]).encode())
        os._exit(0)
    os.close(w)
    rc, err = json.loads(os.read(r, 100) or b"[-1, 0]")
    os.close(r)
    os.waitpid(child, 0)
    return rc == 0, f"{pid}: " + ("attached" if rc == 0 else os.strerror(err))


def _read_attempt(path: str) -> tuple[bool, str]:
    """True if `path` gave any byte (a masked file reads empty)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE)
    except OSError as e:
        return False, f"{path}: {e.strerror or e}"
    return bool(data), f"{path}: read {len(data)} bytes"


def _list_attempt(path: str) -> tuple[bool, str]:
    """True if directory `path` showed any entry (a masked one is empty)."""
    try:
        entries = os.listdir(path)
    except OSError as e:
        return False, f"{path}: {e.strerror or e}"
    return bool(entries), f"{path}: {len(entries)} entries"


def _each(check: str, outcomes: list[tuple[bool, str]], none: str) -> dict[str, object]:
    leaks = [d for leaked, d in outcomes if leaked]
    return _result(check, not leaks, "; ".join(leaks or [d for _, d in outcomes]) or none)


def check_local(spec: dict[str, Any]) -> list[dict[str, object]]:
    """The gateway's own process (memory, ptrace) and the files that hold secrets, by name:
    the config, `.env`, `file:` secret sources, the state dir, the CA key."""
    pids = _gateway_pids(spec)
    none = "no gateway process visible"
    out = [
        _each("gateway memory not readable", [_read_memory(p) for p in pids], none),
        _each("gateway not traceable", [_ptrace(p) for p in pids], none),
    ]
    for check, key in (
        ("config and .env not readable", "config_files"),
        ("secret files not readable", "secret_files"),
        ("CA key file not readable", "ca_key_files"),
    ):
        paths = spec.get(key, [])
        out.append(_each(check, [_read_attempt(p) for p in paths], f"{len(paths)} paths"))
    dirs = spec.get("state_dirs", [])
    out.append(_each("state dir not readable", [_list_attempt(d) for d in dirs], "none given"))
    return out


def _tcp_attempt(host: str, port: int, family: int) -> tuple[bool, str]:
    """True if the destination itself answered (a leak)."""
    start = time.monotonic()
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(FAST * 2)
    try:
        s.connect((host, port))
        # Connected: maybe to the gateway's transparent listener. Speak a non-HTTP protocol and
        # see whether anything answers that is not the gateway closing on us.
        s.sendall(b"KEYWARD-PROBE\r\n")
        data = s.recv(256)
        took = time.monotonic() - start
        if not data:
            return False, f"closed by the gateway after {took:.2f}s"
        return True, f"got {data[:40]!r}"
    except (ConnectionRefusedError, ConnectionResetError) as e:
        return False, f"{type(e).__name__} after {time.monotonic() - start:.2f}s"
    except OSError as e:
        took = time.monotonic() - start
        if took > FAST:
            return True, f"hung {took:.1f}s ({e})"
        return False, f"{e.strerror or e} after {took:.2f}s"
    finally:
        s.close()


def _refused(family: int, address: str | tuple[str, int]) -> tuple[bool, str]:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(FAST)
    try:
        s.connect(address)
        return False, "connected"
    except OSError as e:
        return True, e.strerror or str(e)
    finally:
        s.close()


def check_network(spec: dict[str, Any]) -> list[dict[str, object]]:
    out = []
    for host, port in spec.get("direct_tcp", []):
        leaked, detail = _tcp_attempt(host, int(port), socket.AF_INET)
        out.append(_result(f"direct TCP {host}:{port} blocked", not leaked, detail))
    for host, port in spec.get("ipv6_tcp", []):
        leaked, detail = _tcp_attempt(host, int(port), socket.AF_INET6)
        out.append(_result(f"IPv6 TCP [{host}]:{port} blocked", not leaked, detail))
    for host, port in spec.get("udp", []):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(FAST)
        start = time.monotonic()
        try:
            s.connect((host, int(port)))
            s.send(b"KEYWARD-PROBE")
            data = s.recv(256)
            ok, detail = False, f"answered {data[:40]!r}"
        except ConnectionRefusedError:
            ok, detail = True, f"port unreachable after {time.monotonic() - start:.2f}s"
        except OSError as e:
            ok, detail = True, f"{e} after {time.monotonic() - start:.2f}s"
        finally:
            s.close()
        out.append(_result(f"UDP {host}:{port} blocked", ok, detail))
    for name in spec.get("dns_denied", []):
        rcode, detail = _dns_query(name, 1, spec.get("resolver"))
        out.append(_result(f"DNS A {name} refused", rcode in (3, 5) or rcode < 0, detail))
    for name in spec.get("dns_txt", []):
        rcode, detail = _dns_query(name, 16, spec.get("resolver"))
        out.append(_result(f"DNS TXT {name} refused", rcode in (3, 5) or rcode < 0, detail))
    for path in spec.get("unix_sockets", []):
        ok, detail = _refused(socket.AF_UNIX, path)
        out.append(_result(f"socket {path} unreachable", ok, detail))
    for host, port in spec.get("control_tcp", []):
        ok, detail = _refused(socket.AF_INET, (host, int(port)))
        out.append(_result(f"control endpoint {host}:{port} unreachable", ok, detail))
    return out


def _nameserver(explicit: str | None) -> str:
    if explicit:
        return explicit
    try:
        with open("/etc/resolv.conf") as fh:
            for line in fh:
                bits = line.split()
                if len(bits) >= 2 and bits[0] == "nameserver":
                    return bits[1]
    except OSError:
        pass
    return "127.0.0.1"


def _dns_query(name: str, qtype: int, resolver: str | None) -> tuple[int, str]:
    qid = int.from_bytes(os.urandom(2), "big")
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.strip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\0" + struct.pack(">HH", qtype, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(FAST)
    server = _nameserver(resolver)
    try:
        s.sendto(q, (server, 53))
        data = s.recv(4096)
        rcode = data[3] & 0x0F
        return rcode, f"rcode {rcode} from {server}"
    except OSError as e:
        return -1, f"no answer from {server}: {e}"
    finally:
        s.close()


# What a reflection probe asks for: codings an agent's HTTP client would gladly decode. keyward
# decodes every response before scrubbing and forwards it identity-encoded, so a body that comes
# back still encoded is a failure even when this script cannot decode it (br, zstd).
REFLECT_ENCODINGS = ["gzip", "br", "zstd", "deflate"]


def _fetch(url: str, encoding: str) -> tuple[bytes, bytes, str, str]:
    """(status line and headers, raw body, its Content-Encoding, a short outcome) as the agent
    got them. The proxy comes from the agent's environment, as any client's would."""
    req = urllib.request.Request(url, headers={"Accept-Encoding": encoding})
    cafile = os.environ.get("SSL_CERT_FILE")
    ctx = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None
    try:
        resp = urllib.request.urlopen(req, timeout=FAST * 10, context=ctx)
    except urllib.error.HTTPError as e:
        resp = e
    except (OSError, ValueError) as e:
        return b"", b"", "", f"no answer: {e}"
    with resp:
        body = resp.read(MAX_FILE)
        head = f"{resp.status} {resp.reason}\n{resp.headers}".encode("latin-1", "replace")
        coding = (resp.headers.get("Content-Encoding") or "").strip().lower()
    return head, body, coding, str(resp.status)


def _decoded(body: bytes, coding: str) -> bytes | None:
    """The body as the agent would decode it; None for a coding this script cannot decode (its
    content then cannot be vouched for)."""
    try:
        if coding in ("", "identity"):
            return body
        if coding in ("gzip", "x-gzip"):
            return zlib.decompress(body, zlib.MAX_WBITS | 16)
        if coding == "deflate":
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error:
        return None
    return None


def check_reflections(spec: dict[str, Any]) -> list[dict[str, object]]:
    """Ask each credentialed destination for compressed answers: no real secret may come back
    in the reason phrase, headers or the body, decoded the way the agent would decode it."""
    wanted: dict[int, set[str]] = {}
    for h in spec.get("secret_hashes", []):
        wanted.setdefault(int(h["len"]), set()).add(h["sha256"])
    out = []
    for url in spec.get("reflect_urls", []):
        outcomes = []
        for encoding in spec.get("reflect_encodings", REFLECT_ENCODINGS):
            head, body, coding, how = _fetch(url, encoding)
            decoded = _decoded(body, coding)
            if decoded is None:
                label = coding if re.fullmatch(r"[a-z0-9.-]{1,16}", coding) else "otherwise"
                outcomes.append((True, f"{encoding}: came back {label}-encoded ({how})"))
            elif wanted and _find_hashes(head + b"\n" + body + b"\n" + decoded, wanted):
                outcomes.append((True, f"{encoding}: a real secret came back ({how})"))
            else:
                outcomes.append((False, f"{encoding}: {how}"))
        out.append(_each(f"no secret reflected by {url} (compressed)", outcomes, "no request"))
    return out


def main() -> int:
    spec = json.loads(sys.stdin.read() or "{}")
    results = (
        check_network(spec) + check_local(spec) + check_secrets(spec) + check_reflections(spec)
    )
    json.dump(results, sys.stdout)
    sys.stdout.write("\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
