#!/usr/bin/env python3
"""Drives `aiod` with QEMU's own Python QMP client (the `qemu.qmp` package).

usage: qmp_python.py PATH_TO_AIOD

Starts aiod on a unix socket in a temporary directory, connects with
qemu.qmp.QMPClient (which negotiates capabilities from the greeting), runs
query-version and query-commands, checks the errors for an unknown command
and a bad argument, sends quit, and checks that aiod exits 0 and removes its
socket. Exits 0 on success; on failure prints why (and aiod's log) and exits 1.
"""

import asyncio
import os
import subprocess
import sys
import tempfile
import time

from qemu.qmp import ExecuteError, QMPClient


def fail(msg):
    raise AssertionError(msg)


def check_equal(got, want, what):
    if got != want:
        fail(f"{what}: got {got!r}, want {want!r}")


async def session(sock):
    qmp = QMPClient("aiod-test")
    await qmp.connect(sock)

    greeting = qmp.greeting
    if greeting is None:
        fail("no greeting")
    check_equal(list(greeting.QMP.capabilities), [], "advertised capabilities")

    version = await qmp.execute("query-version")
    check_equal(sorted(version["qemu"]), ["major", "micro", "minor"], "query-version keys")
    check_equal(version["qemu"]["major"], 10, "major version")
    if not str(version["package"]).startswith("aio-runtime "):
        fail(f"unexpected package {version['package']!r}")
    check_equal(dict(greeting.QMP.version), version, "greeting version vs query-version")

    commands = await qmp.execute("query-commands")
    names = sorted(c["name"] for c in commands)
    for builtin in ("qmp_capabilities", "query-commands", "query-version", "quit"):
        if builtin not in names:
            fail(f"query-commands lacks {builtin}: {names}")

    try:
        await qmp.execute("no-such-command")
        fail("unknown command succeeded")
    except ExecuteError as err:
        check_equal(err.error_class, "CommandNotFound", "unknown command class")
        check_equal(str(err), "The command no-such-command has not been found",
                    "unknown command desc")

    try:
        await qmp.execute("query-version", {"bogus": 1})
        fail("unexpected argument accepted")
    except ExecuteError as err:
        check_equal(err.error_class, "GenericError", "bad argument class")
        check_equal(str(err), "Parameter 'bogus' is unexpected", "bad argument desc")

    try:
        await qmp.execute("qmp_capabilities")
        fail("second qmp_capabilities succeeded")
    except ExecuteError as err:
        check_equal(err.error_class, "CommandNotFound", "renegotiation class")

    # The connection survived all of that.
    again = await qmp.execute("query-version")
    check_equal(again, version, "query-version after errors")

    check_equal(await qmp.execute("quit"), {}, "quit reply")
    try:
        await qmp.disconnect()
    except (EOFError, ConnectionResetError, BrokenPipeError):
        pass  # the server hangs up after quit, as QEMU does


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    aiod = sys.argv[1]
    with tempfile.TemporaryDirectory() as tmp:
        sock = os.path.join(tmp, "qmp.sock")
        log_path = os.path.join(tmp, "aiod.log")
        with open(log_path, "w") as log:
            proc = subprocess.Popen([aiod, "--qmp", f"unix:{sock}"],
                                    stdout=log, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, RUST_LOG="debug"))
        try:
            deadline = time.monotonic() + 20
            while not os.path.exists(sock):
                if proc.poll() is not None:
                    fail(f"aiod exited early with {proc.returncode}")
                if time.monotonic() > deadline:
                    fail("aiod did not create its socket")
                time.sleep(0.01)
            asyncio.run(asyncio.wait_for(session(sock), timeout=30))
            rc = proc.wait(timeout=20)
            check_equal(rc, 0, "aiod exit status after quit")
            if os.path.exists(sock):
                fail("aiod left its socket behind")
        except BaseException as err:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            with open(log_path) as log:
                print("aiod log:\n" + log.read(), file=sys.stderr)
            print(f"FAILED: {type(err).__name__}: {err}", file=sys.stderr)
            return 1
    print("qemu.qmp session against aiod: 1 passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
