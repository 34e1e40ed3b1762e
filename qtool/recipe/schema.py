"""The recipe: the typed sections that say how to quantize, their defaults and what each allows.

Reading a recipe file (and naming the line of an error) is qtool.recipe.load's job.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, field_validator
from pydantic_core import PydanticCustomError

from qtool.recipe import patterns
from qtool.recipe.inputs import DataSpec
from qtool.recipe.strict import Strict as _Strict
from qtool.recipe.values import gate_problem


RECIPE_VERSION = 1


Method = Literal["minmax", "percentile", "entropy", "mse"]
MethodOrAuto = Literal["minmax", "percentile", "entropy", "mse", "auto"]  # one Literal: one clear message


class CalibrationOverride(_Strict):
    """A calibration method for the tensors whose names match a regex (the first match wins)."""

    tensor: str = Field(
        description="Regex matched against the whole tensor name (re.fullmatch), e.g. `/head/.*`."
    )
    method: Method | None = Field(None, description="Method for these tensors (default: calibration.method).")
    percentile: Annotated[float, Field(gt=50.0, le=100.0)] | None = Field(
        None, description="Percentile for these tensors (default: calibration.percentile)."
    )

    @field_validator("tensor")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression ({exc})") from None
        return value


class CalibrationSpec(_Strict):
    method: MethodOrAuto = Field(
        "minmax", description="How an observed distribution becomes a range. `auto`: one histogram pass gives "
        "each tensor candidate ranges (minmax, percentiles 99.9/99.99/99.999 and `percentile` of |x|, the mse "
        "optimum); each tensor takes the one that least disturbs its readers' outputs on the calibration data; "
        "that model is kept if its worst output SQNR there beats minmax, percentile and mse for every tensor "
        "(else the best of those; minmax on a tie)."
    )
    percentile: Annotated[float, Field(gt=50.0, le=100.0)] = Field(
        99.99, description="`percentile` method: the range is ±(this percentile of |x|), cut to the observed min and max."
    )
    moving_average: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        0.0,
        description="minmax only: weight of the past in an exponential moving "
        "average of per-batch min/max (0 = plain running min/max).",
    )
    bins: Annotated[int, Field(ge=128, le=65536)] = Field(
        2048, description="Histogram bins for percentile, entropy and mse."
    )
    samples: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Use at most this many samples (default: all; 256 of Python feeds without a len(), "
        "e.g. a --data-loader generator, with a note when it had more); only these are read from the files."
    )
    batch_size: Annotated[int, Field(ge=1, le=4096)] = Field(
        8, description="Up to this many samples per ONNX Runtime run, stacked along each input's batch axis "
        "(read from the model); fewer where the model fixes its batch at 1 or inputs differ, never a reason to fail."
    )
    workers: int | Literal["auto"] = Field(
        0,
        description="Worker processes that share the histogram observers' work (numpy's counting holds "
        "the GIL: threads cannot). `auto`: one per core beside qtool's own, when percentile, entropy or mse "
        "have 1 GiB or more to read. Each worker costs ~60 MB and maps the run's tensors; runs are halved.",
    )
    overrides: list[CalibrationOverride] = Field(
        default_factory=list,
        description="Per-tensor method/percentile, e.g. `[{tensor: \"/head/.*\", method: minmax}]`; "
        "the first entry whose regex matches a tensor name applies to it.",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and 0 <= value <= 64):
            return value
        raise ValueError("expected a number of worker processes, 0 to 64, or auto")

    def for_tensor(self, name: str) -> "CalibrationSpec":
        """This spec with the first matching override applied (itself when none matches)."""
        for override in self.overrides:
            if patterns.fullmatch(override.tensor, name):
                changes = {key: value for key in ("method", "percentile")
                           if (value := getattr(override, key)) is not None}
                return self.model_copy(update={**changes, "overrides": []})
        return self


ActivationDtype = Literal["uint8", "int8", "uint16", "int16"]
WeightDtype = Literal["int8", "uint8", "int4", "uint4", "int16"]
Granularity = Literal["per_channel", "per_tensor", "per_block"]
Rounding = Literal["nearest", "gptq"]
BlockSize = Annotated[int, Field(ge=2, le=4096)]


class ActivationSpec(_Strict):
    dtype: ActivationDtype = Field(
        "uint8", description="Activation integer type; 16-bit types need opset 21 (qtool upgrades "
        "the model, or falls back to ONNX Runtime's com.microsoft Q/DQ, and says which)."
    )
    symmetric: bool = Field(False, description="Zero point fixed at the middle of the type.")


class WeightSpec(_Strict):
    dtype: WeightDtype = Field(
        "int8", description="Weight integer type; int4/uint4/int16 need opset 21 (upgraded automatically)."
    )
    symmetric: bool = Field(True, description="Zero point fixed at 0 (signed types) or the middle (unsigned).")
    granularity: Granularity = Field(
        "per_channel",
        description="One scale per output channel (a MatMul weight that is not 2-D has none: per tensor), one "
        "per tensor, or one per `block_size` "
        "run along the reduction axis (per_block: opset-21 blocked Q/DQ).",
    )
    block_size: BlockSize = Field(32, description="Elements per scale with granularity per_block.")
    reduce_range: Literal["auto", True, False] = Field(
        "auto",
        description="Store weights in 7 bits so that uint8 x int8 kernels without "
        "VNNI cannot saturate; `auto` decides from the host CPU. Applies only to 8-bit "
        "weights read together with 8-bit activations.",
    )
    rounding: Rounding = Field(
        "nearest",
        description="How weights become integers: `nearest`, or `gptq`: column by column, each "
        "rounding error pushed onto the inputs not yet rounded, and each channel's scale widened "
        "by up to 20 % where that moves the layer's output on the calibration data least (Conv, "
        "Gemm, 2-D MatMul weights; needs calibration data, not a table). Pays where weights limit "
        "accuracy, e.g. with 16-bit activations (the a16w8 preset); costs calibration time.",
    )


class ActivationPatch(_Strict):
    """An override's activation settings: keys left out keep the value from the defaults."""

    dtype: ActivationDtype | None = Field(None, description="Activation integer type.")
    symmetric: bool | None = Field(None, description="Zero point fixed at the middle of the type.")


