"""Fixtures for the QMP tests that drive vubd (and, side by side,
qemu-storage-daemon) with the clients users run: QEMU's Python library
qemu.qmp, its qmp-shell, and raw sockets for what no library sends.

The vubd binary is $VUBD_BIN, or target/debug/vubd (scripts/test builds it
with cargo test first).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT = 10.0
REPLY_TIMEOUT = 10.0


def vubd_binary():
    return os.environ.get("VUBD_BIN") or str(ROOT / "target" / "debug" / "vubd")


def program(flavor):
    return vubd_binary() if flavor == "vubd" else "qemu-storage-daemon"


def qsd_available():
    return shutil.which("qemu-storage-daemon") is not None


class Daemon:
    """A vubd or qemu-storage-daemon process with monitors mon0..monN-1,
    each on its own chardev (qsd serves one client per chardev), started
    in its own directory and killed at the end of the test."""

    def __init__(self, flavor, directory, args=(), monitors=1):
        self.flavor = flavor
        self.dir = Path(directory)
        self.monitor_paths = [self.dir / f"mon{i}.sock" for i in range(monitors)]
        pidfile = self.dir / "daemon.pid"
        cmd = [program(flavor)]
        for i, path in enumerate(self.monitor_paths):
            cmd += ["--chardev", f"socket,id=mon{i},path={path},server=on,wait=off",
                    "--monitor", f"chardev=mon{i}"]
        cmd += [a.replace("{dir}", str(self.dir)) for a in args]
        cmd += ["--pidfile", str(pidfile)]
        self.stderr_path = self.dir / "stderr.log"
        self.stderr_file = open(self.stderr_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.dir, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=self.stderr_file)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not pidfile.exists() or pidfile.stat().st_size == 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{flavor} did not start: {self.stderr()}")
            time.sleep(0.01)

    @property
    def qmp_path(self):
        return str(self.monitor_paths[0])

    def stderr(self):
        try:
            return self.stderr_path.read_text()
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.stderr_file.close()


FLAVORS = ["vubd", "qsd"]


def start(flavor, tmp_path, args=(), monitors=1):
    if flavor == "qsd" and not qsd_available():
        pytest.skip("qemu-storage-daemon is not installed")
    return Daemon(flavor, tmp_path, args, monitors)


@pytest.fixture(params=FLAVORS)
def flavor(request):
    return request.param


@pytest.fixture
def daemon(flavor, tmp_path):
    """One daemon of each flavor, with one monitor."""
    d = start(flavor, tmp_path)
    yield d
    d.stop()


@pytest.fixture
def vubd(tmp_path):
    """vubd alone, for what qemu-storage-daemon does not have."""
    d = start("vubd", tmp_path)
    yield d
    d.stop()


class RawQmp:
    """A QMP connection over a plain socket: bytes in, one JSON message per
    line out, with timeouts so a hung daemon fails the test."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(REPLY_TIMEOUT)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        self.greeting = self.read()

    def send(self, data):
        if isinstance(data, (dict, list)):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def read_line(self, timeout=REPLY_TIMEOUT):
        self.sock.settimeout(timeout)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def read(self, timeout=REPLY_TIMEOUT):
        """The next message, events included."""
        return json.loads(self.read_line(timeout))

    def reply(self, timeout=REPLY_TIMEOUT):
        """The next reply; events that come first are kept in .events."""
        while True:
            msg = self.read(timeout)
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg

    def execute(self, cmd, args=None, **extra):
        msg = {"execute": cmd, **extra}
        if args is not None:
            msg["arguments"] = args
        self.send(msg)
        return self.reply()

    def negotiate(self, oob=False):
        args = {"enable": ["oob"]} if oob else None
        assert self.execute("qmp_capabilities", args) == {"return": {}}

    def close(self):
        self.sock.close()


@pytest.fixture
def raw_qmp():
    """Connections opened with raw_qmp(path), closed at the end."""
    conns = []

    def connect(path):
        c = RawQmp(path)
        conns.append(c)
        return c

    yield connect
    for c in conns:
        c.close()
