"""The agent's system trust store gets the gateway CA, for the clients that read no CA variable
(git with its own config, curl or Python run with a clean environment, Go binaries).

Before the agent first starts, each system bundle its image has is rewritten in the created
container with the CA appended, through the engine's archive API: any image works, the agent
needs no root or capability for it, and the bundle keeps the image's own roots. The container
keeps the file across restarts; the CA is the same for the life of the state volume."""

from __future__ import annotations

import io
import posixpath
import tarfile
from dataclasses import dataclass

from gateway.engine.client import EngineClient
from gateway.engine.errors import NotFound
from gateway.tls.trust import SYSTEM_BUNDLE_PATHS


@dataclass(frozen=True)
class _File:
    path: str
    data: bytes
    mode: int
    uid: int
    gid: int


async def _read_file(client: EngineClient, container: str, path: str) -> _File | None:
    """The regular file `path` leads to (links resolved by the engine); None if absent."""
    try:
        path = (await client.path_stat(container, path)).get("linkTarget") or path
        raw = await client.get_archive(container, path)
    except NotFound:
        return None
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        member = tf.next()
        body = tf.extractfile(member) if member is not None and member.isfile() else None
        if member is None or body is None:
            return None
        return _File(path, body.read(), member.mode, member.uid, member.gid)


def _tar_of(f: _File) -> bytes:
    """One-file tar that ends at its end-of-archive blocks: Podman 4.3 stops reading there and
    fails the whole copy ("broken pipe") when the record padding after them is still coming."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo(posixpath.basename(f.path))
        info.size, info.mode, info.uid, info.gid = len(f.data), f.mode, f.uid, f.gid
        tf.addfile(info, io.BytesIO(f.data))
        end = tf.offset + 2 * tarfile.BLOCKSIZE
    return buf.getvalue()[:end]


def with_ca(bundle: bytes, ca_pem: bytes) -> bytes:
    """`bundle` with the CA appended once (a bundle that has it already is left as is)."""
    if ca_pem.strip() in bundle:
        return bundle
    head = bundle.rstrip(b"\n")
    return head + b"\n" + ca_pem if head else ca_pem


async def add_ca_to_system_bundles(
    client: EngineClient, container: str, ca_pem: bytes
) -> list[str]:
    """Append the CA to each system bundle the (created) container has; the files written.
    An image with none of them gets nothing: its clients have no system store to read."""
    done: list[str] = []
    for path in SYSTEM_BUNDLE_PATHS:
        found = await _read_file(client, container, path)
        if found is None or found.path in done:
            continue
        data = with_ca(found.data, ca_pem)
        if data != found.data:
            new = _File(found.path, data, found.mode, found.uid, found.gid)
            await client.put_archive(container, posixpath.dirname(found.path), _tar_of(new))
        done.append(found.path)
    return done