class WeightPatch(_Strict):
    """An override's weight settings: keys left out keep the value from the defaults."""

    dtype: WeightDtype | None = Field(None, description="Weight integer type.")
    symmetric: bool | None = Field(None, description="Zero point fixed at 0 or the middle of the type.")
    granularity: Granularity | None = Field(None, description="per_channel, per_tensor or per_block.")
    block_size: BlockSize | None = Field(None, description="Elements per scale with per_block.")
    rounding: Rounding | None = Field(None, description="nearest or gptq.")


class MatchSpec(_Strict):
    """Which nodes an override applies to; every key given must match."""

    name: str | None = Field(None, description="Regex the whole node name must match.")
    op_type: str | None = Field(None, description="ONNX op type, e.g. MatMul.")
    tensor: str | None = Field(
        None, description="Regex the whole name of one of the node's inputs or outputs must match."
    )

    @field_validator("name", "tensor")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return value

    @property
    def names_nodes(self) -> bool:
        """Name and tensor matches single out nodes; they rank above op-type matches."""
        return self.name is not None or self.tensor is not None


Mode = Literal["static", "dynamic"]


class OverrideSpec(_Strict):
    match: MatchSpec = Field(description="Which nodes this override applies to.")
    activations: ActivationPatch | None = Field(None, description="Activation settings for these nodes.")
    weights: WeightPatch | None = Field(None, description="Weight settings for these nodes.")
    float: bool | None = Field(None, description="true keeps these nodes float.")
    mode: Mode | None = Field(None, description="static or dynamic for these nodes (see quantization.mode).")

    @field_validator("match")
    @classmethod
    def _not_empty(cls, value: MatchSpec) -> MatchSpec:
        if value.name is None and value.op_type is None and value.tensor is None:
            raise ValueError("give at least one of name, op_type, tensor")
        return value


