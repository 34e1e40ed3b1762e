"""Build qtool's sample model: a CNN digit classifier in ONNX.

What it does
------------
1. Loads scikit-learn's bundled 8x8 handwritten digits (``load_digits``; no
   download), scales pixels from 0..16 to [0, 1] (divide by 16) and upscales
   every image to 16x16 with *bilinear* interpolation (half-pixel centres,
   edge clamped, i.e. the same as ``align_corners=False`` resizing).
2. Splits it (stratified, fixed seed) into 1497 training images and 300
   held-out evaluation images that are never used for training.
3. Trains, in plain numpy (float64, hand-written backprop, Adam, fixed seeds),
   this network::

       Conv(1->32, 3x3, pad 1) -> BatchNormalization -> Relu -> MaxPool 2x2
       Conv(32->64, 3x3, pad 1) -> BatchNormalization -> Relu -> MaxPool 2x2
       Conv(64->192, 3x3, pad 1) -> Relu -> GlobalAveragePool -> Flatten
       Gemm(192->192) -> Relu -> Gemm(192->10)

   (about 169k trainable parameters, so that the weights -- not the fixed
   overhead of Q/DQ nodes, names, scales and zero points -- dominate the file
   size, both float and quantized: an int8 QDQ copy is about 3.7x smaller).

4. Exports it with ``onnx.helper`` (float32, opset 13, IR version 8) to
   ``sample_models/digits_cnn/model.onnx``: input ``image`` [N, 1, 16, 16],
   output ``logits`` [N, 10], with the BatchNormalization nodes left unfused
   (qtool's prepare stage is expected to fold them).
5. Writes 128 calibration samples drawn from the training split to
   ``digits_cnn/calib/0000.npy`` ... and the 300 evaluation samples to
   ``digits_cnn/eval/0000.npy`` ... plus ``digits_cnn/eval/labels.txt``
   (``0000.npy 7`` per line); each .npy is float32 of shape (1, 1, 16, 16).
6. Checks the model with ``onnx.checker.check_model(full_check=True)``,
   measures float top-1 accuracy on the eval set with
   ``onnxruntime.InferenceSession``, fails if it is below 97%, prints it and
   writes it into ``sample_models/README.md``.

Requirements
------------
Python 3, numpy, onnx, onnxruntime and scikit-learn
(``pip install numpy onnx onnxruntime scikit-learn``). No PyTorch needed.

How to run
----------
From the repository root::

    python sample_models/make_digits_cnn.py

It takes one to two minutes on one CPU core. All randomness comes from fixed
seeds and BLAS is pinned to one thread, so running it again regenerates the
same files, bit-identical with the same numpy/BLAS build and CPU family
(another BLAS build or CPU may round the last bits of the weights
differently; accuracy is unaffected).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

# Pin BLAS to one thread *before* numpy loads: multi-threaded BLAS may sum in a
# different order depending on the thread count, which would change the
# trained weights in the last bits from one machine setup to another.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import numpy as np  # noqa: E402

SEED = 0
N_EVAL = 300
N_CALIB = 128
EPOCHS = 40
BATCH = 32
LR = 3e-3
WEIGHT_DECAY = 1e-4
BN_EPS = 1e-5
BN_MOMENTUM = 0.1
MIN_ACCURACY = 0.97

# layer widths: conv1/conv2/conv3 output channels, fc1 hidden units
C1, C2, C3, HIDDEN = 32, 64, 192, 192
N_CLASSES = 10

HERE = Path(__file__).resolve().parent
OUT_DIR = HERE / "digits_cnn"
README = HERE / "README.md"


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------
def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix doing 1-D linear resizing, half-pixel centres."""
    m = np.zeros((n_out, n_in), dtype=np.float64)
    scale = n_in / n_out
    for o in range(n_out):
        src = (o + 0.5) * scale - 0.5
        src = min(max(src, 0.0), n_in - 1.0)
        i0 = int(np.floor(src))
        i1 = min(i0 + 1, n_in - 1)
        w1 = src - i0
        m[o, i0] += 1.0 - w1
        m[o, i1] += w1
    return m


