"""One scripted session with qmp-shell, the interactive client from the
qemu.qmp package, fed from a pipe as a script would."""

import json
import shutil
import subprocess

import pytest

SCRIPT = """\
query-version
blockdev-add driver=null-co node-name=null0 size=1048576
query-named-block-nodes
blockdev-add driver=null-co node-name=null0
no-such-command
blockdev-del node-name=null0
query-named-block-nodes
"""


def replies(output):
    """The JSON replies in qmp-shell's output, one per prompt."""
    out = []
    for line in output.splitlines():
        text = line.split("(QEMU) ", 1)[-1].strip()
        if text.startswith("{"):
            out.append(json.loads(text))
    return out


def test_scripted_qmp_shell_session(daemon):
    if shutil.which("qmp-shell") is None:
        pytest.skip("qmp-shell (from qemu.qmp) is not installed")
    done = subprocess.run(["qmp-shell", daemon.qmp_path], input=SCRIPT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got = replies(done.stdout)
    assert len(got) == 7, done.stdout
    assert got[0]["return"]["qemu"]["major"] >= 10
    assert got[1] == {"return": {}}
    assert [n["node-name"] for n in got[2]["return"]] == ["null0"]
    assert got[3]["error"]["class"] == "GenericError"
    assert "null0" in got[3]["error"]["desc"]
    assert got[4]["error"]["class"] == "CommandNotFound"
    assert got[5] == {"return": {}}
    assert got[6] == {"return": []}
