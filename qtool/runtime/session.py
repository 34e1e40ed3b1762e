"""ONNX Runtime sessions built one way for every stage: calibration, validation, checks."""

from __future__ import annotations

import platform
import tempfile
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper

from qtool.errors import DataError, ModelError, UsageError, one_line, reason
from qtool.io.samples import DataSource
from qtool.io.external import runtime_file
from qtool.io.model import PROTOBUF_LIMIT, in_one_proto, proto_size

# Ops ONNX Runtime runs with integer arithmetic once it has fused Q/DQ groups.
INTEGER_OP_TYPES = {
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearConcat", "QLinearGlobalAveragePool", "QLinearAveragePool",
    "QLinearSigmoid", "QLinearSoftmax", "QLinearLeakyRelu", "QLinearConvTranspose",
    "QLinearReduceMean", "QLinearWhere", "MatMulInteger", "ConvInteger",
    "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "DynamicQuantizeLSTM", "MatMulNBits",
}


CPU = "CPUExecutionProvider"
# ONNX Runtime execution providers in order of preference, each with its options: what every session of
# this run gets. CPU unless a caller chose others with use_providers().
Provider = tuple[str, dict[str, str]]
_PROVIDERS: ContextVar[tuple[Provider, ...]] = ContextVar("qtool_providers", default=((CPU, {}),))


def parse_providers(text: str) -> tuple[Provider, ...]:
    """`NAME[:key=value;key=value][,NAME...]` (ORT's names in any case, `CUDA` short for
    `CUDAExecutionProvider`), each one this onnxruntime build has, each once; else a UsageError."""
    available = ort.get_available_providers()
    by_folded_name = {name.lower(): name for name in available}
    providers = []
    for item in (part.strip() for part in text.split(",")):
        name, _, options_text = item.partition(":")
        name = name.strip()
        if not name:
            raise UsageError(f"--provider {text!r} leaves a provider name empty; this onnxruntime build "
                             f"({ort.__version__}) has: {', '.join(available)}")
        if not name.lower().endswith("executionprovider"):
            name += "ExecutionProvider"
        name = by_folded_name.get(name.lower(), name)
        if any(name == chosen for chosen, _ in providers):
            raise UsageError(f"execution provider {name} is named twice in --provider {text!r}")
        if name not in available:
            raise UsageError(f"execution provider {name!r} is not in this onnxruntime build "
                             f"({ort.__version__}); it has: {', '.join(available)}")
        options = {}
        for pair in filter(None, (p.strip() for p in options_text.split(";"))):
            key, equals, value = pair.partition("=")
            if not equals or not key.strip():
                raise UsageError(f"execution provider {name}: option {pair!r} is not key=value "
                                 "(several are separated by ';', e.g. CUDA:device_id=0;arena_extend_strategy=kSameAsRequested)")
            options[key.strip()] = value.strip()
        providers.append((name, options))
    return tuple(providers)


@contextmanager
def use_providers(providers: Iterable[Provider] | None) -> Iterator[None]:
    """Every session made inside the block uses `providers` (None: unchanged)."""
    token = _PROVIDERS.set(tuple(providers)) if providers else None
    try:
        yield
    finally:
        if token is not None:
            _PROVIDERS.reset(token)


def current_providers() -> tuple[Provider, ...]:
    return _PROVIDERS.get()


