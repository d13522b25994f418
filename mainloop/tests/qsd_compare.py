#!/usr/bin/env python3
"""Runs the same job scenarios against aiod and qemu-storage-daemon with
QEMU's Python QMP client, and checks that both give the same event sequence
(event names, statuses, payload keys and values) and the same image
contents.

usage: qsd_compare.py PATH_TO_AIOD [SCENARIO...]

Each scenario builds a fresh three-layer qcow2 chain with qemu-img/qemu-io,
starts the daemon on a unix socket, adds the chain with one nested
blockdev-add (as in reference/qsd-measure.md), runs one job to the end,
deletes the node, quits, and hashes the resulting images (qemu-img convert
to raw). Exits 0 when every scenario matches; prints the differences and
exits 1 otherwise.
"""

import asyncio
import hashlib
import logging
import os
import subprocess
import sys
import tempfile

from qemu.qmp import ConnectError, QMPClient

MIB = 1 << 20


def sh(*args):
    subprocess.run(args, check=True, capture_output=True)


def make_chain(d):
    base, mid, top = (os.path.join(d, f) for f in ("base.qcow2", "mid.qcow2", "top.qcow2"))
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", mid)
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", mid, "-F", "qcow2", top)
    sh("qemu-io", "-c", "write -P 0x11 0 4M", base)
    sh("qemu-io", "-c", "write -P 0x22 2M 2M", mid)
    sh("qemu-io", "-c", "write -P 0x33 3M 2M", top)
    sh("qemu-io", "-c", "write -z 6M 512k", top)
    tgt = os.path.join(d, "tgt.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", tgt, "8M")
    # An overlay without a backing file, for blockdev-snapshot.
    sh("qemu-img", "create", "-q", "-f", "qcow2", os.path.join(d, "ov.qcow2"), "8M")


def chain_arg(d):
    def node(name, backing):
        n = {"driver": "qcow2", "node-name": name,
             "file": {"driver": "file", "filename": os.path.join(d, f"{name}.qcow2")}}
        if backing is not None:
            n["backing"] = backing
        return n
    return node("top", node("mid", node("base", None)))


SCENARIOS = {
    "stream-all": ([("block-stream", {"job-id": "j", "device": "top"})], ["top"]),
    "stream-base": ([("block-stream", {"job-id": "j", "device": "top", "base-node": "base"})],
                    ["top"]),
    "commit-intermediate": ([("block-commit", {"job-id": "j", "device": "top",
                                               "top-node": "mid", "base-node": "base"})],
                            ["top", "base"]),
    "commit-active": ([("block-commit", {"job-id": "j", "device": "top", "base-node": "base"})],
                      ["base"]),
    "mirror-full": ([("blockdev-mirror", {"job-id": "j", "device": "top", "target": "tgt",
                                          "sync": "full"})], ["tgt"]),
    # ov (added with "backing": null) goes on top of the chain, then the
    # layers above mid are streamed into it.
    "snapshot-stream": ([("blockdev-add", {"driver": "qcow2", "node-name": "ov", "backing": None,
                                           "file": {"driver": "file", "filename": "{d}/ov.qcow2"}}),
                         ("blockdev-snapshot", {"node": "top", "overlay": "ov"}),
                         ("block-stream", {"job-id": "j", "device": "ov", "base-node": "mid"})],
                        ["ov"]),
    # Two create jobs (not auto-dismissed: the client dismisses them).
    "create": ([("blockdev-create", {"job-id": "j", "options": {
                    "driver": "file", "filename": "{d}/new.qcow2", "size": 0}}),
                ("blockdev-add", {"driver": "file", "node-name": "nf",
                                  "filename": "{d}/new.qcow2"}),
                ("blockdev-create", {"job-id": "j2", "options": {
                    "driver": "qcow2", "file": "nf", "size": 8 * MIB, "cluster-size": 4096}})],
               ["new"]),
}

# What each scenario deletes before quitting (default: the chain's top).
TEARDOWN = {"mirror-full": ["top", "tgt"], "snapshot-stream": ["ov"], "create": ["nf", "top"]}

JOB_COMMANDS = ("block-stream", "block-commit", "blockdev-mirror", "blockdev-create")


def expand(v, d):
    """Substitutes the scratch directory for {d} in string values."""
    if isinstance(v, str):
        return v.replace("{d}", d)
    if isinstance(v, dict):
        return {k: expand(x, d) for k, x in v.items()}
    return v


def daemon_cmd(kind, aiod, sock):
    if kind == "aiod":
        return [aiod, "--qmp", f"unix:{sock}"]
    return ["qemu-storage-daemon", "--chardev", f"socket,path={sock},server=on,wait=off,id=m0",
            "--monitor", "chardev=m0"]