def load_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x8 = digits.images.astype(np.float64) / 16.0  # (1797, 8, 8) in [0, 1]
    y = digits.target.astype(np.int64)
    a = _bilinear_matrix(8, 16)
    x16 = np.einsum("oi,nij,pj->nop", a, x8, a)  # bilinear 8x8 -> 16x16
    x16 = x16[:, None, :, :].astype(np.float32)  # (N, 1, 16, 16)
    idx = np.arange(len(y))
    train_idx, eval_idx = train_test_split(
        idx, test_size=N_EVAL, stratify=y, random_state=SEED
    )
    return x16[train_idx], y[train_idx], x16[eval_idx], y[eval_idx]


# --------------------------------------------------------------------------
# numpy layers (forward returns a cache, backward takes it)
# --------------------------------------------------------------------------
def conv_forward(x, w, b):
    """3x3 conv, stride 1, pad 1. x (B,C,H,W), w (O,C,3,3), b (O,)."""
    bsz, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))
    cols = patches.transpose(0, 2, 3, 1, 4, 5).reshape(bsz * h * wd, c * 9)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    out = out.reshape(bsz, h, wd, -1).transpose(0, 3, 1, 2)
    return out, (x.shape, cols, w)


def conv_backward(dout, cache):
    (bsz, c, h, wd), cols, w = cache
    o = w.shape[0]
    d2 = dout.transpose(0, 2, 3, 1).reshape(-1, o)
    dw = (d2.T @ cols).reshape(w.shape)
    db = d2.sum(axis=0)
    dcols = (d2 @ w.reshape(o, -1)).reshape(bsz, h, wd, c, 3, 3)
    dxp = np.zeros((bsz, c, h + 2, wd + 2), dtype=dout.dtype)
    for ki in range(3):
        for kj in range(3):
            dxp[:, :, ki:ki + h, kj:kj + wd] += dcols[:, :, :, :, ki, kj].transpose(0, 3, 1, 2)
    return dxp[:, :, 1:-1, 1:-1], dw, db


def bn_forward_train(x, gamma, beta, state):
    mu = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    inv = 1.0 / np.sqrt(var + BN_EPS)
    xhat = (x - mu[None, :, None, None]) * inv[None, :, None, None]
    out = gamma[None, :, None, None] * xhat + beta[None, :, None, None]
    n = x.shape[0] * x.shape[2] * x.shape[3]
    state["mean"] = (1 - BN_MOMENTUM) * state["mean"] + BN_MOMENTUM * mu
    state["var"] = (1 - BN_MOMENTUM) * state["var"] + BN_MOMENTUM * var * n / (n - 1)
    return out, (xhat, inv, gamma)


def bn_forward_eval(x, gamma, beta, state):
    inv = 1.0 / np.sqrt(state["var"] + BN_EPS)
    return (gamma * inv)[None, :, None, None] * (x - state["mean"][None, :, None, None]) + beta[
        None, :, None, None
    ]


def bn_backward(dout, cache):
    xhat, inv, gamma = cache
    n = dout.shape[0] * dout.shape[2] * dout.shape[3]
    dgamma = (dout * xhat).sum(axis=(0, 2, 3))
    dbeta = dout.sum(axis=(0, 2, 3))
    dxhat = dout * gamma[None, :, None, None]
    dx = (inv[None, :, None, None] / n) * (
        n * dxhat
        - dxhat.sum(axis=(0, 2, 3))[None, :, None, None]
        - xhat * (dxhat * xhat).sum(axis=(0, 2, 3))[None, :, None, None]
    )
    return dx, dgamma, dbeta


