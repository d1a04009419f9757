"""`python -m kart_lightning ARGS` for many ARGS, each in its own process, without each paying
the ~3 s of importing torch and Lightning that most of a refused command's time goes to.

Run as a script, it imports the command line once, then for each request (a JSON line on stdin:
`{"args": [...], "cwd": ..., "stdout": path, "stderr": path, "timeout_s": s}`) forks a child that
runs `kart_lightning.cli.main(args)` with its output in those files, waits for it, and answers
`{"returncode": N, "timed_out": bool}`. The child is a real process: it exits with the command's
exit code, and anything uncaught prints its traceback to its stderr, as `python -m` would.
"""

import atexit
import contextlib
import json
import os
import signal
import sys
import time
import traceback

from kart_lightning import cli


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
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def serve() -> None:
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            run_child(request)
        deadline, timed_out = time.monotonic() + request["timeout_s"], False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if not timed_out and time.monotonic() > deadline:
                timed_out = True
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        answer = {"returncode": os.waitstatus_to_exitcode(status), "timed_out": timed_out}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
