"""Integer kernels that cost more than float: a measured cost table, and the regions it keeps float.

ONNX Runtime's CPU integer kernels have a larger fixed cost per call than its float kernels,
and some have no fast path at all: a model of small tensors (a text-line classifier) runs its
8-bit model slower than float even where every Q/DQ pair fuses. `slower_regions` estimates,
per planned node, the time of its integer kernel and of its float op from the tensor shapes of
one sample, adds the QuantizeLinear/DequantizeLinear (and layout Transpose) conversions on every
tensor that crosses between integer and float, and keeps float the connected groups of nodes
whose float compute plus conversions is estimated cheaper. Same model, shapes and plan: same
decisions (no timing at quantize time).

The table: medians of ONNX Runtime 1.32 CPU profiles (`SessionOptions.enable_profiling`, one
thread, this project's x86-64 machine) of ppocr_cls (48x192), ppocr_det (320x320), u2netp (320x320) and digits_cnn,
float model vs its qtool int8 model, per node; times in microseconds, e = elements,
macs = multiply-accumulates. Measured (float µs / int8 µs):
- Conv 1x1 192->192 on 20x20 (14.7 M MACs): 157 / 52; 32->200 on 2x96 (1.2 M MACs): 20 / 22;
  1x1x1 SE convs: 5 / 12; digits_cnn (16x16) 3x3 32->64 on 8x8 (1.2 M MACs): 14 / 8.5, 64->192
  on 4x4 (1.8 M MACs): 28 / 11 (the fit: float 4 + MACs/70k, int8 5 + MACs/300k).
- MaxPool after a QLinearConv runs as NhwcMaxPool: 3 / 4 (digits_cnn 32x16x16).
- depthwise Conv: 200 ch 2x96 5x5: 15 / 136; 192 ch 20x20: 58 / 71; 384 ch 10x10: 35 / 40 (why, and the
  fit by shape: below).
- MaxPool 200x2x96 (uint8 has no MLAS path): 13 / 205. Resize (nearest) 9600 -> 38400: 20 / 42;
  38400 -> 153600: 51 / 120; 153600 -> 614400: 305 / 460.
- Resize (linear, u2netp 320x320, float NCHW): 16x10x10 -> 6400: 19-35; 16x40x40 -> 102400: 165-172;
  1x10x10 -> 102400: 169-191; 16x80x80 -> 409600: 658-672; 64x40x40 -> 409600: 676; 16x160x160 -> 1638400:
  2603; 64x80x80 -> 1638400: 2634; 64x160x160 -> 6553600: 14460. ONNX Runtime has no integer kernel for it:
  between Q/DQ it stays DequantizeLinear -> float Resize -> QuantizeLinear (the same ops in an NHWC chain:
  314 µs for 409600, 783 for 64 channels' 1638400; 500-540 for one channel's 102400).
- Add 38400: 7 / 10; 76800: 11 / 13. Mul 38400: 6-9 / 19; 76800: 15 / 23; broadcast
  (SE scale) Mul 25344: 7 / 25; 18432: 6 / 44.
- QuantizeLinear 614400: 132, 56832: 14; DequantizeLinear 614400: 106, 56832: 9.
- QLinearLeakyRelu 56832: 16 (float LeakyRelu: fused into the Conv).
- Softmax over the last axis (albert_ja_pos's attention, then one-Softmax models; AVX2 without AVX-512,
  inputs plain and with half the columns -3.4e38, which made no difference here): [1, 4, 256, 256]: 136 /
  935-1427 (albert_ja_pos: 131-135 / 872-879); 4x128x128: 58 / 374; 12x128x128: 155 / 1091; 4x64x64: 17-24 / 61;
  8x32x32: 11 / 35; 2x512x512: 265-352 / 5739-6737. QLinearSoftmax was 3-20x float at every size. (On an
  AVX-512 host docs/recipe.md saw the masked float Softmax itself at 3.1-3.7 ms: not this table's host.)

On an AVX2 host without VNNI (AMD EPYC, 2 shared cores; u8s8 GEMMs through vpmaddubsw, 7-bit weights) the
table's decisions held, so it is not split by ISA: with the default recipe every model ran at least as fast
as float (bench/latency.py, one thread, float / int8: digits_cnn 1.23, speech_embedding 1.17, centerface 1.16-1.21,
u2netp 1.91, albert_ja_pos 1.01-1.04, pyannote_seg3 1.01; ppocr_cls refuses, its fused int8 model 0.86). There
the integer GEMM gains less (1x1 Conv 14.7 M MACs: 393-430 / 214-226 µs, 1.8x instead of 3x, profiled under
load), but scaling `Conv`'s int8 rate to match made digits_cnn and speech_embedding refuse although they run
1.2x faster as int8: a float model also pays NCHWc ReorderInput/ReorderOutput around its Convs (ppocr_det
320x320: 3.4 of 31 ms float, 1.1 of 26 ms in its int8 model) that per-kernel rates leave out. Mispriced there by one
rate per op: ppocr_det's depthwise Convs and broadcast QLinearMuls ran as integer kernels at about float's time,
ppocr_cls's at 2-3.5x, so `fast` kept 86 of ppocr_det's nodes float (1.11x float against `fused`'s 1.15-1.18x).

Shape by shape (that host, single-node float vs QDQ models and both models' profiles; host µs, about 2.45x the
table's, whose 1x1 Conv 192->192 20x20 ran 376-385 / 186-195 there): ORT's float depthwise kernel (NCHWc) skips
the taps that fall in the padding and runs output rows of 8 channels, so it is fast on a few long rows; its
integer kernel computes every tap (padding as the zero point) at a rate per MAC. 5x5, float / int8: 200 ch 2x96
19-51 / 64-157 (40% of the taps inside), 88 ch 3x96 9-46 / 26-118, 200 ch 7x96 88 / 209, 200 ch 96x2 (2-long
rows) 50-99 / 39-63; square maps 192 ch 20x20 85-171 / 87-173, 384 ch 10x10 51-125 / 46-115, 192 ch 20x20
stride 2 16-57 / 16-60; 3x3: 16 ch 160x160 129-140 / 287-289, 96 ch 40x40 38-94 / 47-115. depthwise_us fits
float 2 + C x rows / 300 + taps inside / 30k, int8 10 + MACs / 28k (table µs): 1.1x on ppocr_det's maps, 2.1-2.8x
on ppocr_cls's. Broadcast QLinearMul ([H, W, C] x [C]): ppocr_det [80, 80, 24] 257, [40, 40, 96] 82, [20, 20,
96] 29, [10, 10, 384] 21; ppocr_cls [2, 96, 200] 35, [3, 96, 88] 34 (float 17-23): 1.2-1.9x float, not 5-6x.
Nearest uint8 Resize (NHWC): 38400 -> 153600 259, 153600 -> 614400 1044 (float 58 and 292): 3.6x float, where the
table had 1.5x; float nearest Resize x2 runs at 5k elements per table µs, not 2k.

ppocr_cls under this table still refuses (no 8-bit kernel pays). Partial placements tried by hand (placement
fused, every node but those named excluded, 32 calibration lines, 96 eval lines; model time as the sum of per-node
profile medians, two runs, since wall-clock medians of 2 ms runs swung 2-5x on that loaded host): float 2409-3023
µs; float with its 18 hard-swishes run as HardSwish (what qtool writes for float ones) 1784-2217; the last
block's 1x1 Convs and residual Add integer (3 nodes) 1745-1985, 1.02-1.12x that, 33.7 dB, top-1 91.67 % (float
92.71); the last two blocks' (6) 2080-2394, 0.86-0.93x, 30.9 dB; the last stage's (8) 2092-2134, 0.85-1.04x, 28.4 dB;
every 1x1 Conv and residual Add (29) 3258-3727, 22.1 dB (8 lines); fused 3729-4284. None is faster than float compute by
more than this host's noise or MIN_GAIN, and none keeps top-1.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable

import onnx

from qtool.quantization.rules import RULES

# The ONNX Runtime release the table was measured on. Older releases fuse and lay out differently
# (on 1.19 digits_cnn's uint8 MaxPools leave the NHWC integer chain, so the table kept the whole
# model float, while its fused int8 model ran 1.5x faster than float): there `fast` plans as `fused`.
FITTED_ON = (1, 32)


def table_applies(runtime_version: str) -> bool:
    """Whether the table speaks for ONNX Runtime `runtime_version` ("1.32.0"): this release or later."""
    numbers = re.match(r"(\d+)\.(\d+)", runtime_version)
    return bool(numbers) and (int(numbers[1]), int(numbers[2])) >= FITTED_ON


Shapes = dict[str, tuple[int, ...]]

KEPT_FOR_SPEED = "placement fast: integer kernels"  # how the reason of every node `fast` keeps float begins
MARGIN_US = 10.0  # a group goes float only when estimated this much faster: the table errs by a few µs a kernel
# Integer kernels left estimated to save less than this share of the float model's time: none. The table
# underestimates what integer Conv chains save (it leaves out float's NCHWc reorders): speech_embedding with
# one middle Conv excluded, estimated 9 % saved, ran at 0.83x float (bench: quantize's latency row, this host).
MIN_GAIN = 0.05
MAX_GROUP = 64  # nodes one group may grow to (bounds the search on large graphs)
MAX_SWEEPS = 8


def _linear(fixed: float, per_us: float) -> Callable[[float], float]:
    """fixed µs + work / (work per µs)."""
    return lambda work: fixed + work / per_us


def _cached(small: Callable[[float], float], per_us_large: float, knee: float = 100_000) -> Callable[[float], float]:
    """Float elementwise ops slow down past the cache: beyond `knee` elements, `per_us_large`."""
    return lambda e: small(e) if e <= knee else max(small(e), e / per_us_large)


@dataclass(frozen=True)
class KernelCost:
    """µs of one node's float op and of its integer kernel, from its work (`work`: 'macs', 'in' or 'out' elements)."""
    work: str
    float_us: Callable[[float], float]
    int8_us: Callable[[float], float]


