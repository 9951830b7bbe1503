"""Audit that fails closed, end to end on both planes: a real full file system (a tmpfs
mounted by the test), rotation and SIGHUP-free reopen, with the embedded gateway in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from tests.support.embedded import running, with_service
from tests.support.world import World, make_world
from tests.test_audit_writer import Clock, fill, small_tmpfs


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path, "256k") as mnt:
        yield mnt


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = await make_world(tmp_path)
    yield w
    await w.upstream.close()


def records(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


@pytest.mark.root
async def test_full_disk_refuses_on_both_planes_and_recovers(world: World, tiny_fs: Path) -> None:
    audit = tiny_fs / "audit.jsonl"
    with_service(world, audit=audit)
    async with running(world) as gw:
        assert (await gw.via_proxy("/ok-1"))[0] == 200
        assert (await gw.via_service("/ok-2"))[0] == 200
        seen_before = len(world.upstream.seen.requests)
        fill(tiny_fs / "filler")
        outcomes = []
        for i in range(10):
            outcomes.append(await gw.via_proxy(f"/full-mitm-{i}"))
            outcomes.append(await gw.via_service(f"/full-svc-{i}"))
        for status, reason, body in outcomes:
            assert status == 503 and reason == "audit-unavailable", (status, reason, body)
            assert not body or json.loads(body)["reason"] == "audit-unavailable"
        # nothing reached the upstream while no record could be written
        assert len(world.upstream.seen.requests) == seen_before
        (tiny_fs / "filler").unlink()
        for _ in range(200):  # the writer probes again at most every 0.25 s
            if (await gw.via_proxy("/back"))[0] == 200:
                break
            await asyncio.sleep(0.05)
        assert (await gw.via_service("/back-svc"))[0] == 200
    lines = audit.read_text().splitlines()
    recs = [json.loads(line) for line in lines]  # every line whole
    paths = [r["path"] for r in recs]
    refused = [r for r in recs if r["reason"] == "audit-unavailable"]
    # every refused request is audited too, once: CONNECTs on the mitm plane, requests on the other
    # (and the refused attempts of the recovery loop, also CONNECTs)
    assert all(r["status"] == 503 for r in refused)
    assert sum(r["method"] == "CONNECT" for r in refused) >= 10
    for i in range(10):
        assert paths.count(f"/full-svc-{i}") == 1
    assert {r["plane"] for r in refused} == {"mitm", "service"}
    assert "/back-svc" in paths


async def test_rotation_by_rename_is_followed_on_both_planes(world: World) -> None:
    """The path is checked at most every ROTATION_CHECK seconds (by the writer's clock, moved
    here by hand): a rename is followed from the next check on, and the records written to an
    unlinked file since the last check are written again to the new one."""
    with_service(world)
    async with running(world) as gw:
        audit = gw.ctx.audit
        audit.clock = clock = Clock()

        async def request(via: Callable[[str], Awaitable[tuple[int, str, str]]], path: str) -> None:
            """One request, and its record written (it may be written after the response)."""
            before = audit.counts["allowed"]
            assert (await via(path))[0] == 200
            for _ in range(1000):
                if audit.counts["allowed"] > before:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError(f"{path}: no record written")

        clock.advance(1.0)
        await request(gw.via_proxy, "/one")  # checked: the path names the open file
        world.audit_path.rename(world.dir / "audit.jsonl.1")
        await request(gw.via_proxy, "/two")  # no check due: into the renamed file
        clock.advance(1.0)
        await request(gw.via_service, "/three")  # checked: a new file at the path
        await request(gw.via_service, "/four")
        world.audit_path.unlink()
        await request(gw.via_proxy, "/five")  # into the unlinked file, and then...
        clock.advance(1.0)
        await request(gw.via_service, "/six")  # ...written again before this one
    assert [r["path"] for r in records(world.dir / "audit.jsonl.1")] == ["/one", "/two"]
    assert [r["path"] for r in records(world.audit_path)] == ["/three", "/four", "/five", "/six"]