def pool_forward(x):
    b, c, h, w = x.shape
    xr = x.reshape(b, c, h // 2, 2, w // 2, 2)
    out = xr.max(axis=(3, 5))
    return out, (xr, out)


def pool_backward(dout, cache):
    xr, out = cache
    mask = xr == out[:, :, :, None, :, None]
    # Split the gradient evenly between tied maxima (ties only happen between
    # zeros after Relu, whose gradient Relu then blocks anyway).
    mask = mask / mask.sum(axis=(3, 5), keepdims=True)
    dx = mask * dout[:, :, :, None, :, None]
    b, c, h2, _, w2, _ = xr.shape
    return dx.reshape(b, c, h2 * 2, w2 * 2)


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------
def init_params(rng):
    def he(shape):
        fan_in = int(np.prod(shape[1:]))
        return rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)

    def bias(n, fan_in):
        # PyTorch-style uniform(+-1/sqrt(fan_in)) init. Before a
        # BatchNormalization the bias gets no gradient, so conv1/conv2 keep
        # these non-zero values (as in a typical torch export); BN folding must
        # therefore handle the conv bias correctly.
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, size=n)

    p = {
        "conv1.weight": he((C1, 1, 3, 3)),
        "conv1.bias": bias(C1, 1 * 9),
        "bn1.weight": np.ones(C1),
        "bn1.bias": np.zeros(C1),
        "conv2.weight": he((C2, C1, 3, 3)),
        "conv2.bias": bias(C2, C1 * 9),
        "bn2.weight": np.ones(C2),
        "bn2.bias": np.zeros(C2),
        "conv3.weight": he((C3, C2, 3, 3)),
        "conv3.bias": bias(C3, C2 * 9),
        "fc1.weight": he((HIDDEN, C3)),
        "fc1.bias": np.zeros(HIDDEN),
        "fc2.weight": rng.normal(0.0, np.sqrt(1.0 / HIDDEN), size=(N_CLASSES, HIDDEN)),
        "fc2.bias": np.zeros(N_CLASSES),
    }
    bn_state = {
        "bn1": {"mean": np.zeros(C1), "var": np.ones(C1)},
        "bn2": {"mean": np.zeros(C2), "var": np.ones(C2)},
    }
    return p, bn_state


def forward(p, bn_state, x, train):
    caches = {}
    h, caches["conv1"] = conv_forward(x, p["conv1.weight"], p["conv1.bias"])
    if train:
        h, caches["bn1"] = bn_forward_train(h, p["bn1.weight"], p["bn1.bias"], bn_state["bn1"])
    else:
        h = bn_forward_eval(h, p["bn1.weight"], p["bn1.bias"], bn_state["bn1"])
    caches["relu1"] = h > 0
    h = h * caches["relu1"]
    h, caches["pool1"] = pool_forward(h)

    h, caches["conv2"] = conv_forward(h, p["conv2.weight"], p["conv2.bias"])
    if train:
        h, caches["bn2"] = bn_forward_train(h, p["bn2.weight"], p["bn2.bias"], bn_state["bn2"])
    else:
        h = bn_forward_eval(h, p["bn2.weight"], p["bn2.bias"], bn_state["bn2"])
    caches["relu2"] = h > 0
    h = h * caches["relu2"]
    h, caches["pool2"] = pool_forward(h)

    h, caches["conv3"] = conv_forward(h, p["conv3.weight"], p["conv3.bias"])
    caches["relu3"] = h > 0
    h = h * caches["relu3"]
    caches["gap_hw"] = h.shape[2:]
    feat = h.mean(axis=(2, 3))  # GlobalAveragePool + Flatten
    caches["feat"] = feat
    h = feat @ p["fc1.weight"].T + p["fc1.bias"]
    caches["relu4"] = h > 0
    h = h * caches["relu4"]
    caches["hid"] = h
    logits = h @ p["fc2.weight"].T + p["fc2.bias"]
    return logits, caches


