"""Model files in and out: safe loading, opset upgrade, saving, and a graph index.

Loading refuses what would make onnx read outside the model's folder
(external-data path traversal) and models that are already quantized.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import EncodeError
from onnx import ModelProto, NodeProto, TensorProto, external_data_helper, helper, version_converter

from qtool.errors import ModelError, reason
from qtool.io.artifacts import guarded, remove_stale_staging, signals_deferred, staging_name
from qtool.io.external import into_memory, keep_on_disk, on_disk, on_disk_bytes, save_with_external_data

MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear gain `axis` (per-channel) here
DEFAULT_DOMAINS = ("", "ai.onnx")
QUANTIZED_OP_TYPES = {
    "QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
    "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits",
    "DynamicQuantizeMatMul", "DynamicQuantizeLSTM",
}
PROTOBUF_LIMIT = 2**31 - 1


def proto_size(model: ModelProto) -> int:
    """model.ByteSize() for a model well under 2 GB; past half the limit, the tensors' and nodes' sizes added up.
    Tensor data kept in external files counts too (models past the limit keep their weights on disk).

    ByteSize serializes the whole model into a scratch buffer (1.7x the model's memory, measured
    on a 0.4 GB model), and protobuf refuses it past 2 GB anyway; summed one tensor at a time,
    the scratch is one tensor. The sum is an upper bound (a node's tensor attributes count twice).
    """
    tensors = sum(t.ByteSize() for t in external_data_helper._get_all_tensors(model)) + on_disk_bytes(model)
    summed = tensors + sum(node.ByteSize() for node in model.graph.node)
    if tensors >= PROTOBUF_LIMIT // 2:
        return summed
    try:
        return model.ByteSize()
    except EncodeError:  # past 2 GB in nodes and names
        return max(PROTOBUF_LIMIT, summed)


def in_one_proto(model: ModelProto) -> bool:
    """Whether the model is whole in memory and serializes as one protobuf (under 2 GB, no tensor data kept
    on disk by qtool.io.external); else onnx and ONNX Runtime must read it from a file."""
    return proto_size(model) < PROTOBUF_LIMIT and not any(
        on_disk(t) for t in external_data_helper._get_all_tensors(model))


def run_checker(model: ModelProto) -> None:
    """onnx.checker.check_model on an in-memory model (its ValidationError raised as it is).

    A model whose tensor data is kept on disk is checked as its header, written into a temporary
    folder beside one empty stand-in data file: the checker reads no tensor data (it checks that the
    file is there), and refuses the absolute locations such a model holds in memory.
    """
    if in_one_proto(model):
        onnx.checker.check_model(model)
        return
    header = ModelProto()
    header.CopyFrom(model)  # small: past the limit, weights of 1 KB and more are on disk
    for tensor in external_data_helper._get_all_tensors(header):
        if on_disk(tensor):
            next(e for e in tensor.external_data if e.key == "location").value = "weights"
    with tempfile.TemporaryDirectory(prefix="qtool-check-") as folder:
        (Path(folder) / "weights").touch()
        (Path(folder) / "model.onnx").write_bytes(header.SerializeToString())
        onnx.checker.check_model(str(Path(folder) / "model.onnx"))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_model_file(path: Path) -> None:
    """A regular file: a folder or a FIFO (which would block the read forever) is named as such."""
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not a model file; give the .onnx file inside it")
    if path.exists() and not path.is_file():
        raise ModelError(f"{path}: is not a regular file (a FIFO, socket or device); give an .onnx file")
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")


def read_header(path: Path) -> ModelProto:
    """The model's graph without external data; only an unreadable file is an error."""
    check_model_file(path)
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: file is empty; expected an ONNX model (.onnx)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise ModelError(f"{path}: not an ONNX model with a graph (no nodes found)")
    return model


def load_model(path: str | Path, *, allow_quantized: bool = False, repairs: list[str] | None = None) -> ModelProto:
    """Load a float model, with external data, refusing unsafe ones and (unless allowed) quantized ones.

    A model whose files hold PROTOBUF_LIMIT bytes or more keeps its external data on disk
    (qtool.io.external): read its tensors with `tensor_array`. Graph inputs and outputs
    declared without a type or shape (which ONNX Runtime runs but onnx.checker refuses) get
    them from shape inference, on this copy; `repairs` collects what was filled in.
    """
    path = Path(path)
    model = read_header(path)
    check_external_data(model, path)
    try:
        if _file_bytes(model, path) >= PROTOBUF_LIMIT:
            keep_on_disk(model, path.parent)
        else:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read external data: {exc}") from None
    check_text(model, path)
    filled = repair_graph_types(model)
    if repairs is not None:
        repairs.extend(filled)
    check_model(model, path)
    if not allow_quantized:
        refuse_quantized(model, path)
    return model


def external_data_files(model: ModelProto) -> list[str]:
    """Locations of external-data files named by the model's tensors, in order."""
    files: list[str] = []
    for tensor in external_data_helper._get_all_tensors(model):
        if tensor.data_location == TensorProto.EXTERNAL:
            info = {entry.key: entry.value for entry in tensor.external_data}
            location = info.get("location", "")
            if location not in files:
                files.append(location)
    return files


def model_file_bytes(path: Path) -> int:
    """Size on disk including external-data files."""
    return _file_bytes(onnx.load(str(path), load_external_data=False), path)


def _file_bytes(header: ModelProto, path: Path) -> int:
    return path.stat().st_size + sum(
        (path.parent / location).stat().st_size for location in external_data_files(header)
    )


def check_external_data(model: ModelProto, path: Path) -> None:
    """Every external-data file must resolve inside the model's folder."""
    folder = path.parent.resolve()
    for location in external_data_files(model):
        if "\0" in location:  # no file name holds one; the OS calls would raise ValueError
            raise ModelError(f"{path}: external data location {location!r} holds a NUL byte; "
                             "only plain relative file names are allowed")
        target = (folder / location).resolve()
        if os.path.isabs(location) or ".." in Path(location).parts or not target.is_relative_to(folder):
            raise ModelError(
                f"{path}: external data location {location!r} points outside the model's "
                f"folder; only relative paths inside {folder} are allowed"
            )
        if not target.is_file():
            raise ModelError(f"{path}: external data file {location!r} is missing")


def check_text(message, path: Path, where: str = "model") -> None:
    """Every string field (names, op types, metadata, doc strings) must be UTF-8 text.

    protobuf hands invalid UTF-8 back as bytes or raises on access, which would
    otherwise crash ONNX Runtime or the report writer far from the cause.
    """
    try:
        fields = message.ListFields()
    except UnicodeDecodeError:
        raise ModelError(f"{path}: {where} holds text that is not valid UTF-8") from None
    for field, value in fields:
        repeated = _is_repeated(field)
        if field.type == FieldDescriptor.TYPE_STRING:
            for text in (value if repeated else [value]):
                if not isinstance(text, str):
                    raise ModelError(f"{path}: {where}.{field.name} holds text that is not valid UTF-8")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for index, item in enumerate(value if repeated else [value]):
                check_text(item, path, f"{where}.{field.name}" + (f"[{index}]" if repeated else ""))


def _is_repeated(field: FieldDescriptor) -> bool:
    """`is_repeated` from protobuf 5.29/6.30 on; `label` (deprecated there) before."""
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def check_model(model: ModelProto, path: Path) -> None:
    """onnx.checker over the whole model: a structurally broken file is a ModelError, not a crash later.

    Past protobuf's 2 GB limit the checker reads the file by path (its external
    data was checked to stay inside the model's folder before).
    """
    try:
        if in_one_proto(model):
            onnx.checker.check_model(model)
        else:
            onnx.checker.check_model(str(path))
    except Exception as exc:  # ValidationError, and decode errors from strings that are not UTF-8
        raise ModelError(f"{path}: not a valid ONNX model: {reason(exc)}") from None


def repair_graph_types(model: ModelProto) -> list[str]:
    """Fill in, from shape inference, the type or shape a graph input or output lacks; say what was filled.

    onnx.checker requires both on the graph's interface, exporters sometimes leave
    them out, and ONNX Runtime does not need them. Past protobuf's 2 GB nothing is
    repaired (the checker reads those models from their file).
    """
    values = list(model.graph.input) + list(model.graph.output)
    lacking = [v for v in values if not (v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
                                         and v.type.tensor_type.HasField("shape"))
               and v.type.WhichOneof("value") in (None, "tensor_type")]
    if not lacking or proto_size(model) >= PROTOBUF_LIMIT:
        return []
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is an aid: the checker then names what is missing
        return []
    known = {v.name: v.type for v in list(inferred.graph.input) + list(inferred.graph.output)
             + list(inferred.graph.value_info)}
    inputs = {v.name for v in model.graph.input}
    filled = []
    for value in lacking:
        found = known.get(value.name)
        if found is None or not found.tensor_type.elem_type or not found.tensor_type.HasField("shape"):
            continue
        missing = "shape" if value.type.tensor_type.elem_type else "type"
        value.type.CopyFrom(found)
        filled.append(f"graph {'input' if value.name in inputs else 'output'} {value.name!r} had no {missing}: "
                      "set from shape inference (onnx.checker requires it; ONNX Runtime does not)")
    return filled


def refuse_quantized(model: ModelProto, path: Path) -> None:
    found = sorted({node.op_type for node in model.graph.node if node.op_type in QUANTIZED_OP_TYPES})
    if found:
        raise ModelError(
            f"{path}: model is already quantized (has {', '.join(found)}); "
            "give qtool the float model"
        )


def opset_version(model: ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    return 0


def upgrade_opset(model: ModelProto, path: Path, target: int = MIN_OPSET) -> tuple[ModelProto, str | None]:
    """Convert models below opset 13 so that Q/DQ can carry a per-channel axis."""
    current = opset_version(model)
    if current >= target:
        return model, None
    try:
        upgraded = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises bare RuntimeErrors per op
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(
            f"{path}: opset {current} is below {target} (needed for per-channel Q/DQ) "
            f"and could not be upgraded: {first_line}"
        ) from None
    return upgraded, f"opset upgraded from {current} to {target} (per-channel Q/DQ needs `axis`)"


def needs_data_file(model: ModelProto) -> bool:
    """Whether `save_model` writes the model's weights into a data file beside it (past protobuf's limit)."""
    return proto_size(model) > PROTOBUF_LIMIT - (64 << 20)


def save_model(model: ModelProto, path: Path, data_name: str | None = None, data_path: Path | None = None) -> None:
    """Write a model; weights go to `data_name` (default `<name>.data`) beside it past protobuf's 2 GB
    limit, streamed one tensor at a time, written at `data_path` if given (`model` is not changed)."""
    if needs_data_file(model):
        save_with_external_data(model, path, data_name or path.name + ".data", data_path)
    elif not in_one_proto(model):  # small enough for one file: its on-disk tensors read back, one copy
        whole = ModelProto()
        whole.CopyFrom(model)
        onnx.save_model(into_memory(whole), str(path))
    else:
        onnx.save_model(model, str(path))


def replace_model(path: Path, model: ModelProto) -> None:
    """`save_model` over an existing `path` through staging files: a reader sees the old model or the new
    one. Past the limit its data file (`<name>.data`) is renamed into place just before the model file
    (both renames with signals deferred); a `<name>.data` the new model does not use is removed.
    An OSError becomes a WriteError naming `path`."""
    path = Path(path)
    data = path.with_name(path.name + ".data")
    staged: list[Path] = []
    try:
        with guarded(path):
            remove_stale_staging(path.parent)
            with signals_deferred():
                staged += [path.with_name(staging_name()), path.with_name(staging_name())]
            header, body = staged
            big = needs_data_file(model)
            save_model(model, header, data.name, body if big else None)
            with signals_deferred():
                if big:
                    os.replace(body, data)
                os.replace(header, path)
                if not big:
                    data.unlink(missing_ok=True)
    finally:
        for leftover in staged:
            with contextlib.suppress(OSError):
                leftover.unlink(missing_ok=True)


def node_attribute(node: NodeProto, name: str, default):
    """The value of `node`'s attribute `name` (ints, floats, strings, tensors as onnx.helper gives them),
    or `default` when the node does not set it."""
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


class GraphIndex:
    """Producers, consumers and initializers of one graph, by tensor name."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.initializers = {tensor.name: tensor for tensor in graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                if name:
                    self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self.graph_inputs = {value.name for value in graph.input} - set(self.initializers)
        self.graph_outputs = {value.name for value in graph.output}
        self._taken = set(self.producer) | set(self.initializers) | self.graph_inputs
        self._taken |= {node.name for node in graph.node}

    def unique_name(self, base: str) -> str:
        """A tensor or node name not used anywhere in the graph yet."""
        name, counter = base, 1
        while name in self._taken:
            name = f"{base}_{counter}"
            counter += 1
        self._taken.add(name)
        return name


def copy_metadata(source: ModelProto, target: ModelProto) -> None:
    """The float model's metadata_props carried onto its quantized model (applications read them,
    e.g. OCR vocabularies), replacing a value the target already has under the same key."""
    kept = {entry.key: entry for entry in target.metadata_props}
    for entry in source.metadata_props:
        if entry.key in kept:
            kept[entry.key].value = entry.value
        else:
            kept[entry.key] = target.metadata_props.add(key=entry.key, value=entry.value)
