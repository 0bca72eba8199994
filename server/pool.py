"""The solver pool: threads that run solves off the event loop, each with its own child process
for the solves too large to run under the server's GIL (``solver_process``).

Fairness is per job: ``share`` is how many solves one job may run at once, the threads divided
evenly among the registered jobs, so a job of many groups gets one job's share however many of
its rounds are ready (``rounds.Coordinator`` waits for it), and long solves share all threads but
one.
"""

from __future__ import annotations

import pickle
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

from netmoe.solver import Plan

from .solver_process import SolverProcess


class SolverThreads:
    """Daemon threads running solves. Shut down, queued solves are cancelled and a running one is
    abandoned: the process exits without waiting for it (a CP-SAT run may take the deadline).

    Each thread may hand its solves to its own SolverProcess (``in_process``); shutdown kills
    those, so an abandoned solve there stops at once.
    """

    def __init__(self, threads: int) -> None:
        self._queue: queue.SimpleQueue[tuple[Future, Callable[[], object]] | None] = (
            queue.SimpleQueue())
        self._procs = [SolverProcess() for _ in range(threads)]
        self._threads = [threading.Thread(target=self._work, args=(proc,),
                                          name=f"netmoe-solver-{k}", daemon=True)
                         for k, proc in enumerate(self._procs)]
        self._lock = threading.Lock()
        self._local = threading.local()
        self.running = 0  # solves under way
        for t in self._threads:
            t.start()

    def share(self, jobs: int) -> int:
        """Solves one of ``jobs`` registered jobs may run at once: an even share of the threads,
        at least one (a lone job may use them all)."""
        return max(1, len(self._threads) // max(jobs, 1))

    def submit(self, fn: Callable[[], object]) -> Future:
        fut: Future = Future()
        self._queue.put((fut, fn))
        return fut

    def warm(self) -> None:
        """Starts every thread's process (a job whose rounds go there registered)."""
        for proc in self._procs:
            proc.start()

    def in_process(self, fn: Callable[..., Plan], *args: object, **kwargs: object) -> Plan:
        """fn(*args, **kwargs) in the calling solver thread's process, or in the thread while
        the process replacing one that died still imports the solver: the round is solved now,
        holding the GIL, rather than lost waiting seconds for the import."""
        proc = self._local.proc
        if proc.replacing():
            return fn(*args, **kwargs)
        return proc.call(fn, *args, **kwargs)

    def shutdown(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                item[0].cancel()
        for _ in self._threads:
            self._queue.put(None)
        for proc in self._procs:
            proc.kill()

    def _work(self, proc: SolverProcess) -> None:
        self._local.proc = proc
        while (item := self._queue.get()) is not None:
            fut, fn = item
            if not fut.set_running_or_notify_cancel():
                continue
            with self._lock:
                self.running += 1
            try:
                fut.set_result(fn())
            except BaseException as err:
                fut.set_exception(err)
            finally:
                with self._lock:
                    self.running -= 1


def picklable(fn: Callable[..., object]) -> bool:
    try:
        pickle.dumps(fn)
    except (pickle.PicklingError, AttributeError, TypeError):
        return False
    return True