_GEMM = KernelCost("macs", _linear(4, 70_000), _linear(5, 300_000))
_EQUAL = KernelCost("out", _linear(2, 10_000), _linear(2, 10_000))  # data movement: same work either way
COSTS: dict[str, KernelCost] = {
    "Conv": _GEMM,
    "Gemm": _GEMM,
    "MatMul": _GEMM,
    # A spatial Conv on 1-4 input channels (a first layer): the integer kernel's im2col does not pay
    # (speech_embedding 1->24 3x3: 27 / 75; ppocr_cls 3->8 3x3: 29 / 106; digits_cnn 1->32 3x3: 5 / 13).
    # A Conv on one pixel (squeeze-excitation): the integer kernel's fixed cost dominates (ppocr_cls 200->50
    # and 50->200: 5-9 / 12-15; ppocr_det 96->24: 8-11 as int8).
    "PixelConv": KernelCost("macs", _linear(4, 70_000), _linear(11, 300_000)),
    # Both kernels run faster with more output channels (a wider GEMM over the short K), node_costs:
    # float 4 + MACs / max(20k, 800 x channels), int8 5 + MACs / max(6k, 350 x channels). u2netp 3->64 3x3 on
    # 320x320 (177 M MACs): 3521 / 7857 measured, 3460 / 7904 estimated; ppocr_cls (8 channels) 29 / 106,
    # 29 / 88; digits_cnn (32) 5 / 13, 8 / 12; speech_embedding (24) 27 / 75, 28 / 62.
    "SmallKConv": KernelCost("macs", _linear(4, 20_000), _linear(5, 6_000)),
    # Depthwise: node_costs prices it from the shapes (depthwise_us), not from one rate.
    "Add": KernelCost("out", _cached(_linear(3, 9_000), 2_000), _linear(7, 7_000)),
    "Mul": KernelCost("out", _cached(_linear(3, 6_500), 2_000), _linear(8, 5_000)),
    # Broadcast Mul ([N, C, H, W] x [N, C, 1, 1], a squeeze-excitation scale): the integer kernel (in the NHWC
    # chain, [H, W, C] x [C]) pays per pixel as well as per element, node_costs: int8 3 + pixels / 70 + e / 10k.
    "BroadcastMul": KernelCost("out", _cached(_linear(3, 6_500), 5_000), _linear(3, 10_000)),
    "MaxPool": KernelCost("in", _linear(3, 5_000), _linear(5, 190)),  # uint8 NCHW: a plain loop
    "NhwcMaxPool": KernelCost("in", _linear(3, 5_000), _linear(3, 5_000)),  # inside ORT's NHWC integer chain
    "Resize": KernelCost("out", _linear(5, 5_000), _linear(17, 1_300)),  # nearest: uint8 Resize (NHWC), 3-4x float
    "GlobalAveragePool": KernelCost("in", _linear(3, 6_000), _linear(6, 12_000)),
    "AveragePool": KernelCost("in", _linear(3, 6_000), _linear(6, 12_000)),
    "Sigmoid": KernelCost("out", _linear(3, 2_500), _linear(3, 2_900)),
    "Softmax": KernelCost("out", _linear(2, 1_700), _linear(4, 250)),  # QLinearSoftmax: 3-20x float
    # u2netp: float 32x160x160: 257 / 219; 128x320x320: 7766 / 2590 (past the cache)
    "Concat": KernelCost("out", _cached(_linear(2, 2_700), 1_700, knee=4_000_000), _linear(2, 3_300)),
    # Relu and Clip run inside their producer's integer kernel; as float ops after a Conv they fuse
    # into it too, after anything else they are one pass.
    "Clip": KernelCost("out", _linear(3, 9_000), lambda e: 0.0),
    "Relu": KernelCost("out", _linear(3, 9_000), lambda e: 0.0),
    # Float LeakyRelu fuses into the Conv before it (FusedConv); QLinearLeakyRelu is a table lookup of its own.
    "LeakyRelu": KernelCost("out", _linear(3, 9_000), _linear(3, 4_000)),
}
# Resize linear/cubic, float µs by output elements. No integer kernel: as planned 8-bit it is the same float op
# between a DequantizeLinear and a QuantizeLinear (node_costs adds them).
LINEAR_RESIZE_US = _cached(_linear(10, 600), 450, knee=2_000_000)
# Activations ORT's float optimizer fuses into the float Conv/Gemm before them (FusedConv, FusedGemm):
# free as float ops when that producer is float too.
FUSED_ACTIVATIONS = {"Relu", "Clip", "LeakyRelu"}
SMALL_CIN = 4  # a spatial Conv on this many input channels or fewer: SmallKConv
SMALLK_PER_CHANNEL = (800, 350)  # SmallKConv's MACs per µs per output channel, float and int8 (at least the table's)
BROADCAST_PIXELS_PER_US = 70  # QLinearMul by a [C] vector: the broadcast restarts at every pixel
# Depthwise Conv (depthwise_us): float 2 + C x output rows / 300 + taps inside the input / 30k,
# int8 10 + every tap / 28k (MACs, the padding's included).
DEPTHWISE_FLOAT = (2, 300, 30_000)
DEPTHWISE_INT8 = (10, 28_000)