class WeightOnlySpec(_Strict):
    """Weights stored in few bits, activations left float: the LLM-style MatMul recipe."""

    op_types: list[Literal["MatMul"]] = Field(
        ["MatMul"], description="Op types whose constant 2-D weight is quantized weight-only."
    )
    format: Literal["matmulnbits", "qdq"] = Field(
        "matmulnbits",
        description="`matmulnbits`: ONNX Runtime's com.microsoft MatMulNBits (fast on CPU); "
        "`qdq`: blocked DequantizeLinear -> MatMul at opset 21 (portable).",
    )
    bits: Literal[4] = Field(4, description="Bits per weight.")
    block_size: Annotated[int, Field(ge=16, le=2048)] = Field(
        32, description="Weights per scale along K; a power of two (MatMulNBits needs one)."
    )
    symmetric: bool = Field(True, description="false stores a zero point per block as well.")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError("expected a power of two (16, 32, 64, 128, ...)")
        return value


class ExcludeSpec(_Strict):
    nodes: list[str] = Field(default_factory=list, description="Node-name regexes kept float.")
    op_types: list[str] = Field(default_factory=list, description="Op types kept float.")

    @field_validator("nodes")
    @classmethod
    def _regexes(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
        return value


class AlgorithmsSpec(_Strict):
    """Post-training algorithms around the plan; each a switch, each reported per layer."""

    equalization: bool = Field(
        False,
        description="Cross-layer equalization (Nagel et al. 2019): rescale each Conv -> (Relu | nothing) -> "
        "Conv pair, depthwise -> pointwise included, so both weights' per-channel ranges match; the float "
        "function is unchanged. Runs on the prepared float model, before calibration. Measured +3.1 dB "
        "output SQNR on ppocr_cls, +2.3 on centerface, +0.4 on ppocr_det (bench/accuracy.py), but off by "
        "default: on the task it cost centerface one face of 26 in recall, and with it `qtool tune` on "
        "ppocr_cls finds no trial within one top-1 point of float (without it, one a16 promotion does).",
    )
    smoothing: bool = Field(
        False,
        description="Activation-to-weight smoothing (Xiao et al. 2023, SmoothQuant, alpha 0.5): where a "
        "LayerNormalization feeds only MatMul/Gemm layers with constant weights, divide its output's "
        "channels by s and multiply the weights' rows by s, s_j = sqrt(max|x_j| / max|W_j,:|) on the "
        "calibration data; the float function is unchanged. Needs calibration data, not a table.",
    )
    bias_correction: bool | Literal["auto"] = Field(
        "auto",
        description="Empirical bias correction (Nagel et al. 2019): per output channel of each quantized "
        "Conv, ConvTranspose and Gemm, remove the mean output shift its weight rounding causes on the "
        "calibration data (measured on the float model's input to the layer; a channel whose shift is within "
        "2 standard errors of 0 is left alone). `auto`: build the model with and without it and keep it only "
        "if its worst output SQNR on the calibration data is higher; `true`: keep it unchecked. Needs "
        "calibration data: with a calibration table it is skipped (a note in the report). Measured output "
        "SQNR: see the README's Post-training algorithms.",
    )


    outliers: Literal["auto", "off"] = Field(
        "auto",
        description="Outlier tensors: a planned 8-bit activation, calibrated with minmax (other methods "
        "clip its range themselves), whose readers would keep less than 15 dB "
        "SQNR from its rounding alone (estimated on the calibration data from its range, per-channel power "
        "and its readers: a few channels or values dominate its range) is handled. `auto`: where its readers "
        "are MatMul/Gemm/Conv layers with their own constant weights and its producer can take a per-channel "
        "factor (LayerNormalization, MatMul/Gemm/Conv, through a bias Add and Relu), per-channel equalization "
        "into the readers (SmoothQuant, alpha 0.5; the float function is unchanged) if that lifts the "
        "estimate to 15 dB; otherwise the tensor stays float, its readers and producer with it (never 16-bit: "
        "without 16-bit integer kernels that costs the same float compute plus conversions). report.json's "
        "`algorithms.outliers` lists each tensor and its handling. Needs calibration data, not a table "
        "(skipped with a note). Costs one float pass over the calibration data (two where a root, "
        "reciprocal or log reads a planned tensor). On by default: on the shared models it changed one "
        "tensor (centerface) and no figure for the worse (README).",
    )
    keep_float: Literal["auto", "off"] = Field(
        "off",
        description="Mixed precision at the model's ends. `auto`: where the plan's worst output SQNR on the "
        "calibration data is below 30 dB, try keeping float the first 1, 2, 3, 4, 6, ... quantized layers "
        "(Conv, ConvTranspose, MatMul, Gemm) from the inputs, with what lies between them, and likewise the "
        "last ones before the outputs, each region within 10 % of the model's multiply-accumulates; keep the "
        "best region of each end whose gain in worst output SQNR on the calibration data exceeds its "
        "layers' even share of the noise by 0.5 dB. report.json's `algorithms.keep_float` lists every "
        "region scored, its cost and its measured gain. Needs calibration data, not a table (skipped with a "
        "note). Cost: a plan and a pass over (at most 32 of) the calibration data per region scored. `off` "
        "(the default; the ppocr_det and ppocr_cls presets set `auto`): no region. Off by default because "
        "on centerface it lifted output SQNR (18.45/6.82 -> 20.71/10.25 dB first/worst) but moved faces "
        "(precision/recall 100/100 -> 92.6/96.2 %, float's 92.3/92.3); ppocr_det 11.04 -> 16.51 dB (README).",
    )

    @field_validator("outliers", "keep_float", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        """YAML 1.1 reads a bare `off` as false (and `on` as true)."""
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value


class QuantizationSpec(_Strict):
    activations: ActivationSpec = ActivationSpec()
    weights: WeightSpec = WeightSpec()
    exclude: ExcludeSpec = ExcludeSpec()
    overrides: list[OverrideSpec] = Field(
        default_factory=list,
        description="Per-node settings. Precedence: exclude > name/tensor overrides > op_type "
        "overrides > the defaults above; within a rank the earlier override wins, key by key.",
    )
    mode: Mode = Field(
        "static",
        description="`static`: activations quantized with calibrated ranges (Q/DQ by the rule table); "
        "`dynamic`: int8 weights, activations quantized at run time by ONNX Runtime's dynamic kernels "
        "(MatMul/Gemm with a constant weight -> DynamicQuantizeMatMul, LSTM -> DynamicQuantizeLSTM, "
        "large Gather tables stored int8 per row); other ops stay float and no calibration data is needed. "
        "Dynamic weights are int8 symmetric whatever `weights.dtype`/`symmetric` say (`granularity: "
        "per_tensor` and `reduce_range` apply). "
        "Overrides set `mode` per node to mix the two.",
    )
    static: bool = Field(
        True,
        description="Quantize activations and weights with Q/DQ by the rule table; false leaves "
        "every node float except those `weight_only` or `mode: dynamic` covers.",
    )
    weight_only: WeightOnlySpec | None = Field(
        None, description="Weight-only low-bit quantization of MatMuls with constant weights."
    )
    placement: Literal["fused", "fast", "all"] = Field(
        "fast",
        description="`fused`: after planning, nodes ONNX Runtime would still run as float ops between "
        "Q/DQ pairs (no integer kernel) are kept float, until no such node is left; `fast` (the default): `fused`, then "
        "groups of nodes whose integer kernels are estimated slower than float on the tensor shapes of one "
        "calibration sample, conversions included (a measured ONNX Runtime CPU cost table), are kept float "
        "too, and so are the integer kernels left when they are estimated to save under 5 % of the float model's "
        "time (within the table's error; where that is every node, the run is refused, exit 2: no 8-bit kernel "
        "pays); `all`: every node "
        "the rules and overrides quantize keeps its Q/DQ.",
    )
    algorithms: AlgorithmsSpec = Field(
        AlgorithmsSpec(),
        description="Post-training algorithms: equalization, smoothing, bias_correction, outliers, keep_float.",
    )


Gate = Literal["min_cosine", "min_sqnr_db", "max_accuracy_drop", "min_top1_agreement",
               "max_latency_ratio", "min_size_ratio", "min_slice_sqnr_db", "min_exact_match"]

class ValidationSpec(_Strict):
    data: str | None = Field(
        None,
        description="Evaluation data folder, relative to the recipe file "
        "(default: the calibration data, with a warning that figures are optimistic).",
    )
    labels: str | None = Field(
        None,
        description="labels.txt (`file label` per line), relative to the recipe "
        "file (default: labels.txt inside the evaluation folder, if present).",
    )
    samples: Annotated[int, Field(ge=1)] | None = Field(
        None, description="Evaluate at most this many samples (default: all; 256 of Python feeds without a len())."
    )
    gates: dict[Gate, float] = Field(
        default_factory=dict, description="Quality gates; a failed gate makes the exit code 1. "
        "`min_slice_sqnr_db` checks the worst slice of each output along its feature axis (an output "
        "without one counts as one slice). Integer outputs (an ArgMax) are scored by `min_exact_match` (the "
        "fraction of elements equal; with text data, of the positions its attention mask keeps: padding is "
        "not scored), not by the cosine, SQNR and top-1 gates; a gate with no output of its kind is reported not "
        "applicable, and a recipe whose every accuracy gate is so is refused (exit 2). Each threshold lies within what its figure can take: cosines "
        "-1..1, min_top1_agreement 0..1, max_accuracy_drop -1..1, ratios above 0, dB finite."
    )

    @field_validator("gates")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for name, threshold in value.items():
            problem = gate_problem(name, threshold)
            if problem:
                raise PydanticCustomError("gate_threshold", "{problem}", {"key": name, "problem": problem})
        return value


class Recipe(_Strict):
    version: Literal[1] = Field(RECIPE_VERSION, description="Recipe format version.")
    calibration: CalibrationSpec = CalibrationSpec()
    data: DataSpec = Field(DataSpec(), description="How files in a data folder become model inputs.")
    quantization: QuantizationSpec = QuantizationSpec()
    validation: ValidationSpec = ValidationSpec()
    source: Path | None = Field(None, exclude=True, description="File the recipe came from.")
    _bases: tuple[Path, ...] = PrivateAttr(())  # the `base:` files read for it (inputs: never written over)

    @property
    def files(self) -> tuple[Path, ...]:
        """The recipe file and the `base:` files it was merged from (none for a preset or Recipe())."""
        return ((self.source,) if self.source else ()) + self._bases

    def resolve_path(self, value: str | None) -> Path | None:
        """Paths in a recipe are relative to the recipe file, not the working dir."""
        if value is None:
            return None
        base = self.source.parent if self.source else Path.cwd()
        return (base / value).resolve()

    def with_placement(self, placement: str) -> "Recipe":
        """This recipe with `quantization.placement` set to `placement` (fast, fused or all)."""
        return self.model_copy(update={"quantization": self.quantization.model_copy(update={"placement": placement})})

    def as_dict(self) -> dict[str, Any]:
        """The recipe as resolved (defaults filled in), for reports."""
        return self.model_dump(mode="json", exclude={"source"})


def recipe_json_schema() -> dict[str, Any]:
    schema = Recipe.model_json_schema()
    schema["properties"].pop("source", None)
    # `base` is read by qtool.recipe.load before validation; listed here so editors and docs know it.
    schema["properties"] = {"base": {"type": "string", "description": (
        "Start from this recipe: a preset name (`qtool recipes` lists them) or a file relative to this "
        "one; the keys given here replace the base's, section by section.")}, **schema["properties"]}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "qtool recipe"
    return schema