def session_options(optimize: bool = True, threads: int | None = None, pooled: bool = False,
                    in_order: bool = False, arena: bool = True) -> ort.SessionOptions:
    """`pooled`: the session shares the cores with worker processes and writes its outputs into
    buffers of the caller's (IO binding): no memory arena (it would keep the largest run's tensors
    for good) and no threads spinning between runs (they would take the cores the workers need).
    `in_order`: nodes run about in the order listed (ORT's PRIORITY_BASED order). Its default order runs
    nodes that only make graph outputs (a calibration model's reductions) last, keeping every tensor they
    read alive until then: ppocr_cls, 8 samples, 137 reduced tensors: 123 MB grown, 9 MB in order.
    `arena` False: no memory arena (it grows in steps past what a run needs, and keeps it): u2netp's batch
    check of 2 samples peaked at 925 MB RSS with one, 581 without; its minmax calibration at 540 and 386 MB,
    centerface's at 285 and 242 (ppocr_cls, small tensors: 153 and 174)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 4  # fatal only: ORT's errors come back as exceptions, said once by qtool
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if in_order:
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    if pooled or not arena:
        options.enable_cpu_mem_arena = False
    if pooled:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def with_outputs(model: ModelProto, names: Iterable[str]) -> ModelProto:
    """A copy of the model that also returns the given intermediate tensors."""
    exposed = ModelProto()
    exposed.CopyFrom(model)
    present = {value.name for value in exposed.graph.output}
    types = {value.name: value for value in exposed.graph.value_info}
    for name in names:
        if name in present:
            continue
        if name in types:
            exposed.graph.output.append(types[name])
        else:
            exposed.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        present.add(name)
    return exposed


def make_session(
    model: ModelProto,
    *,
    optimize: bool = True,
    threads: int | None = None,
    optimized_model_path: Path | None = None,
    pooled: bool = False,
    in_order: bool = False,
    arena: bool = True,
) -> ort.InferenceSession:
    """An ORT session over an in-memory model, on the current providers.

    Past 2 GB ORT reads the model from a file beside its weights (qtool.io.external.runtime_file;
    `model`'s in-memory weights move to disk) and maps them instead of copying them. (Prepacking
    stays on: ORT drops a mapped weight once packed, measured at the same peak as without it,
    and only the packed kernels give the small twin's float results bit for bit.)
    """
    options = session_options(optimize, threads, pooled, in_order, arena)
    if optimized_model_path is not None:
        options.optimized_model_filepath = str(optimized_model_path)
    providers = current_providers()
    with runtime_source(model, options) as source:
        return _checked(ort.InferenceSession(source, options, providers=list(providers)), providers)


FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


def tensor_shapes(model: ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """The shape of every floating-point tensor of `model`'s main graph (inputs, node outputs) on one
    run of `feeds` (one ORT thread); {} when the model is past 2 GB (no in-memory shape inference) or
    the run fails (the caller then goes without)."""
    if not in_one_proto(model):
        return {}
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except (onnx.shape_inference.InferenceError, ValueError):
        return {}
    typed = {value.name: value.type.tensor_type.elem_type
             for value in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    wanted = [out for node in model.graph.node for out in node.output if typed.get(out) in FLOAT_TYPES]
    try:
        session = make_session(with_outputs(inferred, wanted), threads=1)
        values = session.run(None, feeds)
    except Exception:  # noqa: BLE001 - an estimate's input: without it placement skips the estimate
        return {}
    shapes = {value.name: tuple(array.shape) for value, array in zip(session.get_outputs(), values)}
    shapes.update({name: tuple(array.shape) for name, array in feeds.items()})
    return shapes


@contextmanager
def runtime_source(model: ModelProto, options: ort.SessionOptions) -> Iterator[bytes | str]:
    """What ort.InferenceSession reads `model` from: its bytes, or past 2 GB a file that exists inside
    the block (an optimized model, if `options` ask for one, then keeps its weights in a file beside it)."""
    if in_one_proto(model):
        yield model.SerializeToString()
        return
    if options.optimized_model_filepath:
        name = Path(options.optimized_model_filepath).name + ".data"
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", name)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    path = runtime_file(model)
    try:
        yield str(path)
    finally:
        path.unlink()


def _checked(session: ort.InferenceSession, providers: tuple[Provider, ...]) -> ort.InferenceSession:
    """ORT falls back to CPU when a provider it has cannot start (a missing CUDA library), and drops
    options a provider does not know (CPU takes none): say so instead (UsageError, exit 2), naming
    the options the provider reports it applies."""
    started = session.get_providers()
    missing = [name for name, _ in providers if name not in started]
    if missing:
        raise UsageError(f"execution provider {', '.join(missing)} did not start (onnxruntime ran "
                         f"{', '.join(started)}); check its libraries and options")
    applied = session.get_provider_options()
    for name, options in providers:
        reported = applied.get(name, {})
        if not reported and name != CPU:  # a provider that reports none cannot be checked (CPU takes none)
            continue
        unknown = sorted(set(options) - set(reported))
        if unknown:
            known = ", ".join(sorted(reported)) or "none"
            raise UsageError(f"execution provider {name}: option {', '.join(unknown)} is not one it takes "
                             f"(onnxruntime {ort.__version__} would ignore it); its options: {known}")
    return session


def check_runnable(model: ModelProto, path: Path) -> None:
    """The user's float model must load in ONNX Runtime: if not, say so now as a ModelError.

    onnx.checker accepts some models ORT refuses (unknown ops, type mismatches);
    without this they would fail deep in calibration. Skipped past 2 GB, where
    a session costs a full temporary copy: calibration's own session reports those.
    """
    if proto_size(model) >= PROTOBUF_LIMIT:
        return
    try:
        make_session(model, optimize=False)
    except UsageError:  # a provider that did not start: not the model's fault
        raise
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types, and decode errors
        raise ModelError(f"{path}: ONNX Runtime cannot load this model: {reason(exc)}") from None


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def run_batch(session: ort.InferenceSession, feeds: dict[str, np.ndarray], files: Sequence[str], data: DataSource,
              model: str) -> dict[str, np.ndarray]:
    """`run` on a batch of `data`'s files: ONNX Runtime failing on them is an input error (exit 2)."""
    try:
        return run(session, feeds)
    except Exception as exc:  # ORT raises InvalidArgument, Fail, RuntimeException, ... per kernel
        raise input_error(exc, data, files, lambda one: run(session, one), model) from None


def input_error(exc: Exception, data: DataSource, files: Sequence[str],
                run_one: Callable[[dict[str, np.ndarray]], object], model: str) -> DataError:
    """A DataError naming the first of `files` ONNX Runtime fails on by itself (each is rerun alone;
    if none fails alone, the batch's first file) and ORT's reason, e.g. a Gather index out of range."""
    wanted, culprit = set(files), None
    for name, feeds in data.samples():
        if name in wanted:
            try:
                run_one(feeds)
            except Exception:  # the same failure, now pinned to one file
                culprit = name
                break
            wanted.discard(name)
            if not wanted:
                break
    where = data.where(culprit) if culprit else \
        f"{data.where(files[0])} (and the {len(set(files)) - 1} other files of its batch: alone each one runs)"
    return DataError(f"{where}: ONNX Runtime failed to run {model} on this input: {one_line(str(exc)) or type(exc).__name__}")


def optimized_graph(model: ModelProto) -> onnx.GraphProto:
    """The graph ONNX Runtime actually runs on the current providers, after its optimizer (one session;
    fused integer kernels keep the name of the node they replace)."""
    with tempfile.TemporaryDirectory(prefix="qtool-opt-") as folder:
        path = Path(folder) / "optimized.onnx"
        make_session(model, optimized_model_path=path)
        return onnx.load(str(path), load_external_data=False).graph


def op_histogram(graph: onnx.GraphProto) -> Counter:
    return Counter(node.op_type for node in graph.node)


def optimized_op_histogram(model: ModelProto) -> Counter:
    """Op types in the graph ONNX Runtime actually runs (after its optimizer)."""
    return op_histogram(optimized_graph(model))


def int8_kernels_may_saturate() -> bool:
    """True on x86 CPUs without VNNI, where ORT's u8×s8 kernels add pairs in int16.

    Full-range int8 weights then overflow (a digits CNN fell from 98.5 % to
    47.5 % top-1); 7-bit weights cannot. Other architectures are not affected.
    """
    if platform.machine().lower() not in {"x86_64", "amd64", "i386", "i686"}:
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # unknown x86 CPU: the safe assumption
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    return not {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags)
