"""Where independent trials run: one small interface, a local process pool and an in-process fallback.

The search only ever calls `map_unordered(fn, tasks)` and `close()`; a distributed
engine (e.g. Ray) implements the same two methods without touching the search.
`fn` must be a module-level function and every task picklable.
"""

from __future__ import annotations

import multiprocessing
import os
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

Task = TypeVar("Task")
Result = TypeVar("Result")


class Executor(Protocol):
    """Runs `fn(task)` for every task and yields `(task, result)` as each finishes, in any order.

    An exception raised by `fn` is raised from the iterator. `close()` stops
    whatever is still running (it is called on Ctrl-C, too).
    """

    def map_unordered(self, fn: Callable[[Task], Result], tasks: Iterable[Task]) -> Iterator[tuple[Task, Result]]:
        ...

    def close(self) -> None:
        ...


class InlineExecutor:
    """Runs tasks one by one in this process (`--jobs 1`): no pickling, easy to debug."""

    jobs = 1

    def map_unordered(self, fn, tasks):
        for task in tasks:
            yield task, fn(task)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _call(item):
    fn, task = item
    return task, fn(task)


def _quiet_worker() -> None:
    """Workers leave Ctrl-C to the parent, which closes the pool; one ORT thread each unless told."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


class LocalProcessExecutor:
    """A pool of `jobs` worker processes (forkserver where available, else spawn: no forked ORT state)."""

    def __init__(self, jobs: int):
        self.jobs = max(1, int(jobs))
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        env_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the workers
        try:
            self._pool = context.Pool(self.jobs, initializer=_quiet_worker)
        finally:
            if env_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)

    def map_unordered(self, fn, tasks):
        yield from self._pool.imap_unordered(_call, [(fn, task) for task in tasks])

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def make_executor(jobs: int) -> InlineExecutor | LocalProcessExecutor:
    return InlineExecutor() if jobs <= 1 else LocalProcessExecutor(jobs)
