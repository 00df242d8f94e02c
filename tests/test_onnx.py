"""ONNX import: operators against independent NumPy oracles, jit/vmap, tracking, errors.

Graphs are built with ``onnx.helper`` (no torch or onnxruntime needed); weights are
float32 tensors, as exported models hold them, and the oracles use the same values in
float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip(
    "onnx", reason="sijax.onnx needs the optional `onnx` extra (in `.[test]`)"
)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import sijax  # noqa: E402
import sijax.onnx as sonnx  # noqa: E402
from sijax.errors import InputError, NotPiecewiseLinearError  # noqa: E402

TOL = 1e-10


# ------------------------------------------------------------------ helpers


def _f32(rng, *shape, scale=1.0):
    """Random float32 values (what a file holds) as float64 for the oracles."""
    return (rng.normal(size=shape) * scale).astype(np.float32).astype(np.float64)


def _r32(x):
    """Rounds to the float32 value a file would store."""
    return np.asarray(x, np.float32).astype(np.float64)


def _model(nodes, inputs, outputs, inits=None, opset=13):
    """ModelProto from nodes, {name: shape} inputs, output names and initializers."""
    inits = inits or {}
    outs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, None) for k in outputs]
    for o in outs:  # the checker wants a shape field; the loader computes the shapes
        o.type.tensor_type.shape.SetInParent()
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, TensorProto.FLOAT, s) for k, s in inputs],
        outs,
        initializer=[
            numpy_helper.from_array(
                np.asarray(v, np.float32 if np.asarray(v).dtype.kind == "f" else None),
                k,
            )
            for k, v in inits.items()
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _np_conv2d(x, w, bias=None, pads=(0, 0, 0, 0), strides=(1, 1), dil=(1, 1), g=1):
    """Direct convolution (cross-correlation), one output pixel at a time."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho = (xp.shape[2] - dil[0] * (kh - 1) - 1) // strides[0] + 1
    wo = (xp.shape[3] - dil[1] * (kw - 1) - 1) // strides[1] + 1
    out = np.zeros((n, o, ho, wo))
    og = o // g
    for i in range(ho):
        for j in range(wo):
            r, s = i * strides[0], j * strides[1]
            patch = xp[:, :, r : r + dil[0] * (kh - 1) + 1 : dil[0],
                       s : s + dil[1] * (kw - 1) + 1 : dil[1]]  # fmt: skip
            for gi in range(g):
                pg = patch[:, gi * cg : (gi + 1) * cg]
                wg = w[gi * og : (gi + 1) * og]
                out[:, gi * og : (gi + 1) * og, i, j] = np.einsum(
                    "nckl,ockl->no", pg, wg
                )
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def _np_bn(x, scale, bias, mean, var, eps):
    sh = (1, -1, 1, 1)
    return (x - mean.reshape(sh)) / np.sqrt(var.reshape(sh) + eps) * scale.reshape(
        sh
    ) + bias.reshape(sh)


def _np_avgpool(x, k, s, pad=0, include_pad=False):
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    valid = np.pad(np.ones((h, w)), pad)
    ho, wo = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    out = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            win = xp[:, :, i * s : i * s + k, j * s : j * s + k]
            cnt = (
                k * k
                if include_pad
                else valid[i * s : i * s + k, j * s : j * s + k].sum()
            )
            out[:, :, i, j] = win.sum(axis=(2, 3)) / cnt
    return out


def _np_bilinear(x, out_h, out_w, align_corners):
    """PyTorch's bilinear interpolation formula, pixel by pixel."""
    n, c, h, w = x.shape
    out = np.zeros((n, c, out_h, out_w))

    def src(i, out_n, in_n):
        if align_corners:
            return i * (in_n - 1) / (out_n - 1) if out_n > 1 else 0.0
        return max((i + 0.5) * in_n / out_n - 0.5, 0.0)

    for i in range(out_h):
        y = src(i, out_h, h)
        y0 = int(np.floor(y))
        y1, ly = min(y0 + 1, h - 1), y - y0
        for j in range(out_w):
            xx = src(j, out_w, w)
            x0 = int(np.floor(xx))
            x1, lx = min(x0 + 1, w - 1), xx - x0
            out[:, :, i, j] = (1 - ly) * (
                (1 - lx) * x[:, :, y0, x0] + lx * x[:, :, y0, x1]
            ) + ly * ((1 - lx) * x[:, :, y1, x0] + lx * x[:, :, y1, x1])
    return out


