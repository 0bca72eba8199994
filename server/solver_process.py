"""A child process that runs solver calls for one solver thread.

OR-Tools' min-cost flow holds the GIL while it solves (measured: a Python loop in another thread
kept 2.6% of its speed during an 8 s flow), so in the server's own process a large two-stage
solve would stall the event loop and every other solver thread for its whole duration. Large
rounds are solved here instead: the thread sends the call over a pipe and waits on it, which
releases the GIL. The process (a fresh interpreter: no inherited sockets or threads) starts when
a job that needs it registers, or on first use, and is killed, not waited for, when the server
shuts down.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any


class SolverGone(RuntimeError):
    """The solver process died (killed at shutdown) before it answered."""


class SolverProcess:
    """Runs picklable module-level functions, e.g. ``netmoe.solver.solve``, one call at a time.

    Not thread-safe: each solver thread owns one (``start`` and ``kill`` may come from others).
    The child is ``python -m netmoe.server.solver_process FD``, not a multiprocessing child, so
    it never re-imports the embedding program's ``__main__``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def start(self) -> None:
        """Starts the child unless it runs (it imports the solver before its first call)."""
        with self._lock:
            if self._proc is not None or self._closed:
                return
            ours, theirs = socket.socketpair()
            with theirs:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "netmoe.server.solver_process", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            self._conn = Connection(ours.detach())

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in the child; its exception is raised here. If the child died,
        SolverGone, and a new child is started for the next call."""
        self.start()
        with self._lock:
            proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            raise SolverGone("the solver processes were stopped")
        try:
            conn.send((fn, args, kwargs))
            ok, value = conn.recv()
        except (EOFError, OSError):
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # alive, but its socket broke: stop it
                proc.kill()
                code = proc.wait()
            conn.close()
            with self._lock:
                self._proc = self._conn = None
                closed = self._closed
            if not closed:
                self.start()
            raise SolverGone(f"solver process exited (code {code})") from None
        if ok:
            return value
        raise value

    def kill(self) -> None:
        """Stops the child for good (a solve in flight is abandoned: its caller gets
        SolverGone)."""
        with self._lock:
            self._closed = True
            proc = self._proc
        if proc is not None:
            proc.kill()
            proc.wait(timeout=5)


def _serve(conn: Connection) -> None:
    import netmoe.solver  # noqa: F401  (warm: the first call does not pay the import)

    while True:
        try:
            fn, args, kwargs = conn.recv()
        except (EOFError, OSError):  # the server is gone
            return
        try:
            reply: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except Exception as err:  # the caller raises it
            reply = (False, err)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


if __name__ == "__main__":
    # Ctrl-C reaches the whole process group: the server shuts down and kills this process;
    # a KeyboardInterrupt traceback here would only be noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _serve(Connection(int(sys.argv[1])))