def _inside_taps(size: int, out: int, kernel: int, stride: int, dilation: int, pad: int) -> int:
    """Kernel taps, summed over the `out` output positions of one axis, that land inside the input."""
    return sum(sum(1 for t in range(kernel) if 0 <= i * stride - pad + t * dilation < size) for i in range(out))


def depthwise_us(node: onnx.NodeProto, first: tuple[int, ...], output: tuple[int, ...],
                 weight: tuple[int, ...]) -> tuple[float, float]:
    """(float µs, int8 µs) of a depthwise Conv, NCHW `first` [N, C, H, W] -> `output`, weight [C, 1, kh, kw].

    ORT's float kernel (NCHWc) runs output rows of 8 channels and skips the taps that fall in the padding;
    its integer kernel computes every tap (padding as the zero point) at a rate per MAC. So a few long rows
    with most of a 5x5 window in the padding (ppocr_cls: 3 rows of 96) run float at a third of the int8 time,
    square maps (ppocr_det: 20x20, 10x10) at about the same."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    axes = len(weight) - 2
    kernel, spatial, out = weight[2:], first[2:], output[2:]
    if len(spatial) != axes or len(out) != axes:
        return 0.0, 0.0
    strides = attrs.get("strides") or [1] * axes
    dilations = attrs.get("dilations") or [1] * axes
    pads = attrs.get("pads") or [0] * (2 * axes)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    if auto_pad in (b"SAME_UPPER", b"SAME_LOWER"):
        totals = [max(0, (o - 1) * s + (k - 1) * d + 1 - n)
                  for o, s, k, d, n in zip(out, strides, kernel, dilations, spatial)]
        pads = [t // 2 if auto_pad == b"SAME_UPPER" else t - t // 2 for t in totals]
    inside = math.prod(_inside_taps(n, o, k, s, d, p)
                       for n, o, k, s, d, p in zip(spatial, out, kernel, strides, dilations, pads[:axes]))
    rows = output[1] * math.prod(out[:-1]) if axes > 1 else output[1]
    channels = output[0] * output[1]
    macs = math.prod(output) * math.prod(kernel)
    fixed, per_row, per_us = DEPTHWISE_FLOAT
    return (fixed + output[0] * rows / per_row + channels * inside / per_us,
            DEPTHWISE_INT8[0] + macs / DEPTHWISE_INT8[1])


def conversion_us(elements: int) -> float:
    """One QuantizeLinear or DequantizeLinear of a tensor (ORT's transpose optimizer moves the NHWC
    layout Transposes next to them away in the models measured). Past the cache slower: u2netp's
    QuantizeLinear of 64x320x320: 2958 µs."""
    return _cached(_linear(2, 5_000), 2_200, knee=2_000_000)(elements)


def reorder_us(elements: int) -> float:
    """ORT's ReorderOutput of a float Conv's blocked (NCHWc) output for a reader outside its float Conv chain,
    such as a QuantizeLinear: u2netp 16x320x320: 296 µs; 64x320x320: 3304."""
    return _cached(_linear(0, 5_500), 2_000, knee=2_000_000)(elements)


def node_costs(node: onnx.NodeProto, shapes: Shapes, initializers: dict[str, tuple[int, ...]],
               nhwc: bool = False) -> tuple[float, float]:
    """(float µs, int8 µs) of `node` on the sample `shapes` came from; (0, 0) when a shape is unknown.
    `nhwc`: ORT runs the node's integer kernel inside its NHWC chain (NhwcMaxPool)."""
    output = shapes.get(node.output[0]) if node.output else None
    first = shapes.get(node.input[0]) if node.input else None
    if output is None or first is None:
        return 0.0, 0.0
    kind = "Nhwc" + node.op_type if nhwc and "Nhwc" + node.op_type in COSTS else node.op_type
    if kind == "Resize" and next((a.s for a in node.attribute if a.name == "mode"), b"nearest") != b"nearest":
        float_us = LINEAR_RESIZE_US(math.prod(output))
        return float_us, float_us + conversion_us(math.prod(first)) + conversion_us(math.prod(output))
    if kind == "Conv" and len(node.input) > 1:
        weight = initializers.get(node.input[1]) or shapes.get(node.input[1])
        group = next((attr.i for attr in node.attribute if attr.name == "group"), 1)
        if weight is None:
            return 0.0, 0.0
        if group > 1 and weight[1] == 1 and len(first) > 1 and group == first[1]:
            return depthwise_us(node, first, output, weight)
        if weight[1] <= SMALL_CIN and math.prod(weight[2:]) > 1:
            kind = "SmallKConv"
        elif math.prod(output[2:]) == 1:
            kind = "PixelConv"
        work = math.prod(output) * math.prod(weight[1:])
    elif kind in ("Gemm", "MatMul") and len(node.input) > 1:
        other = initializers.get(node.input[1]) or shapes.get(node.input[1])
        k = first[-1] if first else 0
        work = math.prod(output) * k if other is not None else 0
    else:
        if kind == "Mul" and len(node.input) > 1:
            second = shapes.get(node.input[1]) or initializers.get(node.input[1])
            if second is not None and first != second and math.prod(second) > 1:
                kind = "BroadcastMul"  # per-channel scales ([N, C, 1, 1] x [N, C, H, W]): no fast path
        work = 0
    cost = COSTS.get(kind, _EQUAL)
    if kind == "SmallKConv":
        return (4 + work / max(20_000, SMALLK_PER_CHANNEL[0] * weight[0]),
                5 + work / max(6_000, SMALLK_PER_CHANNEL[1] * weight[0]))
    if kind == "BroadcastMul" and len(output) > 2:
        pixels = math.prod(output) // output[1]
        return cost.float_us(math.prod(output)), cost.int8_us(math.prod(output)) + pixels / BROADCAST_PIXELS_PER_US
    if cost.work == "out":
        work = math.prod(output)
    elif cost.work == "in":
        work = math.prod(first)
    return cost.float_us(work), cost.int8_us(work)


