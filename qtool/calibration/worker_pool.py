"""Calibration observers spread over worker processes, which read ONNX Runtime's outputs in place.

numpy's histogram counting (np.bincount) holds the GIL, so threads cannot share the observers'
work; processes can. ONNX Runtime writes each run's exposed tensors into one shared-memory file
(IO binding), each worker observes the tensors assigned to it straight from there, and this
process observes its own share meanwhile. Only names, offsets and shapes travel to a worker (JSON
lines on its stdin); only ranges and summaries come back. The file is unlinked as soon as it is
created (workers inherit its descriptor), so a killed run leaves nothing in /dev/shm, and its
space is reserved up front: a /dev/shm too small for it is an error here, not a SIGBUS later.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from qtool.calibration.observers import Range, make_observer
from qtool.errors import CalibrationError
from qtool.numerics import QTYPES, QType
from qtool.recipe.schema import CalibrationSpec

# `workers: auto` starts none below this many bytes for histograms to read (per sample x samples):
# a worker costs ~0.3 s to start, about what it saves on 1 GiB of float32 (~1.9 ns a value alone).
PARALLEL_MIN_BYTES = 1 << 30
MAX_WORKERS = 7
ALIGN = 64  # every tensor starts on a cache line
SHARED_FOLDER = "/dev/shm"  # memory-backed on Linux; else the temporary folder
# A worker needs only the observers: a stand-in `qtool` package skips qtool/__init__, which
# would load every stage of the pipeline (~0.5 s) in each worker.
WORKER_COMMAND = (
    "import sys, types; package = types.ModuleType('qtool'); package.__path__ = [{path!r}]; "
    "sys.modules['qtool'] = package; from {module} import serve; serve()"
)

# glibc serves each allocation over 128 KiB with fresh pages from the kernel until a large block has
# been freed (this process's ONNX Runtime outputs see to that). A worker never frees one, so its
# histogram buffers and KL search arrays would fault in new zeroed pages on every use (measured:
# the threshold search 3x slower). Other C libraries ignore these variables.
WORKER_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(64 << 20)}


def aligned(nbytes: float) -> int:
    """Bytes a tensor of `nbytes` takes in the shared file: rounded up to the next cache line."""
    return -(-int(nbytes) // ALIGN) * ALIGN


def worker_count(setting: int | str, histogram_bytes: float) -> int:
    """Worker processes to start: as many as the recipe asks; for `auto`, one per core beside this
    one's, none for small work."""
    if setting != "auto":
        return int(setting)
    if histogram_bytes < PARALLEL_MIN_BYTES or not sys.executable:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(cores - 1, MAX_WORKERS))


class SharedMemoryFull(CalibrationError):
    """The shared file's space cannot be reserved (a small /dev/shm: Docker's default is 64 MiB)."""