@jax.jit
def _call(fn, *xs):
    """One compiled call (op-by-op eager dispatch is much slower to run)."""
    return fn(*xs)


def _run(model, *xs, **kw):
    fn = sonnx.load(model, **kw)
    return fn, np.asarray(_call(fn, *[jnp.asarray(x) for x in xs]))


# ------------------------------------------------------------------ operators


@pytest.mark.parametrize(
    "pads,strides,dil,group",
    [
        ((1, 1, 1, 1), (1, 1), (1, 1), 1),
        ((0, 1, 2, 0), (2, 1), (1, 1), 1),
        ((2, 2, 2, 2), (1, 2), (2, 2), 1),
        ((1, 1, 1, 1), (1, 1), (1, 1), 2),
    ],
)
def test_conv_bn_relu(pads, strides, dil, group):
    rng = np.random.default_rng(0)
    c, o = 4, 6
    x = rng.normal(size=(2, c, 7, 6))
    w = _f32(rng, o, c // group, 3, 3, scale=0.5)
    inits = dict(
        w=w, cb=_f32(rng, o), s=_f32(rng, o), b=_f32(rng, o), m=_f32(rng, o),
        v=_r32(np.abs(_f32(rng, o)) + 0.5),
    )  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "w", "cb"], ["h"], name="conv",
                         pads=list(pads), strides=list(strides),
                         dilations=list(dil), group=group),
        helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["hb"],
                         epsilon=1e-5),
        helper.make_node("Relu", ["hb"], ["y"]),
    ]  # fmt: skip
    fn, y = _run(_model(nodes, [("x", x.shape)], ["y"], inits), x)
    eps = float(np.float32(1e-5))  # ONNX float attributes are float32
    ref = _np_conv2d(x, w, inits["cb"], pads, strides, dil, group)
    ref = np.maximum(
        _np_bn(ref, inits["s"], inits["b"], inits["m"], inits["v"], eps), 0
    )
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOL)
    assert fn.output_shapes == (ref.shape,)


@pytest.mark.parametrize("k,s,pad,include", [(2, 2, 0, 0), (3, 1, 1, 0), (3, 1, 1, 1)])
def test_average_pool(k, s, pad, include):
    x = np.random.default_rng(1).normal(size=(1, 3, 6, 6))
    node = helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[k, k],
                            strides=[s, s], pads=[pad] * 4,
                            count_include_pad=include)  # fmt: skip
    _, y = _run(_model([node], [("x", x.shape)], ["y"]), x)
    np.testing.assert_allclose(y, _np_avgpool(x, k, s, pad, include), atol=TOL)


def test_max_pool():
    x = np.random.default_rng(2).normal(size=(1, 2, 6, 6))
    node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[2, 2],
                            strides=[2, 2])  # fmt: skip
    _, y = _run(_model([node], [("x", x.shape)], ["y"]), x)
    np.testing.assert_array_equal(y, x.reshape(1, 2, 3, 2, 3, 2).max(axis=(3, 5)))


def test_max_pool_of_a_channels_last_convolution():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 2, 5, 5))
    w = _f32(rng, 3, 2, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"]),
        helper.make_node("MaxPool", ["h"], ["y"], kernel_shape=[3, 3], strides=[2, 2],
                         pads=[1, 1, 1, 1]),
    ]  # fmt: skip
    _, y = _run(_model(nodes, [("x", x.shape)], ["y"], {"w": w}), x)
    h = np.pad(
        _np_conv2d(x, w), ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf
    )
    win = np.lib.stride_tricks.sliding_window_view(h, (3, 3), axis=(2, 3))
    np.testing.assert_allclose(y, win[:, :, ::2, ::2].max(axis=(4, 5)), atol=TOL)


