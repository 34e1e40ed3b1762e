"""`RayExecutor`: the executor seam (`map_unordered`, `close`) over Ray tasks on a cluster.

Every object that more than one task's tuple holds (by identity: the trial context, the shard
plan) goes into Ray's object store once (`ray.put`); each task names it by reference, and Ray
hands it to the task's worker once per node. Results come back as tasks finish (`ray.wait`).
A task whose worker process or node dies is retried by Ray (`max_retries`); when it still cannot
finish, it is yielded as a `LostTask`, so the caller can go on without it and say which was lost.
Models past protobuf's 2 GB limit are refused (`refuse_past_limit`): their weights stay in files of
this machine (qtool.io.external), which tasks elsewhere cannot read.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from qtool.errors import UsageError
from qtool.io.model import PROTOBUF_LIMIT, model_file_bytes

INSTALL_HINT = "pip install 'qtool-onnx[ray]'"
MAX_RETRIES = 3  # Ray's retries of a task whose worker or node died (application errors are not retried)
# Seconds to wait for a TCP connection to the cluster's address before Ray is asked to connect: Ray's own
# retries against an address where nothing listens run for many minutes.
CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LostTask:
    """A task Ray could not finish after its retries: its worker or node was lost each time."""

    reason: str


def require_ray():
    """The `ray` module, or a UsageError (exit 2) saying what to install."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def unreachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """Why nothing accepts a TCP connection at a `host:port` or `ray://host:port` address within
    `timeout` seconds; None when something does, or the address is no host:port ("auto", "local")."""
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    if not colon or not port.isdigit() or not host:
        return None
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def refuse_past_limit(model_path: Path, executor: str) -> None:
    """With `executor` "ray", a UsageError (exit 2) for a model whose files hold PROTOBUF_LIMIT bytes or
    more; nothing for another executor, or a file that does not load (its loader says why later).

    Such a model's weights stay on this machine's disk (qtool.io.external); for Ray tasks they would
    be put into the object store, pulled to every node and written to each worker's disk again before
    ONNX Runtime could map them: several times the model in memory and disk per node, for trials that
    each need the whole model anyway. One machine (`--jobs N`) runs them with one copy."""
    if executor != "ray":
        return
    try:
        size = model_file_bytes(Path(model_path))
    except Exception:  # noqa: BLE001 - missing, unreadable: the load names it with its own message
        return
    if size >= PROTOBUF_LIMIT:
        raise UsageError(f"{model_path}: --executor ray takes models under protobuf's 2 GB limit; this one holds "
                         f"{size / 1e9:.2f} GB, kept on this machine's disk, which Ray tasks elsewhere cannot read: "
                         "run it here with --executor local (tune and sensitivity: --jobs N)")


def fetch(handle):
    """A value put into the object store (`ray.get`), or `handle` itself when it is no reference.

    Trials call this inside a task for the bytes their context names (the model, the evaluation set).
    """
    if type(handle).__name__ != "ObjectRef":
        return handle
    return require_ray().get(handle)


def _call(fn, packed: bool, *parts):
    """The task Ray runs: `fn` on the task (the tuple of `parts` when `packed`); references among
    `parts` arrive resolved."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return fn(tuple(parts) if packed else parts[0])