def backward(p, caches, dlogits):
    g = {}
    g["fc2.weight"] = dlogits.T @ caches["hid"]
    g["fc2.bias"] = dlogits.sum(axis=0)
    dhid = (dlogits @ p["fc2.weight"]) * caches["relu4"]
    g["fc1.weight"] = dhid.T @ caches["feat"]
    g["fc1.bias"] = dhid.sum(axis=0)
    dfeat = dhid @ p["fc1.weight"]
    hh, ww = caches["gap_hw"]
    dh = np.broadcast_to(dfeat[:, :, None, None] / (hh * ww), dfeat.shape + (hh, ww))
    dh = dh * caches["relu3"]
    dh, g["conv3.weight"], g["conv3.bias"] = conv_backward(dh, caches["conv3"])

    dh = pool_backward(dh, caches["pool2"])
    dh = dh * caches["relu2"]
    dh, g["bn2.weight"], g["bn2.bias"] = bn_backward(dh, caches["bn2"])
    dh, g["conv2.weight"], g["conv2.bias"] = conv_backward(dh, caches["conv2"])

    dh = pool_backward(dh, caches["pool1"])
    dh = dh * caches["relu1"]
    dh, g["bn1.weight"], g["bn1.bias"] = bn_backward(dh, caches["bn1"])
    _, g["conv1.weight"], g["conv1.bias"] = conv_backward(dh, caches["conv1"])
    return g


def softmax_xent(logits, y):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    prob = e / e.sum(axis=1, keepdims=True)
    loss = -np.log(prob[np.arange(len(y)), y] + 1e-12).mean()
    d = prob.copy()
    d[np.arange(len(y)), y] -= 1.0
    return loss, d / len(y)


def random_shift(x, rng):
    """Augmentation: shift each image by -1..1 pixels in x and y (zero fill)."""
    out = np.zeros_like(x)
    shifts = rng.integers(-1, 2, size=(len(x), 2))
    h, w = x.shape[2:]
    for i, (dy, dx) in enumerate(shifts):
        ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
        xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
        out[i, :, yd, xd] = x[i, :, ys, xs]
    return out


def train(x_train, y_train):
    rng = np.random.default_rng(SEED)
    p, bn_state = init_params(rng)
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(val) for k, val in p.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    x_train = x_train.astype(np.float64)
    n = len(x_train)
    steps_per_epoch = (n + BATCH - 1) // BATCH
    total = EPOCHS * steps_per_epoch
    t = 0
    for epoch in range(EPOCHS):
        order = rng.permutation(n)
        tot_loss, correct = 0.0, 0
        for s in range(steps_per_epoch):
            bi = order[s * BATCH:(s + 1) * BATCH]
            xb = random_shift(x_train[bi], rng)
            yb = y_train[bi]
            logits, caches = forward(p, bn_state, xb, train=True)
            loss, dlogits = softmax_xent(logits, yb)
            tot_loss += loss * len(bi)
            correct += int((logits.argmax(axis=1) == yb).sum())
            grads = backward(p, caches, dlogits)
            t += 1
            lr = LR * 0.5 * (1.0 + np.cos(np.pi * (t - 1) / total))  # cosine decay
            for k in p:
                gk = grads[k]
                if k.endswith("weight") and not k.startswith("bn"):
                    gk = gk + WEIGHT_DECAY * p[k]
                m[k] = b1 * m[k] + (1 - b1) * gk
                v[k] = b2 * v[k] + (1 - b2) * gk * gk
                mhat = m[k] / (1 - b1 ** t)
                vhat = v[k] / (1 - b2 ** t)
                p[k] = p[k] - lr * mhat / (np.sqrt(vhat) + eps)
        if epoch % 5 == 4 or epoch == EPOCHS - 1:
            print(
                f"epoch {epoch + 1:3d}/{EPOCHS}: loss {tot_loss / n:.4f} "
                f"train acc (augmented, batch-stat BN) {correct / n:.4f}"
            )
    return p, bn_state