@pytest.mark.parametrize("ctm", ["half_pixel", "pytorch_half_pixel", "align_corners"])
@pytest.mark.parametrize("opset", [11, 13])
def test_resize_bilinear_x2(ctm, opset):
    x = np.random.default_rng(3).normal(size=(2, 3, 4, 5))
    inits = {"roi": np.zeros(0), "scales": np.array([1.0, 1.0, 2.0, 2.0])}
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="linear",
                            coordinate_transformation_mode=ctm)  # fmt: skip
    fn, y = _run(_model([node], [("x", x.shape)], ["y"], inits, opset=opset), x)
    ref = _np_bilinear(x, 8, 10, align_corners=ctm == "align_corners")
    np.testing.assert_allclose(y, ref, rtol=0, atol=TOL)
    # Scales and roi are static: they are no weights.
    assert fn.weights == {}


def test_resize_half_pixel_matches_the_native_unet_upsampling():
    from sijax.diffusion.unet import upsample_bilinear2x

    x = np.random.default_rng(4).normal(size=(1, 2, 4, 4))
    inits = {"roi": np.zeros(0), "scales": np.array([1.0, 1.0, 2.0, 2.0])}
    ctm = "pytorch_half_pixel"
    node = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="linear",
                            coordinate_transformation_mode=ctm)  # fmt: skip
    _, y = _run(_model([node], [("x", x.shape)], ["y"], inits), x)
    native = upsample_bilinear2x(jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(y, np.asarray(native).transpose(0, 3, 1, 2), atol=TOL)


@pytest.mark.parametrize(
    "ctm,nearest_mode", [("asymmetric", "floor"), ("half_pixel", "round_prefer_floor")]
)
def test_resize_nearest_with_sizes(ctm, nearest_mode):
    x = np.random.default_rng(5).normal(size=(1, 1, 3, 4))
    sizes = np.array([1, 1, 6, 8], np.int64)
    node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest",
                            coordinate_transformation_mode=ctm,
                            nearest_mode=nearest_mode)  # fmt: skip
    model = _model([node], [("x", x.shape)], ["y"], {"sizes": sizes})
    _, y = _run(model, x)
    # Factor 2: both modes pick source index floor(i / 2).
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3))


def test_concat_skip_add_sub_mul_div():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(1, 2, 3, 3))
    w = _f32(rng, 3, 2, 1, 1)
    k = _f32(rng, 1, 5, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"]),
        helper.make_node("Concat", ["h", "x"], ["c"], axis=1),
        helper.make_node("Mul", ["c", "k"], ["m"]),
        helper.make_node("Sub", ["m", "x0"], ["d"]),
        helper.make_node("Div", ["d", "two"], ["e"]),
        helper.make_node("Add", ["e", "c"], ["y"]),
    ]
    inits = {"w": w, "k": k, "x0": np.float32(0.5), "two": np.full(3, 2.0)}
    _, y = _run(_model(nodes, [("x", x.shape)], ["y"], inits), x)
    c = np.concatenate([np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x), x], axis=1)
    np.testing.assert_allclose(y, (c * k - 0.5) / 2.0 + c, atol=TOL)