class SharedOutputs:
    """Run outputs in a shared-memory file that ONNX Runtime writes itself.

    IO binding needs every output's shape before the run. A plain run teaches them for its feed
    shapes (its outputs are copied in); a run whose feeds differ from a one-sample run's only in
    the sample count is predicted from it (dimension 0 scaled, where it was 1). ONNX Runtime
    refuses a bound shape that turns out wrong, and that run is repeated plainly.
    """

    def __init__(self, capacity: int):
        self.session = None
        self.names: list[str] = []
        self.layouts: dict[tuple, dict[str, tuple[int, tuple[int, ...], np.dtype]]] = {}
        self.reference: tuple[dict, dict] | None = None  # (feed shapes, layout) of a one-sample run
        folder = SHARED_FOLDER if os.path.isdir(SHARED_FOLDER) else None
        try:
            self.fd, path = tempfile.mkstemp(prefix="qtool-calibration-", dir=folder)
        except OSError as exc:
            raise SharedMemoryFull(f"{folder or tempfile.gettempdir()}: cannot create the shared file: "
                                   f"{exc.strerror or exc}") from None
        self.folder = Path(path).parent
        os.unlink(path)  # the name goes now: only descriptors (ours, the workers') keep the file
        self.map: mmap.mmap | None = None
        self.size = 0
        try:
            self._reserve(capacity)
        except BaseException:
            self.close()
            raise

    def use(self, session) -> None:
        """Run this session from now on; what was learned of another session's outputs holds
        only if it had the same ones."""
        self.session, self.names = session, [output.name for output in session.get_outputs()]
        self.layouts = {key: layout for key, layout in self.layouts.items() if set(layout) == set(self.names)}
        if self.reference is not None and set(self.reference[1]) != set(self.names):
            self.reference = None

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs for these feeds, as views into the shared file."""
        layout = self.layouts.get(_shapes_key(feeds)) or self._predict(feeds)
        if layout is not None:
            try:
                return self._bound_run(feeds, layout)
            except Exception:  # noqa: BLE001 - ORT refused a predicted shape: learn the real ones
                self.layouts.pop(_shapes_key(feeds), None)
        return self.adopt(dict(zip(self.names, self.session.run(self.names, feeds))), feeds)

    def adopt(self, outputs: dict[str, np.ndarray], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy a plain run's outputs into the file; remember their layout for feeds of these shapes."""
        layout, offset = {}, 0
        for name, value in outputs.items():
            layout[name] = (offset, value.shape, value.dtype)
            offset += aligned(value.nbytes)
        self._reserve(offset)
        views = self.views(layout)
        for name, value in outputs.items():
            np.copyto(views[name], value)
        self.layouts[_shapes_key(feeds)] = layout
        if all(np.shape(value)[:1] == (1,) for value in feeds.values()):
            self.reference = ({name: value.shape for name, value in feeds.items()}, layout)
        return views

    def views(self, layout: dict) -> dict[str, np.ndarray]:
        return {name: np.ndarray(shape, dtype, buffer=self.map, offset=offset)
                for name, (offset, shape, dtype) in layout.items()}

    def offset_of(self, view: np.ndarray) -> int:
        return view.ctypes.data - self._address()

    def close(self) -> None:
        """Unmap and close the file (it has no name). Views still alive (an error on its way up
        may hold some) keep the mapping until they go."""
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _predict(self, feeds: dict[str, np.ndarray]) -> dict | None:
        if self.reference is None:
            return None
        shapes, layout = self.reference
        counts = {value.shape[0] for value in feeds.values() if value.ndim}
        if set(feeds) != set(shapes) or len(counts) != 1 or any(
            feeds[name].shape[1:] != shape[1:] for name, shape in shapes.items()
        ):
            return None
        n = counts.pop()
        predicted, offset = {}, 0
        for name, (_, shape, dtype) in layout.items():
            shape = (shape[0] * n, *shape[1:]) if shape[:1] == (1,) else shape
            predicted[name] = (offset, shape, dtype)
            offset += aligned(math.prod(shape) * dtype.itemsize)
        self._reserve(offset)
        return predicted

    def _bound_run(self, feeds: dict[str, np.ndarray], layout: dict) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        inputs = {name: np.ascontiguousarray(value) for name, value in feeds.items()}  # alive until the run ends
        for name, value in inputs.items():
            binding.bind_cpu_input(name, value)
        views = self.views(layout)
        for name, view in views.items():
            if name in feeds:  # a model input, exposed as it is: ORT hands back the feed
                np.copyto(view, feeds[name])
            else:
                binding.bind_output(name, "cpu", 0, view.dtype, list(view.shape), view.ctypes.data)
        self.session.run_with_iobinding(binding)
        self.layouts[_shapes_key(feeds)] = layout
        return views

    def _reserve(self, size: int) -> None:
        """Grow the file to at least `size` bytes (views of the old mapping must be gone)."""
        if self.map is not None and size <= self.size:
            return
        if self.map is not None:
            self.map.close()
            self.map = None
        size = max(size, ALIGN)
        try:
            os.ftruncate(self.fd, size)
            if hasattr(os, "posix_fallocate"):  # a sparse file would die of SIGBUS when the space runs out
                os.posix_fallocate(self.fd, 0, size)
        except OSError as exc:
            raise SharedMemoryFull(f"{self.folder}: cannot reserve {size / 2**20:.0f} MiB for calibration "
                                   f"outputs: {exc.strerror or exc}; give it more space (docker run "
                                   "--shm-size) or set calibration.workers: 0") from None
        self.size = size
        self.map = mmap.mmap(self.fd, self.size)

    def _address(self) -> int:
        return np.frombuffer(self.map, np.uint8, count=1).ctypes.data


def _shapes_key(feeds: dict[str, np.ndarray]) -> tuple:
    return tuple(sorted((name, value.shape, value.dtype.str) for name, value in feeds.items()))


ObserverSpec = tuple[CalibrationSpec, QType, bool, "int | None"]  # make_observer's arguments


