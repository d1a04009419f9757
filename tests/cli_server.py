"""`python -m kart_lightning ARGS` for many ARGS, each in its own process, without each paying
the ~3 s of importing torch and Lightning that most of a refused command's time goes to.

Run as a script, it imports the command line once, then for each request (a JSON line on stdin:
`{"args": [...], "cwd": ..., "stdout": path, "stderr": path, "timeout_s": s}`) forks a child that
runs `kart_lightning.cli.main(args)` with its output in those files, waits for it, and answers
with a line `ANSWER {"returncode": N, "timed_out": bool, "left_running": bool}`. The child is a
real process: it exits with the command's exit code, anything uncaught prints its traceback to
its stderr, and it waits for its non-daemon threads, as `python -m` would. Processes it leaves
running after it exits (actors, say) are killed and reported, where `python -m` under
`subprocess.run` would have kept the output pipe open until they ended.
"""

import atexit
import contextlib
import json
import os
import signal
import sys
import threading
import time
import traceback

from kart_lightning import cli

ANSWER = "ANSWER "
"""Starts each answer line, so that anything else printed on stdout cannot be taken for one."""


def run_child(request: dict) -> None:
    """In the forked child: the command, then exit with its code (never back to the loop)."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills any processes it started too
        os.chdir(request["cwd"])
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)  # the requests are the server's to read
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        try:
            cli.main(request["args"])
            code = 0
        except SystemExit as exit_:
            if exit_.code is None or isinstance(exit_.code, int):
                code = exit_.code or 0
            else:  # sys.exit("message"), as the interpreter treats it
                print(exit_.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 -- what the interpreter does with anything uncaught
            traceback.print_exc()
        # The interpreter's own shutdown: wait for non-daemon threads, then the atexit handlers.
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 -- the setup failed: say so on whatever stderr is now
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def serve_one(request: dict) -> dict:
    pid = os.fork()
    if pid == 0:
        run_child(request)
    # Also here, so that a kill right after the fork reaches the group (whichever runs first).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.setpgid(pid, pid)
    deadline, timed_out, status = time.monotonic() + request["timeout_s"], False, None
    try:
        while status is None:
            done, waited = os.waitpid(pid, os.WNOHANG)
            if done:
                status = waited
            elif time.monotonic() > deadline and not timed_out:
                timed_out = True
                kill_group(pid)
            else:
                time.sleep(0.02)
        # Whatever it started and left behind; spawned helpers that end with it get 2 s to do so.
        grace = time.monotonic() + 2.0
        while group_alive(pid) and time.monotonic() < grace:
            time.sleep(0.05)
        left_running = group_alive(pid)
    finally:
        kill_group(pid)  # on the way out too (Ctrl-C, SIGTERM): nothing outlives the server
        if status is None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out, "left_running": left_running}


def serve() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    for line in sys.stdin:
        print(ANSWER + json.dumps(serve_one(json.loads(line))), flush=True)


if __name__ == "__main__":
    serve()