def test_convolution_chains_stay_channels_last():
    """conv-relu-conv-add-concat: transposes only at the graph's input and output."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(1, 2, 5, 5))
    w1, w2 = _f32(rng, 3, 2, 3, 3), _f32(rng, 3, 3, 1, 1)
    t = _f32(rng, 1, 3, 1, 1)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["g"]),
        helper.make_node("Add", ["g", "t"], ["gt"]),
        helper.make_node("Sub", ["gt", "h"], ["d"]),
        helper.make_node("Concat", ["d", "r"], ["y"], axis=1),
    ]
    fn, y = _run(
        _model(nodes, [("x", x.shape)], ["y"], {"w1": w1, "w2": w2, "t": t}), x
    )
    h = _np_conv2d(x, w1, None, (1, 1, 1, 1))
    r = np.maximum(h, 0)
    d = _np_conv2d(r, w2) + t - h
    np.testing.assert_allclose(y, np.concatenate([d, r], axis=1), atol=TOL)
    eqns = jax.make_jaxpr(fn)(jnp.asarray(x)).eqns
    layout = [
        e.params["permutation"]
        for e in eqns
        if e.primitive.name == "transpose"
        and e.params["permutation"] in ((0, 2, 3, 1), (0, 3, 1, 2))
        and e.invars[0].aval.shape[-2:] != (1, 1)
    ]
    # The input and the output; the kernels and the (1, 3, 1, 1) constant aside.
    assert layout == [(0, 2, 3, 1), (0, 3, 1, 2)]


def test_gemm_and_matmul():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(3, 5))
    w, c, m = _f32(rng, 4, 5), _f32(rng, 4), _f32(rng, 4, 2)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["h"], transB=1, alpha=0.5,
                         beta=2.0),
        helper.make_node("MatMul", ["h", "m"], ["y"]),
    ]  # fmt: skip
    _, y = _run(_model(nodes, [("x", x.shape)], ["y"], {"w": w, "c": c, "m": m}), x)
    np.testing.assert_allclose(y, (0.5 * x @ w.T + 2.0 * c) @ m, atol=TOL)


@pytest.mark.parametrize("opset", [11, 13])
def test_reshape_transpose_unsqueeze_squeeze_flatten(opset):
    x = np.random.default_rng(8).normal(size=(2, 3, 4))
    inits = {"shape": np.array([0, 4, -1], np.int64)}
    if opset >= 13:
        inits["ax"] = np.array([1], np.int64)
        unsq = helper.make_node("Unsqueeze", ["t", "ax"], ["u"])
        sq = helper.make_node("Squeeze", ["u", "ax"], ["s"])
    else:
        unsq = helper.make_node("Unsqueeze", ["t"], ["u"], axes=[1])
        sq = helper.make_node("Squeeze", ["u"], ["s"], axes=[1])
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[2, 0, 1]),
        unsq,
        sq,
        helper.make_node("Flatten", ["u"], ["f"], axis=2),
        helper.make_node("Identity", ["s"], ["y"]),
    ]
    fn, (f, y) = _run_two(_model(nodes, [("x", x.shape)], ["f", "y"], inits,
                                 opset=opset), x)  # fmt: skip
    t = x.reshape(2, 4, 3).transpose(2, 0, 1)
    np.testing.assert_array_equal(y, t)
    np.testing.assert_array_equal(f, t.reshape(3, 8))
    assert fn.output_shapes == ((3, 8), (3, 2, 4))


def _run_two(model, x):
    fn = sonnx.load(model)
    outs = fn(jnp.asarray(x))
    assert isinstance(outs, tuple)
    return fn, tuple(np.asarray(o) for o in outs)


def test_shape_arithmetic_is_folded_to_constants():
    """torch's flatten pattern: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    x = np.random.default_rng(9).normal(size=(2, 3, 2, 2))
    inits = {
        "zero": np.array(0, np.int64),
        "minus1": np.array([-1], np.int64),
        "ax": np.array([0], np.int64),
    }
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "ax"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["new"], axis=0),
        helper.make_node("Reshape", ["x", "new"], ["r"]),
        helper.make_node("Neg", ["r"], ["y"]),
    ]
    _, y = _run(_model(nodes, [("x", x.shape)], ["y"], inits), x)
    np.testing.assert_array_equal(y, -x.reshape(2, 12))


