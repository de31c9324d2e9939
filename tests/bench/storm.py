#!/usr/bin/env python3
"""Helper of tests/bench/control-plane.sh: starts many programs at the same moment.

    storm.py --pids FILE --released FILE DIR...

Each DIR holds `argv`, the program and its arguments separated by NUL bytes. For each DIR the
launcher forks a child that opens DIR/log as its output and then waits on a shared barrier (one
pipe, closed by the launcher once every child is waiting). Then it writes "PID DIR" per child to
FILE (--pids), takes the release time, opens the barrier and writes that time to --released.
Every child, woken by the same close, writes its own wall-clock time in ms to DIR/started and
execs its program: what follows the release is the exec storm alone, not the forking.

Run it inside the namespace the programs belong to (`ip netns exec NS python3 storm.py …`): the
namespace is entered once, and every child inherits it.

The launcher stays the programs' parent: it reaps them (so a stopped one is gone at once, not a
zombie) and exits when the last one has. SIGTERM or SIGINT to the launcher is passed on to every
program still running; if the launcher dies anyway (SIGKILL), each program gets SIGTERM from the
kernel (PR_SET_PDEATHSIG), and a child still at the barrier exits instead of starting.
"""

import argparse
import ctypes
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1


def now_ms():
    return time.time_ns() // 1_000_000


def write_file(path, text):
    # Written whole under a temporary name, then renamed: the script never reads half a file.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def child(d, argv, barrier_r, launcher, prctl):
    """Runs in the forked child; never returns."""
    try:
        # Inherited from the launcher (Python ignores SIGPIPE, and a handler would be Python's):
        # the program gets the dispositions it would get from a shell.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        if prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
        log = os.open(os.path.join(d, "log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        # Every other descriptor Python opened (the pipe, log, null) is close-on-exec.
        # EOF once the launcher and every other child have closed the write end.
        os.read(barrier_r, 1)
        os.close(barrier_r)
        if os.getppid() != launcher:
            # The launcher died before releasing us: nobody would stop the program.
            os._exit(1)
        with open(os.path.join(d, "started"), "w") as f:
            f.write(f"{now_ms()}\n")
        os.execv(argv[0], argv)
    except BaseException as e:  # noqa: BLE001 - the child must never return into the launcher
        try:
            os.write(2, f"storm.py: {d}: {e}\n".encode())
        finally:
            os._exit(127)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pids", required=True, help='file of "PID DIR" lines, written before release')
    p.add_argument("--released", required=True, help="file of the release time (ms), written after")
    p.add_argument("dirs", nargs="+", metavar="DIR")
    args = p.parse_args()

    # Everything read and checked before the first fork.
    argvs = []
    for d in args.dirs:
        with open(os.path.join(d, "argv"), "rb") as f:
            argv = [a.decode() for a in f.read().split(b"\0") if a]
        if not argv:
            sys.exit(f"storm.py: {d}/argv is empty")
        argvs.append(argv)
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    launcher = os.getpid()

    barrier_r, barrier_w = os.pipe()
    pids = []
    for d, argv in zip(args.dirs, argvs):
        pid = os.fork()
        if pid == 0:
            os.close(barrier_w)
            child(d, argv, barrier_r, launcher, prctl)
        pids.append(pid)
    os.close(barrier_r)

    def forward(sig, _frame):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass  # already reaped below

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    write_file(args.pids, "".join(f"{pid} {d}\n" for pid, d in zip(pids, args.dirs)))
    released = now_ms()
    os.close(barrier_w)
    write_file(args.released, f"{released}\n")
    print(f"released {len(pids)} at {released}", file=sys.stderr, flush=True)

    while pids:
        pid, status = os.wait()
        # A reaped PID must not be signalled again (it could be reused).
        pids.remove(pid)
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and code != -signal.SIGTERM:
            print(f"pid {pid} exited with {code}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