# --------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------
def export_onnx(p, bn_state, path: Path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = []

    def init(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    nodes = []

    def conv(i, x):
        return helper.make_node(
            "Conv",
            [x, init(f"conv{i}.weight", p[f"conv{i}.weight"]), init(f"conv{i}.bias", p[f"conv{i}.bias"])],
            [f"/conv{i}/Conv_output_0"],
            name=f"/conv{i}/Conv",
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
            dilations=[1, 1],
            group=1,
        )

    def bn(i, x):
        return helper.make_node(
            "BatchNormalization",
            [
                x,
                init(f"bn{i}.weight", p[f"bn{i}.weight"]),
                init(f"bn{i}.bias", p[f"bn{i}.bias"]),
                init(f"bn{i}.running_mean", bn_state[f"bn{i}"]["mean"]),
                init(f"bn{i}.running_var", bn_state[f"bn{i}"]["var"]),
            ],
            [f"/bn{i}/BatchNormalization_output_0"],
            name=f"/bn{i}/BatchNormalization",
            epsilon=BN_EPS,
            momentum=1.0 - BN_MOMENTUM,
        )

    def relu(i, x):
        return helper.make_node("Relu", [x], [f"/relu{i}/Relu_output_0"], name=f"/relu{i}/Relu")

    def pool(i, x):
        return helper.make_node(
            "MaxPool",
            [x],
            [f"/pool{i}/MaxPool_output_0"],
            name=f"/pool{i}/MaxPool",
            kernel_shape=[2, 2],
            strides=[2, 2],
        )

    x = "image"
    for i in (1, 2):
        for make in (conv, bn, relu, pool):
            node = make(i, x)
            nodes.append(node)
            x = node.output[0]
    for make in (conv, relu):
        node = make(3, x)
        nodes.append(node)
        x = node.output[0]
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["/gap/GlobalAveragePool_output_0"],
                                  name="/gap/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["/gap/GlobalAveragePool_output_0"], ["/flatten/Flatten_output_0"],
                                  name="/flatten/Flatten", axis=1))
    def gemm(name, x, y):
        return helper.make_node(
            "Gemm",
            [x, init(f"{name}.weight", p[f"{name}.weight"]), init(f"{name}.bias", p[f"{name}.bias"])],
            [y],
            name=f"/{name}/Gemm",
            alpha=1.0,
            beta=1.0,
            transB=1,
        )

    nodes.append(gemm("fc1", "/flatten/Flatten_output_0", "/fc1/Gemm_output_0"))
    nodes.append(relu(4, "/fc1/Gemm_output_0"))
    nodes.append(gemm("fc2", "/relu4/Relu_output_0", "logits"))

    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", N_CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13)],
        producer_name="qtool-sample-models",
        producer_version="1",
        doc_string="CNN digit classifier (sklearn digits 8x8 upscaled bilinearly to 16x16, "
                   "pixels in [0, 1]); made by sample_models/make_digits_cnn.py",
    )
    model.ir_version = 8
    helper.set_model_props(
        model,
        {
            "source": "qtool sample_models/make_digits_cnn.py",
            "dataset": "sklearn digits 8x8 upscaled to 16x16",
        },
    )
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return model


# --------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------
def write_samples(folder: Path, images: np.ndarray) -> list[str]:
    folder.mkdir(parents=True)
    names = []
    for i, img in enumerate(images):
        name = f"{i:04d}.npy"
        np.save(folder / name, np.ascontiguousarray(img[None].astype(np.float32)))
        names.append(name)
    return names


def ort_accuracy(model_path: Path, eval_dir: Path) -> tuple[float, int]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    correct = total = 0
    for line in (eval_dir / "labels.txt").read_text().splitlines():
        name, label = line.split()
        x = np.load(eval_dir / name)
        (logits,) = sess.run(["logits"], {"image": x})
        correct += int(int(logits.argmax(axis=1)[0]) == int(label))
        total += 1
    # the dynamic batch dimension must work too
    xs = np.concatenate([np.load(eval_dir / f"{i:04d}.npy") for i in range(8)])
    (logits,) = sess.run(["logits"], {"image": xs})
    assert logits.shape == (8, N_CLASSES), logits.shape
    return correct / total, total


