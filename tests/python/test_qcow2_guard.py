"""qcow2 commands and events side by side with qemu-storage-daemon:
change-backing-file's checks and result, BLOCK_IMAGE_CORRUPTED from an
overlap check (driven through blockdev-add and the monitor only, so both
daemons run the same script)."""

import json
import subprocess

import pytest

from conftest import start


def qemu_img(*args):
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True,
                          text=True).stdout


def chain(tmp_path):
    """base <- mid <- top, and an unrelated image."""
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "base.qcow2"), "16M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2",
             str(tmp_path / "mid.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
             str(tmp_path / "top.qcow2"))
    qemu_img("create", "-q", "-f", "qcow2", str(tmp_path / "other.qcow2"), "16M")
    args = []
    for node, image, extra in [("b", "base", ",read-only=on"),
                               ("m", "mid", ",backing=qb,read-only=on"),
                               ("t", "top", ",backing=qm"), ("o", "other", "")]:
        args += ["--blockdev", f"file,node-name=f{node},filename={tmp_path}/{image}.qcow2",
                 "--blockdev", f"qcow2,node-name=q{node},file=f{node}{extra}"]
    return args


@pytest.mark.parametrize("flavor", ["vubd", "qsd"])
def test_change_backing_file_answers_as_qsd(flavor, tmp_path, raw_qmp):
    d = start(flavor, tmp_path, chain(tmp_path))
    try:
        qmp = raw_qmp(d.qmp_path)
        qmp.negotiate()

        def cbf(device, image, name):
            return qmp.execute("change-backing-file", {
                "device": device, "image-node-name": image, "backing-file": name})

        for device, image, desc in [
            ("nope", "qm", "Cannot find device='nope' nor node-name='nope'"),
            ("qt", "nope", "Cannot find device='' nor node-name='nope'"),
            ("qt", "qb", "not allowing backing file change on an image without a backing file"),
            ("qm", "qt", "Need a root block node"),
            ("qo", "qm", "'qo' and image file are not in the same chain"),
        ]:
            assert cbf(device, image, "x") == {
                "error": {"class": "GenericError", "desc": desc}}
        assert cbf("qt", "qm", "renamed.qcow2") == {"return": {}}
        info = json.loads(qemu_img("info", "-U", "--output=json", str(tmp_path / "mid.qcow2")))
        assert info["backing-filename"] == "renamed.qcow2"
        assert info["backing-filename-format"] == "qcow2"
        nodes = qmp.execute("query-named-block-nodes")["return"]
        mid = next(n for n in nodes if n["node-name"] == "qm")
        assert mid["image"]["backing-filename"] == "renamed.qcow2"
    finally:
        d.stop()