class ObserverPool:
    """Every observer of one calibration: some here, the rest in worker processes.

    Tensors go to the least loaded lane, largest first (by bytes per sample); `pinned` tensors
    (those something else in this process also watches) count towards this process's load.
    """

    def __init__(self, specs: dict[str, ObserverSpec], sizes: dict[str, float], workers: int,
                 pinned: dict[str, float] | None = None, shared: SharedOutputs | None = None):
        lanes = [dict(pinned or {})] + [{} for _ in range(workers)]
        for name in sorted(set(specs) - set(lanes[0]), key=lambda name: (-sizes.get(name, 0.0), name)):
            min(lanes, key=lambda lane: sum(lane.values()))[name] = sizes.get(name, 0.0)
        self.local = {name: make_observer(*specs[name]) for name in lanes[0] if name in specs}
        self.remote = [set(lane) for lane in lanes[1:] if lane]
        self.workers: list[subprocess.Popen] = []
        try:
            for names in self.remote:
                self.workers.append(_start_worker(shared.fd if shared is not None else None))
                self._send(self.workers[-1], {"observe": {name: _encode(specs[name]) for name in names}})
        except BaseException:
            self.close()
            raise

    def observe(self, outputs: dict[str, np.ndarray], shared: SharedOutputs | None) -> None:
        """Update every observer of a tensor in `outputs`; those of workers read it from `shared`."""
        for worker, names in zip(self.workers, self.remote):
            tensors = [[name, shared.offset_of(outputs[name]), list(outputs[name].shape), outputs[name].dtype.str]
                       for name in names if name in outputs]
            if tensors:
                self._send(worker, {"run": {"fd": shared.fd, "size": shared.size, "tensors": tensors}})
        for name, observer in self.local.items():
            if name in outputs:
                observer.update(outputs[name])
        for worker, names in zip(self.workers, self.remote):
            if any(name in outputs for name in names):
                self._receive(worker)  # the shared file may be rewritten only after every worker is done

    def results(self) -> dict[str, tuple[Range, dict]]:
        """Each tensor's range and summary; the workers exit."""
        for worker in self.workers:
            self._send(worker, {"results": True})
        found = {name: (observer.result(), observer.summary()) for name, observer in self.local.items()}
        for worker in self.workers:
            for name, (lo, hi, summary) in self._receive(worker)["results"].items():
                found[name] = (Range(lo, hi), summary)
        return found

    def close(self) -> None:
        for worker in self.workers:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
            for stream in (worker.stdin, worker.stdout):
                try:
                    stream.close()
                except OSError:  # unsent bytes to a dead worker: its death is reported already
                    pass
        self.workers = []

    def __enter__(self) -> ObserverPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _send(worker: subprocess.Popen, message: dict) -> None:
        try:
            worker.stdin.write(json.dumps(message).encode() + b"\n")
            worker.stdin.flush()
        except OSError:  # BrokenPipeError: the worker is gone
            raise _worker_died(worker) from None

    @staticmethod
    def _receive(worker: subprocess.Popen) -> dict:
        line = worker.stdout.readline()
        if not line:
            raise _worker_died(worker)
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"calibration worker failed:\n{reply['error']}")
        return reply


def _start_worker(shared_fd: int | None) -> subprocess.Popen:
    package = Path(__file__).resolve().parents[1]  # the qtool folder
    command = [sys.executable, "-c", WORKER_COMMAND.format(path=str(package), module=__name__)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, **WORKER_MALLOC},
                            pass_fds=() if shared_fd is None else (shared_fd,))


def _worker_died(worker: subprocess.Popen) -> CalibrationError:
    code = worker.wait()
    return CalibrationError(f"a calibration worker process exited (code {code}) before it was done; "
                            "out of memory? try a smaller calibration.batch_size")


def _encode(spec: ObserverSpec) -> dict:
    calibration, qtype, symmetric, expected = spec
    return {"spec": calibration.model_dump(mode="json"), "qtype": qtype.name, "symmetric": symmetric,
            "expected": expected}


def serve() -> None:
    """A worker's loop: make observers, update them from the shared file run by run, report."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends us
    observers, files = {}, {}
    reply = sys.stdout.buffer
    try:
        for line in sys.stdin.buffer:
            message = json.loads(line)
            if "observe" in message:
                for name, spec in message["observe"].items():
                    observers[name] = make_observer(CalibrationSpec.model_validate(spec["spec"]),
                                                    QTYPES[spec["qtype"]], spec["symmetric"], spec["expected"])
            elif "run" in message:
                key = (message["run"]["fd"], message["run"]["size"])  # the file grows: map it again
                if key not in files:
                    for old in files.values():
                        old.close()
                    files = {key: mmap.mmap(key[0], key[1], access=mmap.ACCESS_READ)}
                for name, offset, shape, dtype in message["run"]["tensors"]:
                    observers[name].update(np.ndarray(shape, np.dtype(dtype), buffer=files[key], offset=offset))
                reply.write(b'{"ok": true}\n')
            elif "results" in message:
                results = {}
                for name, observer in observers.items():
                    found = observer.result()
                    results[name] = [found.lo, found.hi, observer.summary()]
                reply.write(json.dumps({"results": results}).encode() + b"\n")
                reply.flush()
                return
            reply.flush()
    except Exception:  # noqa: BLE001 - the parent reports it
        import traceback

        reply.write(json.dumps({"error": traceback.format_exc()}).encode() + b"\n")
        reply.flush()
