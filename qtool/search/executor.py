"""Where independent trials run: one small interface, a local process pool and an in-process fallback.

The search only ever calls `map_unordered(fn, tasks)` and `close()`; Ray
(qtool/distributed/ray_executor.py) implements the same two methods without touching the search.
`fn` must be a module-level function and every task picklable. An executor whose `remote` is
true runs tasks on other machines: what they read must travel in the task, not as a path.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, Protocol, TypeVar

from qtool.distributed.ray_executor import RayExecutor
from qtool.errors import UsageError, WorkerError

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
    remote = False

    def map_unordered(self, fn, tasks):
        for task in tasks:
            yield task, fn(task)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _quiet_worker() -> None:
    """Workers leave Ctrl-C to the parent, which closes the pool; one ORT thread each unless told
    (set before a trial imports ONNX Runtime)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")


class LocalProcessExecutor:
    """A pool of `jobs` worker processes (forkserver where available, else spawn: no forked ORT state).

    A worker that dies (the OOM killer's SIGKILL) breaks the pool: `map_unordered` then raises a
    WorkerError at once, where a `multiprocessing.Pool` would wait forever for the lost task.
    """

    remote = False

    def __init__(self, jobs: int):
        self.jobs = max(1, int(jobs))
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._pool = ProcessPoolExecutor(self.jobs, mp_context=context, initializer=_quiet_worker)

    def map_unordered(self, fn, tasks):
        futures: dict = {}
        workers: list = []
        try:
            futures.update((self._pool.submit(fn, task), task) for task in tasks)
            # the workers as started: once the pool breaks it may have dropped the one that died
            workers = list((self._pool._processes or {}).values())
            for future in as_completed(futures):
                yield futures[future], future.result()
        except BrokenProcessPool:
            raise WorkerError(f"a trial worker process died before it was done ({self._deaths(workers)}); "
                              "out of memory? try fewer --jobs") from None
        finally:
            for future in futures:
                future.cancel()

    def _deaths(self, workers: list) -> str:
        """How `workers` and the pool's current ones ended: signals and exit codes, or "killed"."""
        processes = workers + list((self._pool._processes or {}).values())
        codes = sorted({process.exitcode for process in processes if process.exitcode is not None})
        named = [f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                 else f"exit code {code}" for code in codes]
        return ", ".join(named) or "killed"

    def close(self) -> None:
        processes = list((self._pool._processes or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # a trial still running is not waited for
            if process.is_alive():
                process.kill()
        for process in processes:
            process.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


EXECUTORS = ("local", "ray")


def make_executor(jobs: int | None, kind: str = "local", address: str | None = None):
    """`kind` "local": `jobs` processes here (1 or None: in this process); "ray": Ray tasks on the cluster
    at `address` (default RAY_ADDRESS, else a local instance), `jobs` in flight (default: its CPUs).
    Raises UsageError for an unknown kind, or for "ray" without Ray installed."""
    if kind == "ray":
        return RayExecutor(address, jobs)
    if kind != "local":
        raise UsageError(f"unknown executor {kind!r}; allowed: {', '.join(EXECUTORS)}")
    if address is not None:
        raise UsageError("--ray-address needs --executor ray")
    jobs = jobs or 1
    return InlineExecutor() if jobs <= 1 else LocalProcessExecutor(jobs)