def write_readme(acc: float, n_eval: int, n_correct: int, model_bytes: int, n_params: int):
    README.write_text(
        f"""# Sample models

## digits_cnn

A CNN digit classifier ({n_params} trainable parameters, about {n_params / 1000:.0f}k), used as
qtool's example and test model. It is wide enough that the weights dominate
the file size (rather than the fixed per-tensor overhead of names, scales and
zero points that quantization adds), so int8 quantization shrinks the file by
close to 4x. It is trained on scikit-learn's bundled 8x8 handwritten digits
(`sklearn.datasets.load_digits`), whose pixels (0..16) are divided by 16 to lie
in [0, 1] and upscaled to 16x16 with bilinear interpolation (half-pixel
centres, `align_corners=False` style).

- `model.onnx`: float32, opset 13, IR version 8, {model_bytes} bytes.
  Input `image` `[N, 1, 16, 16]` (`N` is a dynamic batch dim), output
  `logits` `[N, 10]`.
- Architecture: Conv(1->{C1}, 3x3, pad 1) -> BatchNormalization -> Relu ->
  MaxPool 2x2 -> Conv({C1}->{C2}, 3x3, pad 1) -> BatchNormalization -> Relu ->
  MaxPool 2x2 -> Conv({C2}->{C3}, 3x3, pad 1) -> Relu -> GlobalAveragePool ->
  Flatten -> Gemm({C3}->{HIDDEN}, `/fc1/Gemm`) -> Relu (`/relu4/Relu`) ->
  Gemm({HIDDEN}->{N_CLASSES}, `/fc2/Gemm`). The BatchNormalization nodes are
  deliberately left unfused (qtool's prepare stage folds them).
- **Float top-1 accuracy on the {n_eval} eval samples (onnxruntime): {acc * 100:.2f}%**
  ({n_correct}/{n_eval}).

### Layout

```
sample_models/
  make_digits_cnn.py        script that makes everything below
  digits_cnn/
    model.onnx
    calib/0000.npy ... {N_CALIB - 1:04d}.npy   {N_CALIB} calibration samples from the training split
    eval/0000.npy ... {n_eval - 1:04d}.npy    {n_eval} held-out evaluation samples (never trained on)
    eval/labels.txt                "0000.npy 7": file name, space, integer label
```

Every `.npy` is a float32 array of shape `(1, 1, 16, 16)`.

### Regenerating

```
pip install numpy onnx onnxruntime scikit-learn
python sample_models/make_digits_cnn.py
```

The script trains in plain numpy with fixed seeds (no PyTorch), checks the
model with `onnx.checker.check_model(full_check=True)`, measures the accuracy
above with onnxruntime (failing below {MIN_ACCURACY * 100:.0f}%) and rewrites this README.
"""
    )


def main() -> int:
    np.random.seed(SEED)
    x_train, y_train, x_eval, y_eval = load_data()
    print(f"train {len(x_train)} images, eval {len(x_eval)} images, 16x16")

    params, bn_state = train(x_train, y_train)
    logits, _ = forward(params, bn_state, x_eval.astype(np.float64), train=False)
    print(f"numpy float64 eval accuracy: {(logits.argmax(axis=1) == y_eval).mean():.4f}")

    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    OUT_DIR.mkdir(parents=True)
    model_path = OUT_DIR / "model.onnx"
    export_onnx(params, bn_state, model_path)

    calib_rng = np.random.default_rng(SEED + 1)
    calib_idx = calib_rng.choice(len(x_train), size=N_CALIB, replace=False)
    write_samples(OUT_DIR / "calib", x_train[calib_idx])
    names = write_samples(OUT_DIR / "eval", x_eval)
    (OUT_DIR / "eval" / "labels.txt").write_text(
        "".join(f"{n} {int(lab)}\n" for n, lab in zip(names, y_eval))
    )

    acc, total = ort_accuracy(model_path, OUT_DIR / "eval")
    n_correct = round(acc * total)
    print(f"onnxruntime float top-1 accuracy on {total} eval samples: {acc * 100:.2f}% ({n_correct}/{total})")
    n_params = sum(int(v.size) for v in params.values())
    print(f"{n_params} trainable parameters, model.onnx {os.path.getsize(model_path)} bytes")
    write_readme(acc, total, n_correct, os.path.getsize(model_path), n_params)
    if acc < MIN_ACCURACY:
        print(f"ERROR: accuracy below {MIN_ACCURACY * 100:.0f}%", file=sys.stderr)
        return 1
    print(f"wrote {OUT_DIR} and {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