class RayExecutor:
    """Tasks on a Ray cluster: `address` (default: RAY_ADDRESS, else a local Ray instance started
    here and stopped by `close`). `jobs`: the tasks the caller should keep in flight (the
    cluster's CPUs, unless given); each task asks Ray for one CPU.

    Raises UsageError when Ray is not installed or the cluster cannot be reached.
    """

    remote = True  # tasks may run on other machines: nothing may be passed as a path of this one

    def __init__(self, address: str | None = None, jobs: int | None = None, max_retries: int = MAX_RETRIES):
        ray = require_ray()
        self._ray = ray
        option = "--ray-address" if address else "RAY_ADDRESS"
        address = address or os.environ.get("RAY_ADDRESS") or None
        self.address = address or "local"
        self._owned = not ray.is_initialized()
        why = unreachable(address) if self._owned and address else None
        if why:
            raise UsageError(f"{option} {address}: nothing answers there ({why}); start the cluster (`ray start "
                             "--head`) or give its address: the head's host:port (6379 by default) or ray://host:10001")
        if self._owned:
            try:
                # "local": a new instance even where an earlier `ray start` left /tmp/ray/ray_current_cluster
                ray.init(address=address or "local", log_to_driver=False, include_dashboard=False,
                         configure_logging=False, num_cpus=None if address else os.cpu_count())
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = address or "a local instance"
                raise UsageError(f"--ray-address {where}: cannot connect to the Ray cluster: "
                                 f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.jobs = max(1, int(jobs) if jobs else cpus)
        self._task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(_call)
        self._pending: dict = {}
        self.shipped_bytes = 0  # bytes put into the object store by this executor

    def put(self, value):
        """One object in the store, for tasks to name by reference (what `fetch` reads back)."""
        ref = self._ray.put(value)
        self.shipped_bytes += _stored_size(value)
        return ref

    def map_unordered(self, fn: Callable, tasks: Iterable) -> Iterator[tuple]:
        """`tasks` as a list: parts several tasks share are put once first. Any other iterable is
        submitted task by task as it yields (what a task needs is put by the caller), so that
        producing the tasks (reading data) overlaps with running them."""
        ray = self._ray
        refs = {key: self.put(value) for key, value in _shared_parts(tasks).items()} if isinstance(tasks, list) else {}
        pending = self._pending = {}
        try:  # whatever stops us (an error reading the tasks, Ctrl-C): what was submitted is cancelled
            for task in tasks:
                parts = task if isinstance(task, tuple) else (task,)
                args = [refs.get(id(part), part) for part in parts]
                pending[self._task.remote(fn, isinstance(task, tuple), *args)] = task
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                ref = done[0]
                task = pending.pop(ref)
                yield task, self._result(ref)
        finally:
            self.cancel()

    def _result(self, ref):
        ray = self._ray
        exceptions = ray.exceptions
        lost = tuple(getattr(exceptions, name) for name in
                     ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError",
                      "TaskUnschedulableError", "ActorDiedError") if hasattr(exceptions, name))
        try:
            return ray.get(ref)
        except exceptions.RayTaskError as exc:  # the task's own exception: raise it as it was
            cause = getattr(exc, "cause", None)
            raise (cause if isinstance(cause, BaseException) else exc) from None
        except lost as exc:
            return LostTask(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}".rstrip(": "))

    def cancel(self) -> None:
        """Cancel every task still outstanding (Ctrl-C, an error, or the caller stopped reading).

        Not `force=True`: Ray 2.60 aborts the driver ("Tried to complete task that was not pending")
        when a force-cancelled task's reply is already on its way. A plain cancel drops queued tasks
        and interrupts a running one at its next Python bytecode; what it leaves running stops with
        the cluster (`close` of a local instance) or finishes unread.
        """
        outstanding = list(self._pending)
        self._pending = {}
        if not outstanding:
            return
        try:
            _, running = self._ray.wait(outstanding, num_returns=len(outstanding), timeout=0)
        except Exception:  # noqa: BLE001 - a cluster that cannot say which finished: cancel them all
            running = outstanding
        for ref in running:
            try:
                self._ray.cancel(ref, force=False)
            except Exception:  # noqa: BLE001 - a task that finished meanwhile cannot be cancelled
                pass

    def close(self) -> None:
        self.cancel()
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
            self._owned = False

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _shared_parts(tasks: list) -> dict[int, object]:
    """Parts of the task tuples that more than one task holds (the same object): put once."""
    seen: dict[int, object] = {}
    shared: dict[int, object] = {}
    for task in tasks:
        for part in (task if isinstance(task, tuple) else (task,)):
            if id(part) in seen and not isinstance(part, (int, float, str, bool, type(None))):
                shared[id(part)] = part
            seen[id(part)] = part
    return shared


def _stored_size(value) -> int:
    """Bytes of a value as the store holds it: bytes objects and dicts of them exactly, else pickled."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict) and all(isinstance(v, (bytes, bytearray)) for v in value.values()):
        return sum(len(v) for v in value.values())
    import pickle

    try:
        return len(pickle.dumps(value, protocol=5))
    except Exception:  # noqa: BLE001 - a value pickle cannot size (an ObjectRef inside): unknown
        return 0
