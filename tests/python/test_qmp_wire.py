"""QMP on the wire, over raw sockets, against vubd and qemu-storage-daemon
side by side: every test runs on both daemons with the same expectations,
and the tests named *_same_* compare the two daemons' answers directly.
Where vubd differs on purpose the README's list of differences says so."""

import json
import socket
import time

import pytest

from conftest import RawQmp, qsd_available, start

# Input that is not a valid request, each followed by a good one that must
# be answered: the connection stays usable whatever comes before.
BAD_INPUT = [
    b'{"execute": "qu\n',                 # raw newline inside a string
    b'"abc\n',                            # a top-level string, unterminated
    b'}\n',                               # a closing brace alone
    b'\x00\n',
    b'\xff\xfe\n',
    b'{"execute": "query-version", "id": "\x01"}\n',
    b'{"execute": "query-version", "id": 1, "id": 2}\n',
    b'[1, 2\n]\n',
    b'123 true null\n',
    b'{"execute": ["query-version"]}\n',
    b'{"execute": "query-version", "arguments": []}\n',
    b'{"execute": "query-version", "extra": 1}\n',
    b'{"arguments": {}}\n',
    b'{"execute": "query-version", "arguments": {"x": 1}}\n',
    b'{"execute": "qu\\uD800ery"}\n',
    b'\\\n',
    b"{'execute': 'query-version\n",
]


def negotiated(path, oob=False):
    c = RawQmp(path)
    c.negotiate(oob)
    return c


def replies_until_version(conn):
    """Replies up to and including the one to a query-version sent with
    id "probe"; returns (the replies before it, that reply)."""
    conn.send({"execute": "query-version", "id": "probe"})
    before = []
    while True:
        msg = conn.reply()
        if msg.get("id") == "probe":
            return before, msg
        before.append(msg)


@pytest.mark.parametrize("data", BAD_INPUT, ids=lambda d: repr(d)[:40])
def test_bad_input_gets_an_error_and_the_connection_stays_usable(daemon, data):
    conn = negotiated(daemon.qmp_path)
    conn.send(data)
    before, probe = replies_until_version(conn)
    assert "return" in probe
    assert before, "no error for bad input"
    assert all(m["error"]["class"] == "GenericError" for m in before), before


def test_raw_newline_in_a_string_is_a_parse_error_naming_the_stray_text(daemon):
    conn = negotiated(daemon.qmp_path)
    conn.send(b'{"execute": "qu\n')
    assert conn.reply() == {"error": {
        "class": "GenericError", "desc": "JSON parse error, stray '\"qu\n'"}}


def test_duplicate_key_is_refused(daemon):
    conn = negotiated(daemon.qmp_path)
    conn.send(b'{"execute": "query-version", "id": 1, "id": 2}\n')
    assert conn.reply()["error"]["desc"] == "JSON parse error, duplicate key"


def test_single_quoted_strings_are_accepted(daemon):
    conn = negotiated(daemon.qmp_path)
    conn.send(b"{'execute': 'query-version', 'id': 'it\\'s \"q\"'}\n")
    assert conn.reply()["id"] == "it's \"q\""


def test_greeting_has_version_and_offers_oob(daemon):
    conn = RawQmp(daemon.qmp_path)
    qmp = conn.greeting["QMP"]
    assert set(qmp) == {"version", "capabilities"}
    assert set(qmp["version"]) == {"qemu", "package"}
    assert set(qmp["version"]["qemu"]) == {"major", "minor", "micro"}
    assert qmp["capabilities"] == ["oob"]


@pytest.mark.parametrize("ident", ["a", 7, -1.5, {"k": [1, None]}, [], None, True, "caf\u00e9"],
                         ids=repr)
def test_id_is_echoed_on_success_and_on_error(daemon, ident):
    conn = negotiated(daemon.qmp_path)
    assert conn.execute("query-version", id=ident)["id"] == ident
    assert conn.execute("no-such-command", id=ident)["id"] == ident