def test_pad_slice_gather_abs_constant():
    x = np.random.default_rng(10).normal(size=(1, 2, 4, 5))
    inits = {
        "pads": np.array([0, 0, 1, 2, 0, 0, 0, 1], np.int64),
        "starts": np.array([1, -4], np.int64),
        "ends": np.array([100, -1], np.int64),
        "axes": np.array([2, 3], np.int64),
        "steps": np.array([2, 1], np.int64),
        "idx": np.array([1, 0, 1], np.int64),
    }
    nodes = [
        helper.make_node("Pad", ["x", "pads"], ["p"], mode="constant"),
        helper.make_node("Slice", ["p", "starts", "ends", "axes", "steps"], ["s"]),
        helper.make_node("Gather", ["s", "idx"], ["g"], axis=1),
        helper.make_node("Constant", [], ["c"],
                         value=numpy_helper.from_array(np.float32([1.5]), "c")),
        helper.make_node("Sub", ["g", "c"], ["d"]),
        helper.make_node("Abs", ["d"], ["y"]),
    ]  # fmt: skip
    _, y = _run(_model(nodes, [("x", x.shape)], ["y"], inits), x)
    p = np.pad(x, ((0, 0), (0, 0), (1, 0), (2, 1)))
    ref = np.abs(p[:, :, 1::2, -4:-1][:, [1, 0, 1]] - 1.5)
    np.testing.assert_allclose(y, ref, atol=TOL)


# ------------------------------------------------------------ a mini U-Net