@dataclass(frozen=True)
class Group:
    nodes: tuple[str, ...]
    int8_us: float  # the group's integer kernels and the conversions around them, as planned
    float_us: float  # the group's float ops and the conversions around them, kept float
    model_float_us: float = 0.0  # set on the integer kernels left, which save less than MIN_GAIN of this


def slower_regions(graph: onnx.GraphProto, integer: Iterable[str], shapes: Shapes,
                   nhwc: Iterable[str] = ()) -> list[Group]:
    """Groups of nodes among `integer` (the planned nodes that run as 8-bit kernels) that are estimated
    faster kept float, conversions at their borders included; disjoint. `nhwc`: the nodes ORT runs as
    Nhwc* integer kernels (read from its optimized graph).

    Greedy: from each node, costliest integer kernel (over its float op) first, grow a group by the
    neighbour that lowers its estimate most (up to MAX_GROUP nodes), keep it float when it saves more
    than MARGIN_US; sweep again until none does (MAX_SWEEPS). Last, when the integer kernels left save
    less than MIN_GAIN of the float model's estimated time (within the table's error), they go float too.
    """
    initializers = {init.name: tuple(init.dims) for init in graph.initializer}
    nodes = {node.name: node for node in graph.node}
    order = {node.name: i for i, node in enumerate(graph.node)}
    in_nhwc = set(nhwc)
    cost = {name: node_costs(node, shapes, initializers, name in in_nhwc) for name, node in nodes.items()}
    producer = {out: node.name for node in graph.node for out in node.output if out}
    readers: dict[str, list[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name and name not in initializers and name in shapes:
                readers.setdefault(name, []).append(node.name)
    outputs = {value.name for value in graph.output}
    current = {name for name in integer if name in nodes}

    def crossing(tensor: str, quantized: set[str]) -> float:
        """Conversions `tensor` costs when the nodes in `quantized` run integer kernels."""
        shape = shapes.get(tensor)
        if shape is None:
            return 0.0
        made_integer = producer.get(tensor) in quantized
        read = readers.get(tensor, [])
        float_reader = tensor in outputs or any(r not in quantized for r in read)
        integer_reader = any(r in quantized for r in read)
        if made_integer and float_reader:
            return conversion_us(math.prod(shape))
        if not made_integer and integer_reader:
            maker = nodes[producer[tensor]] if tensor in producer else None
            if maker is not None and maker.op_type in FUSED_ACTIVATIONS and maker.input[0] in producer:
                maker = nodes[producer[maker.input[0]]]  # fused into the float Conv before it
            made_by_conv = maker is not None and maker.op_type == "Conv"
            return conversion_us(math.prod(shape)) + (reorder_us(math.prod(shape)) if made_by_conv else 0.0)
        return 0.0

    def float_cost(name: str, quantized: set[str]) -> float:
        node = nodes[name]
        source = producer.get(node.input[0]) if node.input else None
        if (node.op_type in FUSED_ACTIVATIONS and source is not None and source not in quantized
                and nodes[source].op_type in ("Conv", "Gemm")):
            return 0.0
        return cost[name][0]

    def closed(group: set[str]) -> set[str]:
        """`group` and the planned readers of what its data-movement nodes write: a Resize or MaxPool kept float
        leaves its output without the range it shared with its input, so whatever read it quantized goes float
        too (u2netp: each Resize kept float took its Concat with it)."""
        grown, todo = set(group), list(group)
        while todo:
            node = nodes[todo.pop()]
            rule = RULES.get(node.op_type)
            if rule is None or rule.output != "shared":
                continue
            for name in (r for t in node.output for r in readers.get(t, []) if r in current and r not in grown):
                grown.add(name)
                todo.append(name)
        return grown

    def estimate(group: set[str]) -> tuple[float, float]:
        tensors = {t for name in group for t in [*nodes[name].input, *nodes[name].output] if t in shapes}
        after = current - group
        before_us = sum(cost[name][1] for name in group) + sum(crossing(t, current) for t in tensors)
        after_us = sum(float_cost(name, after) for name in group) + sum(crossing(t, after) for t in tensors)
        return before_us, after_us

    def neighbours(group: set[str]) -> list[str]:
        found = set()
        for name in group:
            node = nodes[name]
            found.update(producer[t] for t in node.input if t in producer)
            for t in node.output:
                found.update(readers.get(t, []))
        return sorted((found & current) - group, key=order.__getitem__)

    groups: list[Group] = []
    for _ in range(MAX_SWEEPS):
        changed = False
        for seed in sorted(current, key=lambda name: (cost[name][0] - cost[name][1], order[name])):
            if seed not in current:
                continue
            group = closed({seed})
            before, after = estimate(group)
            while len(group) < MAX_GROUP:
                best = None
                for name in neighbours(group):
                    b, a = estimate(closed(group | {name}))
                    if a - b < after - before and (best is None or a - b < best[2] - best[1]):
                        best = (name, b, a)
                if best is None:
                    break
                group = closed(group | {best[0]})
                before, after = best[1], best[2]
            if after < before - MARGIN_US:
                groups.append(Group(tuple(sorted(group, key=order.__getitem__)), before, after))
                current -= group
                changed = True
        if not changed:
            break
    if current:  # what is left pays by less than the table can tell: the whole model runs float
        before, after = estimate(current)
        model_float_us = sum(float_cost(name, set()) for name in nodes)
        if after - before < MIN_GAIN * model_float_us:
            groups.append(Group(tuple(sorted(current, key=order.__getitem__)), before, after, model_float_us))
    return groups