def test_commands_before_negotiation_are_refused(daemon):
    conn = RawQmp(daemon.qmp_path)
    assert conn.execute("query-version", id=1) == {"id": 1, "error": {
        "class": "CommandNotFound",
        "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    conn.negotiate()
    assert conn.execute("qmp_capabilities")["error"] == {
        "class": "CommandNotFound",
        "desc": "Capabilities negotiation is already complete, command ignored"}


def test_unknown_capability_is_refused_naming_it(daemon):
    conn = RawQmp(daemon.qmp_path)
    err = conn.execute("qmp_capabilities", {"enable": ["frobnicate"]})["error"]
    assert err["class"] == "GenericError"
    assert "does not accept value 'frobnicate'" in err["desc"]
    conn.negotiate()


def test_exec_oob_without_oob_enabled_is_an_unexpected_member(daemon):
    conn = negotiated(daemon.qmp_path)
    conn.send({"exec-oob": "query-version", "id": 1})
    assert conn.reply() == {"id": 1, "error": {
        "class": "GenericError", "desc": "QMP input member 'exec-oob' is unexpected"}}


def test_exec_oob_rules_once_oob_is_enabled(daemon):
    conn = negotiated(daemon.qmp_path, oob=True)
    conn.send({"exec-oob": "quit", "id": 1})
    assert conn.reply()["error"] == {
        "class": "GenericError", "desc": "The command quit does not support OOB"}
    conn.send({"exec-oob": "no-such-command", "id": 2})
    assert conn.reply()["error"] == {
        "class": "CommandNotFound", "desc": "The command no-such-command has not been found"}
    conn.send({"exec-oob": "query-version", "execute": "query-version", "id": 3})
    assert conn.reply()["error"] == {
        "class": "GenericError",
        "desc": "QMP input member 'execute' clashes with 'exec-oob'"}
    assert "return" in conn.execute("query-version")


def test_in_band_replies_keep_their_order_with_oob(daemon):
    conn = negotiated(daemon.qmp_path, oob=True)
    batch = b"".join(
        json.dumps({"execute": "query-version" if i % 3 else "nope", "id": i}).encode()
        + (b"\x01" if i == 5 else b"")
        for i in range(20))
    conn.send(batch + b"\n")
    replies = [conn.reply() for _ in range(21)]
    # The stray byte after request 5 gets its parse error in its place.
    assert [r.get("id") for r in replies] == list(range(6)) + [None] + list(range(6, 20))
    assert "stray" in replies[6]["error"]["desc"]


def test_events_carry_timestamps_and_reach_every_negotiated_monitor(flavor, tmp_path):
    d = start(flavor, tmp_path, ["--blockdev", "null-co,node-name=null0"], monitors=3)
    try:
        a = negotiated(str(d.monitor_paths[0]))
        b = negotiated(str(d.monitor_paths[1]))
        silent = RawQmp(str(d.monitor_paths[2]))  # never negotiates
        before = time.time()
        assert "return" in a.execute("block-export-add", {
            "type": "vhost-user-blk", "id": "exp0", "node-name": "null0",
            "addr": {"type": "unix", "path": str(tmp_path / "vhost.sock")}})
        assert "return" in a.execute("block-export-del", {"id": "exp0"})
        for conn in (a, b):
            event = conn.read() if conn is b else (conn.events or [conn.read()])[0]
            assert event["event"] == "BLOCK_EXPORT_DELETED"
            assert event["data"] == {"id": "exp0"}
            stamp = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
            assert before - 1 <= stamp <= time.time() + 1
        silent.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            silent.sock.recv(1)
    finally:
        d.stop()


def test_several_monitors_answer_interleaved_commands(flavor, tmp_path):
    d = start(flavor, tmp_path, monitors=3)
    try:
        conns = [negotiated(str(p)) for p in d.monitor_paths]
        for round_ in range(5):
            for i, c in enumerate(conns):
                c.send({"execute": "query-version", "id": [i, round_]})
            for i, c in enumerate(conns):
                assert c.reply()["id"] == [i, round_]
    finally:
        d.stop()


# File nodes whose file name is as long as a path may be (a directory
# followed by "/." many times): each is about 8 KiB of
# query-named-block-nodes, so a few hundred give a reply of megabytes
# without the thousands of nodes that would take minutes to add.
BIG_NODES = 500


@pytest.fixture(scope="module", params=["vubd", "qsd"])
def big(request, tmp_path_factory):
    """A daemon with two monitors and BIG_NODES file nodes."""
    directory = tmp_path_factory.mktemp(request.param)
    d = start(request.param, directory, monitors=3)
    (directory / "disk.img").write_bytes(b"\0" * 4096)
    long_name = str(directory) + "/." * ((4000 - len(str(directory))) // 2) + "/disk.img"
    conn = negotiated(str(d.monitor_paths[0]))
    for i in range(0, BIG_NODES, 100):
        conn.send("".join(json.dumps({"execute": "blockdev-add", "arguments": {
            "driver": "file", "node-name": f"file{j}", "filename": long_name}})
            for j in range(i, i + 100)))
        for _ in range(100):
            assert conn.reply() == {"return": {}}
    conn.close()
    yield d
    d.stop()


def test_reply_of_many_megabytes_arrives_whole(big):
    conn = negotiated(str(big.monitor_paths[0]), oob=True)
    conn.send({"execute": "query-named-block-nodes", "id": "big"})
    line = conn.read_line(60)
    assert len(line) > 4 << 20, len(line)
    reply = json.loads(line)
    assert reply["id"] == "big" and len(reply["return"]) == BIG_NODES
    conn.close()


def test_client_that_hangs_up_before_reading_its_reply(big):
    quitter = negotiated(str(big.monitor_paths[1]))
    quitter.send({"execute": "query-named-block-nodes"})
    quitter.sock.shutdown(socket.SHUT_RDWR)
    quitter.close()
    conn = negotiated(str(big.monitor_paths[0]))
    assert "return" in conn.execute("query-version")
    assert big.alive()
    conn.close()


def test_client_that_does_not_read_does_not_hold_up_other_monitors(big):
    slow = negotiated(str(big.monitor_paths[1]))
    fast = negotiated(str(big.monitor_paths[2]))
    for i in range(8):
        # Replies of megabytes each pile up unread on `slow`.
        slow.send({"execute": "query-named-block-nodes", "id": i})
        started = time.monotonic()
        assert "return" in fast.execute("query-version")
        assert time.monotonic() - started < 5
    slow.close()
    fast.close()
    assert big.alive()


def test_qemu_qmp_reads_a_reply_of_many_megabytes(big):
    import asyncio
    from qemu.qmp import QMPClient

    async def query():
        client = QMPClient("big")
        await client.connect(str(big.monitor_paths[0]))
        nodes = await client.execute("query-named-block-nodes")
        await client.disconnect()
        return nodes

    assert len(asyncio.run(query())) == BIG_NODES


# ---- The two daemons compared directly.

def both(tmp_path, args=(), monitors=1):
    if not qsd_available():
        pytest.skip("qemu-storage-daemon is not installed")
    (tmp_path / "v").mkdir()
    (tmp_path / "q").mkdir()
    return start("vubd", tmp_path / "v", args, monitors), start("qsd", tmp_path / "q", args, monitors)


def raw_lines(path, messages, pretty=False):
    """The exact bytes of the replies to `messages`, one per message."""
    conn = RawQmp(path) if not pretty else None
    if pretty:
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(path)
        sock.settimeout(5)
        data = b""
        out = []
        for m in [None] + messages:
            if m is not None:
                sock.sendall(json.dumps(m).encode() + b"\n")
            while not data.endswith(b"\r\n}\r\n"):
                data += sock.recv(65536)
            out.append(data)
            data = b""
        sock.close()
        return out[1:]
    out = []
    for m in messages:
        conn.send(m)
        out.append(conn.read_line())
    conn.close()
    return out


def test_same_bytes_for_simple_replies(tmp_path):
    v, q = both(tmp_path)
    try:
        messages = [
            {"execute": "qmp_capabilities"},
            {"execute": "query-block", "id": "caf\u00e9\u007f\U0001F600"},
            {"execute": "nope", "id": [1, {}, [], "x\ny"]},
            {"execute": "blockdev-del", "arguments": {"node-name": "n\u00e9"}, "id": 0},
        ]
        assert raw_lines(v.qmp_path, messages) == raw_lines(q.qmp_path, messages)
    finally:
        v.stop()
        q.stop()


def test_same_bytes_for_pretty_replies(tmp_path):
    if not qsd_available():
        pytest.skip("qemu-storage-daemon is not installed")
    outs = []
    for flavor in ("vubd", "qsd"):
        (tmp_path / flavor).mkdir()
        d = start(flavor, tmp_path / flavor, ["--chardev",
                  "socket,id=p,path={dir}/pretty.sock,server=on,wait=off",
                  "--monitor", "chardev=p,pretty=on"])
        try:
            outs.append(raw_lines(str(d.dir / "pretty.sock"), [
                {"execute": "qmp_capabilities", "id": [1, {}, []]},
                {"execute": "query-block"},
                {"execute": "nope"},
            ], pretty=True))
        finally:
            d.stop()
    assert outs[0] == outs[1]


# Commands whose error replies must agree in class and description.
ERRORS = [
    ("blockdev-add", {"driver": "null-co", "node-name": "n0", "size": "big"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "n0", "bogus": 1}),
    ("blockdev-add", {"driver": "frobnicate", "node-name": "n0"}),
    ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "{dir}/missing.img"}),
    ("blockdev-add", {"driver": "file", "node-name": "f0", "filename": "x", "aio": "bogus"}),
    ("blockdev-del", {"node-name": "nosuch"}),
    ("blockdev-del", {}),
    ("block_resize", {"node-name": "nosuch", "size": 1}),
    ("block_resize", {"device": "nosuch", "size": 1}),
    ("block-export-del", {"id": "nosuch"}),
    ("block-export-add", {"type": "vhost-user-blk", "id": "e0", "node-name": "nosuch",
                          "addr": {"type": "unix", "path": "{dir}/e.sock"}}),
    ("block-export-add", {"type": "vhost-user-blk", "id": "e1", "node-name": "n0",
                          "num-queues": 0, "addr": {"type": "unix", "path": "{dir}/e1.sock"}}),
    ("block-export-add", {"type": "vhost-user-blk", "id": "e1", "node-name": "n0",
                          "iothread": "nosuch", "addr": {"type": "unix", "path": "{dir}/e1.sock"}}),
    ("block-export-add", {"type": "vhost-user-blk", "id": "e1", "node-name": "ro",
                          "writable": True, "addr": {"type": "unix", "path": "{dir}/e1.sock"}}),
    ("block-export-add", {"type": "vhost-user-blk", "id": "e1", "node-name": "n0",
                          "addr": {"type": "unix", "path": "{dir}/no/such/dir.sock"}}),
    ("block-export-add", {"type": "vhost-user-blk", "id": "e1", "node-name": "n0",
                          "addr": {"type": "inet", "host": "localhost", "port": "0"}}),
    ("object-del", {"id": "nosuch"}),
    ("object-add", {"qom-type": "iothread", "id": "io1", "poll-grow": -1}),
    ("object-add", {"qom-type": "frobnicate", "id": "x"}),
    ("qom-list", {"path": "/nope"}),
    ("qom-list", {"path": ""}),
    ("qom-get", {"path": "/objects", "property": "nope"}),
    ("qom-get", {"path": "/nope", "property": "type"}),
    ("qom-set", {"path": "/objects", "property": "type", "value": "x"}),
    ("qom-list-properties", {"typename": "nope"}),
    ("query-named-block-nodes", {"flat": "yes"}),
    ("query-version", {"x": 1}),
    ("no-such-command", None),
]


def test_same_error_class_and_description(tmp_path):
    v, q = both(tmp_path, ["--blockdev", "null-co,node-name=n0",
                           "--blockdev", "null-co,node-name=ro,read-only=on"])
    try:
        outcomes = []
        for d in (v, q):
            conn = negotiated(d.qmp_path)
            got = []
            for cmd, args in ERRORS:
                if args is not None:
                    args = json.loads(json.dumps(args).replace("{dir}", str(d.dir)))
                reply = conn.execute(cmd, args)
                err = reply.get("error", {"class": "none", "desc": json.dumps(reply)})
                got.append((cmd, err["class"], err["desc"].replace(str(d.dir), "$DIR")))
            outcomes.append(got)
        mismatches = [(a, b) for a, b in zip(*outcomes) if a != b]
        assert not mismatches, "\n".join(f"vubd {a}\nqsd  {b}" for a, b in mismatches)
    finally:
        v.stop()
        q.stop()