def _mini_unet(rng, c=1, w1=4, w2=6):
    """ConvBlock-like U-Net: conv-bn-relu, avgpool, conv-bn-relu, resize, concat."""
    p = {
        "k1": _f32(rng, w1, c, 3, 3, scale=0.6), "b1": _f32(rng, w1),
        "s1": _f32(rng, w1), "o1": _f32(rng, w1), "m1": _f32(rng, w1),
        "v1": _r32(np.abs(_f32(rng, w1)) + 0.5),
        "k2": _f32(rng, w2, w1, 3, 3, scale=0.3), "b2": _f32(rng, w2),
        "k3": _f32(rng, w1, w2 + w1, 3, 3, scale=0.3), "b3": _f32(rng, w1),
        "k4": _f32(rng, c, w1, 1, 1), "b4": _f32(rng, c),
        "t": _f32(rng, 1, w1, 1, 1),
        "roi": np.zeros(0), "scales": np.array([1.0, 1.0, 2.0, 2.0]),
    }  # fmt: skip
    nodes = [
        helper.make_node("Add", ["x", "xb"], ["x1"]),
        helper.make_node("Conv", ["x1", "k1", "b1"], ["h1"], pads=[1, 1, 1, 1],
                         name="down1.conv"),
        helper.make_node("BatchNormalization", ["h1", "s1", "o1", "m1", "v1"], ["n1"]),
        helper.make_node("Relu", ["n1"], ["r1"], name="down1.relu"),
        helper.make_node("Add", ["r1", "t"], ["r1t"]),
        helper.make_node("AveragePool", ["r1t"], ["p1"], kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Conv", ["p1", "k2", "b2"], ["h2"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h2"], ["r2"]),
        helper.make_node("Resize", ["r2", "roi", "scales"], ["u2"], mode="linear",
                         coordinate_transformation_mode="pytorch_half_pixel"),
        helper.make_node("Concat", ["u2", "r1"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "k3", "b3"], ["h3"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h3"], ["r3"]),
        helper.make_node("Conv", ["r3", "k4", "b4"], ["y"]),
    ]  # fmt: skip
    p["xb"] = np.float32(0.25)

    def ref(x):
        x1 = x + 0.25
        h = _np_conv2d(x1, p["k1"], p["b1"], (1, 1, 1, 1))
        eps = float(np.float32(1e-5))
        r1 = np.maximum(_np_bn(h, p["s1"], p["o1"], p["m1"], p["v1"], eps), 0)
        p1 = _np_avgpool(r1 + p["t"], 2, 2)
        r2 = np.maximum(_np_conv2d(p1, p["k2"], p["b2"], (1, 1, 1, 1)), 0)
        u2 = _np_bilinear(r2, 2 * r2.shape[2], 2 * r2.shape[3], False)
        cat = np.concatenate([u2, r1], axis=1)
        r3 = np.maximum(_np_conv2d(cat, p["k3"], p["b3"], (1, 1, 1, 1)), 0)
        return _np_conv2d(r3, p["k4"], p["b4"])

    return nodes, p, ref


@pytest.fixture(scope="module")
def unet():
    rng = np.random.default_rng(11)
    nodes, inits, ref = _mini_unet(rng)
    model = _model(nodes, [("x", (1, 1, 8, 8))], ["y"], inits)
    return model, sonnx.load(model.SerializeToString()), ref


def test_mini_unet_matches_numpy(unet):
    model, fn, ref = unet
    x = np.random.default_rng(12).normal(size=(1, 1, 8, 8))
    np.testing.assert_allclose(np.asarray(_call(fn, x)), ref(x), rtol=0, atol=TOL)
    assert fn.input_names == ("x",) and fn.input_shapes == ((1, 1, 8, 8),)
    assert fn.output_names == ("y",) and fn.output_shapes == ((1, 1, 8, 8),)
    assert all(w.dtype == jnp.float64 for w in fn.weights.values())


def test_jit_vmap_and_one_trace_per_shape(unet, tmp_path):
    model, fn, ref = unet
    path = tmp_path / "unet.onnx"
    onnx.save(model, path)
    fn2 = sonnx.load(path)  # a second, equal load
    traces = []

    @jax.jit
    def apply(f, xs):
        traces.append(1)
        return jax.vmap(f)(xs)

    xs = np.random.default_rng(13).normal(size=(3, 1, 1, 8, 8))
    y1 = np.asarray(apply(fn, xs))
    y2 = np.asarray(apply(fn2, xs + 1.0))
    assert len(traces) == 1  # the graph is hashable static data, equal across loads
    for i in range(3):
        np.testing.assert_allclose(y1[i], ref(xs[i]), atol=TOL)
        np.testing.assert_allclose(y2[i], ref(xs[i] + 1.0), atol=TOL)
    leaves, treedef = jax.tree.flatten(fn)
    assert len(leaves) == len(fn.weights)
    back = jax.tree.unflatten(treedef, leaves)
    np.testing.assert_allclose(np.asarray(_call(back, xs[0])), y1[0], rtol=1e-13)


def test_track_gives_exact_affine_pieces(unet):
    _, fn, _ = unet
    rng = np.random.default_rng(14)
    a = jnp.asarray(rng.normal(size=(1, 1, 8, 8)))
    b = jnp.asarray(rng.normal(size=(1, 1, 8, 8)))

    def detect(x):
        y = fn(x)
        return y, jnp.abs(y - x) > 0.8

    f_jit = jax.jit(lambda t: detect(a + b * t))
    tracked = jax.jit(sijax.track(detect))
    for z in (-0.7, 0.0, 0.4):
        piece = tracked(a, b, z)
        lo, hi = float(piece.lo), float(piece.hi)
        assert lo <= z <= hi and lo < hi
        y_piece, mask_piece = piece.out
        for t in np.linspace(max(lo, z - 1), min(hi, z + 1), 5):
            y, mask = f_jit(t)
            aff = np.asarray(y_piece.alpha + y_piece.beta * t)
            np.testing.assert_allclose(aff, np.asarray(y), rtol=0, atol=1e-9)
            if lo < t < hi:
                np.testing.assert_array_equal(np.asarray(mask_piece), np.asarray(mask))
        # Just outside the piece some sign has changed (it is maximal).
        if np.isfinite(hi):
            t = hi + 1e-7 * max(1.0, abs(hi))
            y, _ = f_jit(t)
            aff = np.asarray(y_piece.alpha + y_piece.beta * t)
            assert not np.allclose(aff, np.asarray(y), rtol=0, atol=1e-13) or bool(
                np.any(np.asarray(f_jit(t)[1]) != np.asarray(mask_piece))
            )


def test_float32_option(unet):
    model, _, ref = unet
    with jax.enable_x64(False):
        fn = sonnx.load(model, dtype=jnp.float32)
        x = np.random.default_rng(15).normal(size=(1, 1, 8, 8)).astype(np.float32)
        y = _call(fn, x)
        assert y.dtype == jnp.float32
        assert all(w.dtype == jnp.float32 for w in fn.weights.values())
        np.testing.assert_allclose(np.asarray(y), ref(x.astype(np.float64)), atol=1e-4)
        with pytest.raises(InputError, match="x64"):
            sonnx.load(model)


# ------------------------------------------------------------------ errors


def test_non_piecewise_linear_operators_are_rejected_by_the_tracker():
    x = np.random.default_rng(16).normal(size=(1, 4))
    for op, prim in (("Sigmoid", "logistic"), ("Tanh", "tanh"), ("Exp", "exp")):
        fn = sonnx.load(_model([helper.make_node(op, ["x"], ["y"])], [("x", (1, 4))],
                               ["y"]))  # fmt: skip
        ref = {"Sigmoid": lambda v: 1 / (1 + np.exp(-v)), "Tanh": np.tanh,
               "Exp": np.exp}[op](x)  # fmt: skip
        np.testing.assert_allclose(np.asarray(fn(x)), ref, rtol=1e-12)
        with pytest.raises(NotPiecewiseLinearError, match=prim):
            sijax.track(fn)(jnp.asarray(x), jnp.ones((1, 4)), 0.0)


@pytest.mark.parametrize("op", ["Hardmax", "MadeUpOp"])
def test_unsupported_operator_names_op_and_node(op):
    nodes = [
        helper.make_node("Relu", ["x"], ["h"], name="ok"),
        helper.make_node(op, ["h"], ["y"], name="the_bad_node"),
    ]
    model = _model(nodes, [("x", (1, 4))], ["y"])
    with pytest.raises(sonnx.UnsupportedOperatorError, match="the_bad_node") as e:
        sonnx.load(model)
    assert e.value.op_type == op and e.value.node_name == "the_bad_node"
    assert op in str(e.value)
    assert isinstance(e.value, sijax.SijaxError)


def test_custom_domain_and_unsupported_options():
    node = helper.make_node("Relu", ["x"], ["y"], name="n", domain="com.example")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 4))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (1, 4))],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", 13),
            helper.make_opsetid("com.example", 1),
        ],
    )
    with pytest.raises(sonnx.UnsupportedOperatorError, match="domain"):
        sonnx.load(model)
    cubic = helper.make_node("Resize", ["x", "roi", "scales"], ["y"], mode="cubic",
                             name="up")  # fmt: skip
    inits = {"roi": np.zeros(0), "scales": np.array([1.0, 1.0, 2.0, 2.0])}
    fn = sonnx.load(_model([cubic], [("x", (1, 1, 2, 2))], ["y"], inits))
    with pytest.raises(sonnx.UnsupportedOperatorError, match="cubic"):
        fn(np.zeros((1, 1, 2, 2)))


def test_bad_files_and_inputs(tmp_path, unet):
    model, fn, _ = unet
    with pytest.raises(InputError, match="not found"):
        sonnx.load(tmp_path / "missing.onnx")
    blob = model.SerializeToString()
    for bad in (b"\x00\x01garbage\xff" * 10, blob[: len(blob) // 2], b""):
        with pytest.raises(InputError):
            sonnx.load(bad)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(blob[:100])
    with pytest.raises(InputError):
        sonnx.load(corrupt)
    with pytest.raises(InputError, match="shape"):
        fn(np.zeros((1, 1, 4, 4)))
    with pytest.raises(InputError, match="1 inputs"):
        fn(np.zeros((1, 1, 8, 8)), np.zeros((1, 1, 8, 8)))
