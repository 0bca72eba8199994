"""A child process that runs solver calls for one solver thread.

OR-Tools' min-cost flow holds the GIL while it solves (measured: a Python loop in another thread
kept 2.6% of its speed during an 8 s flow), so in the server's own process a large two-stage
solve would stall the event loop and every other solver thread for its whole duration. Large
rounds are solved here instead: the thread sends the call over a pipe and waits on it, which
releases the GIL. The process (a fresh interpreter: no inherited sockets or threads) starts when
a job that needs it registers, or on first use, is replaced as soon as it dies, and is killed,
not waited for, when the server shuts down.
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
        self._busy = False  # a call is under way: it handles the child's death itself
        self._ready = False  # the child said it imported the solver (its first message)
        self._starts = 0  # children started so far (> 1: the running one replaced another)
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._watchers: list[threading.Thread] = []

    def start(self) -> None:
        """Starts the child unless it runs (it imports the solver before its first call)."""
        with self._lock:
            if self._proc is not None or self._closed:
                return
            ours, theirs = socket.socketpair()
            with theirs:
                proc = self._proc = subprocess.Popen(
                    [sys.executable, "-m", "netmoe.server.solver_process", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            self._conn = Connection(ours.detach())
            self._ready = False
            self._starts += 1
            # A child that dies while idle (OOM killer, an operator's kill) is replaced at once,
            # so the next round finds a live one instead of losing its solve.
            watcher = threading.Thread(target=self._watch, args=(proc,), daemon=True,
                                       name=f"netmoe-solver-watch-{proc.pid}")
            self._watchers = [w for w in self._watchers if w.is_alive()] + [watcher]
        watcher.start()

    @property
    def pid(self) -> int | None:
        """The running child's process id (None: not started, or stopped)."""
        with self._lock:
            return None if self._proc is None else self._proc.pid

    def replacing(self) -> bool:
        """Whether the child is a replacement for one that died and has not imported the
        solver yet (a call would wait seconds for it). Only the owning thread may ask (it reads
        the child's first message)."""
        with self._lock:
            conn, replacement = self._conn, self._starts > 1
        if conn is None or self._ready:
            return False
        try:
            if conn.poll(0):
                conn.recv()  # "ready"
                self._ready = True
        except (EOFError, OSError):
            pass  # it died too; its watcher replaces it
        return replacement and not self._ready

    def _watch(self, proc: subprocess.Popen) -> None:
        proc.wait()
        with self._lock:
            if self._proc is not proc or self._busy:
                return  # already replaced, or the call under way sees the death and does it
            self._drop()
        self.start()

    def _drop(self) -> None:
        """Forgets the (dead) child; called with the lock held."""
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs) in the child; its exception is raised here. If the child died
        during the call, SolverGone, and a new child is started for the next call; one found
        dead before the call is replaced first."""
        self.start()
        with self._lock:
            proc = self._proc
            # Reaped by its watcher, which has not replaced it yet. (Not poll(): it answers
            # None while the watcher waits on the child.)
            if proc is not None and proc.returncode is not None:
                self._drop()
                proc = None
        if proc is None:
            self.start()
        with self._lock:
            proc, conn = self._proc, self._conn
            self._busy = proc is not None
        if proc is None or conn is None:
            raise SolverGone("the solver processes were stopped")
        try:
            if not self._ready:
                conn.recv()  # "ready": the child imported the solver
                self._ready = True
            conn.send((fn, args, kwargs))
            ok, value = conn.recv()
        except (EOFError, OSError):
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # alive, but its socket broke: stop it
                proc.kill()
                code = proc.wait()
            with self._lock:
                self._busy = False
                if self._proc is proc:
                    self._drop()
                closed = self._closed
            if not closed:
                self.start()
            raise SolverGone(f"solver process exited (code {code})") from None
        with self._lock:
            self._busy = False
        if ok:
            return value
        raise value

    def kill(self) -> None:
        """Stops the child for good (a solve in flight is abandoned: its caller gets
        SolverGone)."""
        with self._lock:
            self._closed = True
            proc, watchers = self._proc, self._watchers
        if proc is not None:
            proc.kill()
            proc.wait(timeout=5)
        for watcher in watchers:
            watcher.join(timeout=5)


def _serve(conn: Connection) -> None:
    import netmoe.solver  # noqa: F401  (warm: the first call does not pay the import)

    try:
        conn.send("ready")
    except (EOFError, OSError):
        return
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
