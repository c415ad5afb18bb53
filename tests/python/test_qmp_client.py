"""vubd driven by QEMU's own Python QMP library (qemu.qmp's QMPClient,
with its defaults: it enables oob when the greeting offers it), and every
test run against qemu-storage-daemon too, so that the test itself is
known to describe QEMU's behaviour."""

import asyncio
import contextlib

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

TIMEOUT = 10


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connected(path):
    client = QMPClient("vubd-test")
    await client.connect(path)
    return client


def test_client_session_with_oob_commands_nodes_and_an_event(daemon):
    async def session():
        client = await connected(daemon.qmp_path)
        assert "oob" in client.greeting.QMP.capabilities
        version = await client.execute("query-version")
        assert version["qemu"]["major"] >= 10
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"blockdev-add", "query-named-block-nodes", "block-export-add"} <= names
        await client.execute("blockdev-add", {
            "driver": "null-co", "node-name": "null0", "size": 1 << 20})
        nodes = await client.execute("query-named-block-nodes")
        assert [n["node-name"] for n in nodes] == ["null0"]
        assert nodes[0]["image"]["virtual-size"] == 1 << 20
        listener = EventListener("BLOCK_EXPORT_DELETED")
        with client.listen(listener):
            await client.execute("block-export-add", {
                "type": "vhost-user-blk", "id": "exp0", "node-name": "null0",
                "addr": {"type": "unix", "path": str(daemon.dir / "vhost.sock")}})
            await client.execute("block-export-del", {"id": "exp0"})
            event = await asyncio.wait_for(listener.get(), TIMEOUT)
        assert event["data"] == {"id": "exp0"}
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
        await client.disconnect()

    run(session())
    assert daemon.alive()


def test_errors_come_back_as_execute_errors_with_class_and_desc(daemon):
    async def session():
        client = await connected(daemon.qmp_path)
        with pytest.raises(ExecuteError) as bad:
            await client.execute("blockdev-del", {"node-name": "nosuch"})
        assert bad.value.error_class == "GenericError"
        assert "nosuch" in str(bad.value)
        with pytest.raises(ExecuteError) as missing:
            await client.execute("no-such-command")
        assert missing.value.error_class == "CommandNotFound"
        with pytest.raises(ExecuteError) as option:
            await client.execute("blockdev-add", {
                "driver": "null-co", "node-name": "n0", "size": "big"})
        assert "'size'" in str(option.value)
        await client.disconnect()

    run(session())


def test_exec_oob_of_an_in_band_command_is_refused_as_qemu_does(daemon):
    async def session():
        client = await connected(daemon.qmp_path)
        with pytest.raises(ExecuteError) as err:
            await client.execute("blockdev-add", {"driver": "null-co"}, oob=True)
        assert str(err.value) == "The command blockdev-add does not support OOB"
        await client.disconnect()

    run(session())


def test_query_version_runs_out_of_band_on_vubd(vubd):
    async def session():
        client = await connected(vubd.qmp_path)
        version = await client.execute("query-version", oob=True)
        assert version["package"].startswith("vubd ")
        await client.disconnect()

    run(session())


def test_every_command_family(daemon):
    """One pass over each command family vubd has, through the library."""
    image = daemon.dir / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))

    async def session():
        c = await connected(daemon.qmp_path)
        # Nodes.
        await c.execute("blockdev-add", {
            "driver": "file", "node-name": "file0", "filename": str(image)})
        await c.execute("blockdev-add", {
            "driver": "raw", "node-name": "fmt0", "file": "file0"})
        names = {n["node-name"] for n in await c.execute("query-named-block-nodes")}
        assert names == {"file0", "fmt0"}
        # Resize.
        await c.execute("block_resize", {"node-name": "fmt0", "size": 2 << 20})
        assert image.stat().st_size == 2 << 20
        # Statistics.
        stats = await c.execute("query-blockstats", {"query-nodes": True})
        assert {s["node-name"] for s in stats} == {"file0", "fmt0"}
        # Objects and QOM.
        await c.execute("object-add", {"qom-type": "iothread", "id": "io0"})
        listed = await c.execute("qom-list", {"path": "/objects"})
        assert {"name": "io0", "type": "child<iothread>"} in listed
        assert await c.execute("qom-get", {
            "path": "/objects/io0", "property": "poll-max-ns"}) == 32768
        await c.execute("qom-set", {
            "path": "/objects/io0", "property": "poll-grow", "value": 4})
        assert await c.execute("qom-get", {"path": "io0", "property": "poll-grow"}) == 4
        types = {t["name"] for t in await c.execute("qom-list-types")}
        assert "iothread" in types
        props = {p["name"] for p in await c.execute(
            "qom-list-properties", {"typename": "iothread"})}
        assert {"poll-max-ns", "poll-grow", "poll-shrink"} <= props
        chardevs = await c.execute("query-chardev")
        assert [d["label"] for d in chardevs] == ["mon0"]
        # Exports.
        await c.execute("block-export-add", {
            "type": "vhost-user-blk", "id": "exp0", "node-name": "fmt0",
            "iothread": "io0", "writable": True,
            "addr": {"type": "unix", "path": str(daemon.dir / "vhost.sock")}})
        exports = await c.execute("query-block-exports")
        assert [(e["id"], e["node-name"]) for e in exports] == [("exp0", "fmt0")]
        if daemon.flavor == "vubd":
            # qemu-storage-daemon lets an iothread that serves an export
            # go; vubd refuses (a difference the README lists).
            with pytest.raises(ExecuteError, match="in use"):
                await c.execute("object-del", {"id": "io0"})
        await c.execute("block-export-del", {"id": "exp0"})
        # Tear down in reverse.
        for _ in range(100):
            if not await c.execute("query-block-exports"):
                break
            await asyncio.sleep(0.05)
        await c.execute("object-del", {"id": "io0"})
        await c.execute("blockdev-del", {"node-name": "fmt0"})
        await c.execute("blockdev-del", {"node-name": "file0"})
        assert await c.execute("query-named-block-nodes") == []
        await c.execute("quit")
        # The daemon hangs up after its reply; the library may notice the
        # end of the stream before disconnect() does.
        with contextlib.suppress(EOFError):
            await c.disconnect()

    run(session())
    daemon.proc.wait(TIMEOUT)
    assert daemon.proc.returncode == 0
