"""A thread pool whose threads never hold up the exit: the embedding job's decoding threads.

`concurrent.futures.ThreadPoolExecutor` joins its threads when it shuts down and again when the interpreter
exits, so one thread blocked in a read that never ends (a URL that accepts and never answers) held Ctrl-C's
exit for up to PE_JAX_NET_TIMEOUT per item it was reading. These threads are daemons, and a pool that is
shut down after an interrupt does not wait for them: they end with their read, or with the process.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading


class DaemonPool:
    """`workers` daemon threads running submitted calls in order; `submit` returns a `concurrent.futures.Future`.

    Args:
        workers: the threads (at least one).
        name: their name's prefix (as seen by a debugger or py-spy).

    Example:
        >>> with DaemonPool(2) as pool:
        ...     pool.submit(pow, 2, 10).result()
        1024
    """

    def __init__(self, workers: int, name: str = "pe_jax-decode"):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
                         for i in range(max(1, workers))]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, *args) -> concurrent.futures.Future:
        """`fn(*args)` on one of the threads, as a future (cancelling it before it starts skips the call)."""
        future = concurrent.futures.Future()
        self._tasks.put((future, fn, args))
        return future

    def _work(self):
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 (handed to whoever waits on the future)
                future.set_exception(e)

    def shutdown(self, wait: bool = True):
        """Ends the threads once they have run what was submitted; `wait`: until then (else return at once)."""
        for _ in self._threads:
            self._tasks.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def __enter__(self) -> DaemonPool:
        return self

    def __exit__(self, kind, *_):
        self.shutdown(wait=kind is None)