def summarize(ev):
    """What must match: the event name, a JOB_STATUS_CHANGE's status, and
    every other payload's keys and values."""
    name, data = ev["event"], ev.get("data", {})
    if name == "JOB_STATUS_CHANGE":
        return (name, data["status"])
    return (name, tuple(sorted((k, str(v)) for k, v in data.items())))


class Keep(logging.Handler):
    """Keeps the client's log lines (the raw messages are at DEBUG)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))


async def connect(kind, name, sock):
    """Connects and negotiates. Once, under load, a negotiation with one of
    the daemons failed on a reply without 'return' (2026-11-27, cause not
    found). A failure against aiod fails the test with the raw exchange; one
    against qemu-storage-daemon, the oracle, is printed and retried."""
    log = logging.getLogger("qemu.qmp")
    keep = Keep()
    log.addHandler(keep)
    log.setLevel(logging.DEBUG)
    try:
        for attempt in (1, 2, 3):
            qmp = QMPClient(f"{kind}-{name}")
            try:
                await qmp.connect(sock)
                return qmp
            except ConnectError as err:
                msg = (f"{kind}-{name}: connect attempt {attempt}: {err!r} "
                       f"(cause {err.__cause__!r})\n" + "\n".join(keep.lines[-30:]))
                await qmp.disconnect()
                if kind == "aiod" or attempt == 3:
                    raise RuntimeError(msg) from err
                print(msg, file=sys.stderr)
                keep.lines.clear()
                await asyncio.sleep(0.2)
    finally:
        log.removeHandler(keep)
        log.setLevel(logging.NOTSET)


async def scenario(kind, aiod, name, d):
    commands, outputs = SCENARIOS[name]
    sock = os.path.join(d, f"{kind}.sock")
    proc = subprocess.Popen(daemon_cmd(kind, aiod, sock), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        for _ in range(500):
            if os.path.exists(sock):
                break
            await asyncio.sleep(0.01)
        qmp = await connect(kind, name, sock)
        events = []
        await qmp.execute("blockdev-add", chain_arg(d))
        if name.startswith("mirror"):
            await qmp.execute("blockdev-add", {"driver": "qcow2", "node-name": "tgt",
                                               "file": {"driver": "file",
                                                        "filename": os.path.join(d, "tgt.qcow2")}})
        with qmp.listener() as listener:
            for cmd, args in commands:
                await qmp.execute(cmd, expand(args, d))
                if cmd not in JOB_COMMANDS:
                    continue
                async for ev in listener:
                    events.append(ev)
                    data = ev.get("data", {})
                    if ev["event"] == "BLOCK_JOB_READY":
                        await qmp.execute("block-job-complete", {"device": data["device"]})
                    if ev["event"] == "JOB_STATUS_CHANGE" and data["status"] == "concluded" \
                            and cmd == "blockdev-create":
                        await qmp.execute("job-dismiss", {"id": data["id"]})
                    if ev["event"] == "JOB_STATUS_CHANGE" and data["status"] == "null":
                        break
        for node in TEARDOWN.get(name, ["top"]):
            await qmp.execute("blockdev-del", {"node-name": node})
        await qmp.execute("quit")
        try:
            await qmp.disconnect()
        except EOFError:
            pass  # the daemon closed first, as it should after quit
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    images = {}
    for img in outputs:
        raw = os.path.join(d, f"{img}.raw")
        sh("qemu-img", "convert", "-O", "raw", os.path.join(d, f"{img}.qcow2"), raw)
        with open(raw, "rb") as f:
            images[img] = hashlib.sha256(f.read()).hexdigest()
        sh("qemu-img", "check", "-q", os.path.join(d, f"{img}.qcow2"))
    return [summarize(e) for e in events], images


async def main(aiod, only=None):
    failures = []
    for name in SCENARIOS:
        if only and name not in only:
            continue
        results = {}
        for kind in ("aiod", "qsd"):
            with tempfile.TemporaryDirectory(prefix=f"cmp-{kind}-") as d:
                make_chain(d)
                results[kind] = await asyncio.wait_for(scenario(kind, aiod, name, d), 60)
        (ev_a, img_a), (ev_q, img_q) = results["aiod"], results["qsd"]
        if ev_a != ev_q:
            failures.append(f"{name}: events differ\n  aiod: {ev_a}\n  qsd:  {ev_q}")
        if img_a != img_q:
            failures.append(f"{name}: images differ: aiod {img_a} qsd {img_q}")
        print(f"{name}: {'same' if ev_a == ev_q and img_a == img_q else 'DIFFERENT'}"
              f" ({len(ev_a)} events)")
    if failures:
        print("\n".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2:])))
