"""ONNX import, operator coverage: each operator against ``onnx.reference``.

The oracle is ``onnx.reference.ReferenceEvaluator`` (the ONNX specification in NumPy)
run on float64 graphs; where it is known to be wrong (ConvTranspose with groups that
are not depthwise), a direct NumPy scatter is the oracle. Piecewise-linear graphs are
also tracked along a line: every piece is checked to be an exact affine form of the
function inside it, and maximal (the function leaves the form just past its end).
Graphs are built with ``onnx.helper``; shapes are small so that the file runs fast.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

onnx = pytest.importorskip(
    "onnx", reason="sijax.onnx needs the optional `onnx` extra (in `.[test]`)"
)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import sijax  # noqa: E402
import sijax.onnx as sonnx  # noqa: E402
from sijax.errors import InputError, NotPiecewiseLinearError  # noqa: E402

TOL = 1e-12
DOUBLE = TensorProto.DOUBLE


# ------------------------------------------------------------------ helpers


def _model(nodes, inputs, outputs, inits=None, opset=17):
    """float64 ModelProto: nodes, [(name, shape)] inputs, output names, initializers
    (float arrays stored as float64, integer arrays as they are)."""
    outs = [helper.make_tensor_value_info(k, DOUBLE, None) for k in outputs]
    for o in outs:  # the checker wants a shape field; the loader computes the shapes
        o.type.tensor_type.shape.SetInParent()
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(k, DOUBLE, s) for k, s in inputs],
        outs,
        initializer=[
            numpy_helper.from_array(
                np.asarray(v, np.float64 if np.asarray(v).dtype.kind == "f" else None),
                k,
            )
            for k, v in (inits or {}).items()
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _reference(model, *xs):
    """The outputs of ``onnx.reference`` (inputs in graph order)."""
    names = [v.name for v in model.graph.input]
    return ReferenceEvaluator(model).run(None, dict(zip(names, xs, strict=True)))


@jax.jit
def _call(fn, *xs):
    return fn(*xs)


def _check_against_reference(model, *xs, atol=TOL):
    """Loads ``model``, runs it under jit and compares every output to the oracle."""
    fn = sonnx.load(model)
    outs = _call(fn, *[jnp.asarray(x) for x in xs])
    outs = outs if isinstance(outs, tuple) else (outs,)
    refs = _reference(model, *xs)
    assert len(outs) == len(refs)
    for y, ref in zip(outs, refs, strict=True):
        assert y.shape == ref.shape
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-13, atol=atol)
    assert fn.output_shapes == tuple(r.shape for r in refs)
    return fn


def _assert_tracked_exactly(f, shape, seed=0, zs=(-0.6, 0.0, 0.5), threshold=0.5):
    """Tracks ``f`` (one array -> array or tuple of arrays) along a random line.

    The piece at each z contains z; inside it the tracked affine forms equal ``f``
    and the threshold mask ``y > threshold`` of the first output is constant; the
    piece just past its end starts where it ends (no gap). (A piece ends where an
    activation switches, which an output need not show: a LeakyReLU input that no
    MaxPool window selects.)
    """
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=shape))
    b = jnp.asarray(rng.normal(size=shape))

    def detect(x):
        ys = f(x)
        ys = ys if isinstance(ys, tuple) else (ys,)
        return ys, ys[0] > threshold

    f_line = jax.jit(lambda t: detect(a + b * t))
    tracked = jax.jit(sijax.track(detect))
    for z in zs:
        piece = tracked(a, b, z)
        lo, hi = float(piece.lo), float(piece.hi)
        assert lo <= z <= hi and lo < hi
        for t in np.linspace(max(lo, z - 1), min(hi, z + 1), 5):
            ys, mask = f_line(t)
            for form, y in zip(piece.out[0], ys, strict=True):
                np.testing.assert_allclose(
                    np.asarray(form.alpha + form.beta * t), y, rtol=0, atol=1e-9
                )
            if lo < t < hi:
                np.testing.assert_array_equal(np.asarray(piece.out[1]), mask)
        if np.isfinite(hi):
            step = 1e-9 * max(1.0, abs(hi))
            after = tracked(a, b, hi + step)
            assert abs(float(after.lo) - hi) <= step and float(after.hi) > hi


def _np_conv_transpose(x, w, b, strides, pads, dil, out_pad, group):
    """ConvTranspose as its definition: every input pixel scatters its kernel."""
    n, c, *size = x.shape
    _, mg, *k = w.shape
    nd, cg = len(size), c // group
    full = [
        s * (i - 1) + d * (kk - 1) + 1 + op
        for i, s, d, kk, op in zip(size, strides, dil, k, out_pad, strict=True)
    ]
    out = np.zeros((n, mg * group, *full))
    for pos in itertools.product(*[range(i) for i in size]):
        for tap in itertools.product(*[range(kk) for kk in k]):
            at = tuple(
                p * s + t * d for p, t, s, d in zip(pos, tap, strides, dil, strict=True)
            )
            for g in range(group):
                xs = x[(slice(None), slice(g * cg, (g + 1) * cg), *pos)]  # (n, cg)
                ws = w[(slice(g * cg, (g + 1) * cg), slice(None), *tap)]  # (cg, mg)
                out[(slice(None), slice(g * mg, (g + 1) * mg), *at)] += xs @ ws
    # Crop by the pads (negative pads would add zeros: not needed here).
    crop = tuple(
        slice(pads[i], full[i] - pads[i + nd]) for i in range(nd)
    )  # fmt: skip
    out = out[(slice(None), slice(None), *crop)]
    return out + b.reshape((1, -1) + (1,) * nd)


# ------------------------------------------------------------ ConvTranspose


_CT_CASES = [
    {},
    {"strides": 2},
    {"strides": 2, "pads": 1, "output_padding": 1},
    {"strides": 3, "pads": (0, 2), "output_padding": 2, "dilations": 2},
    {"dilations": 2, "pads": (1, 0)},
    {"auto_pad": "SAME_UPPER", "strides": 2},
    {"auto_pad": "SAME_LOWER", "strides": 2},
    {"auto_pad": "VALID", "strides": 2},
    {"strides": 2, "pads": 3},  # beyond the kernel's reach: the output is cropped
]


def _ct_attrs(case, nd):
    """ONNX attributes of a ConvTranspose case for ``nd`` spatial axes."""
    attrs = {}
    for key, v in case.items():
        if key == "auto_pad":
            attrs[key] = v
        elif key == "pads":
            lo, hi = (v, v) if isinstance(v, int) else v
            attrs[key] = [lo] * nd + [hi] * nd
        else:
            attrs[key] = [v] * nd
    return attrs


@pytest.mark.parametrize("nd", [1, 2])
@pytest.mark.parametrize("case", _CT_CASES, ids=lambda c: str(c) or "default")
def test_conv_transpose_matches_the_reference(nd, case):
    rng = np.random.default_rng(nd)
    x = rng.normal(size=(2, 3) + (4,) * nd)
    w = rng.normal(size=(3, 2) + ((3,) if nd == 1 else (4, 3)))
    inits = {"w": w, "b": rng.normal(size=2)}
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="up",
                            **_ct_attrs(case, nd))  # fmt: skip
    _check_against_reference(_model([node], [("x", x.shape)], ["y"], inits), x)


def test_conv_transpose_3d():
    rng = np.random.default_rng(2)
    x, w = rng.normal(size=(1, 2, 2, 3, 2)), rng.normal(size=(2, 3, 2, 2, 3))
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"],
                            strides=[2, 1, 2], pads=[1, 0, 0, 0, 1, 1],
                            output_padding=[1, 0, 0])  # fmt: skip
    inits = {"w": w, "b": rng.normal(size=3)}
    _check_against_reference(_model([node], [("x", x.shape)], ["y"], inits), x)


@pytest.mark.parametrize("nd", [1, 2])
def test_conv_transpose_groups(nd):
    """Groups, against the scatter oracle; depthwise and without bias also against
    the reference (which mishandles other groups and adds the first bias to all)."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 4) + (3,) * nd)
    attrs = _ct_attrs({"strides": 2, "pads": (1, 0), "output_padding": 1}, nd)
    for group, w_shape in ((2, (4, 3)), (4, (4, 1))):
        w = rng.normal(size=w_shape + (2,) * nd)
        b = rng.normal(size=w_shape[1] * group)
        node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], group=group,
                                **attrs)  # fmt: skip
        fn = sonnx.load(_model([node], [("x", x.shape)], ["y"], {"w": w, "b": b}))
        ref = _np_conv_transpose(x, w, b, attrs["strides"], attrs["pads"],
                                 (1,) * nd, attrs["output_padding"], group)  # fmt: skip
        np.testing.assert_allclose(np.asarray(_call(fn, x)), ref, rtol=0, atol=TOL)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], group=4, **attrs)
    _check_against_reference(_model([node], [("x", x.shape)], ["y"], {"w": w}), x)


# ------------------------------------------------- 1-D Conv and pooling


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1]},
        {"strides": [2], "pads": [2, 0], "dilations": [2]},
        {"group": 3, "pads": [1, 2]},
        {"auto_pad": "SAME_UPPER", "strides": [2]},
    ],
)
def test_conv_1d(attrs):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 3, 7))
    w = rng.normal(size=(6, 3 // attrs.get("group", 1), 3))
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs)
    inits = {"w": w, "b": rng.normal(size=6)}
    _check_against_reference(_model([node], [("x", x.shape)], ["y"], inits), x)


def _np_pool_1d(x, op, kernel_shape, strides=(1,), pads=(0, 0), dilations=(1,),
                count_include_pad=0):  # fmt: skip
    """1-D max/average pooling, window by window."""
    (k,), (s,), (d,) = kernel_shape, strides, dilations
    fill = -np.inf if op == "MaxPool" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), tuple(pads)), constant_values=fill)
    real = np.pad(np.ones(x.shape[2]), tuple(pads))
    out = []
    for i in range(0, xp.shape[2] - d * (k - 1), s):
        taps = slice(i, i + d * (k - 1) + 1, d)
        win = xp[:, :, taps]
        count = k if count_include_pad else real[taps].sum()
        out.append(win.max(axis=2) if op == "MaxPool" else win.sum(axis=2) / count)
    return np.stack(out, axis=2)


@pytest.mark.parametrize(
    "op,attrs",
    [
        ("MaxPool", {"kernel_shape": [2], "strides": [2]}),
        ("MaxPool", {"kernel_shape": [3], "strides": [1], "pads": [1, 1]}),
        ("MaxPool", {"kernel_shape": [2], "dilations": [2], "pads": [0, 1]}),
        ("AveragePool", {"kernel_shape": [2], "strides": [2]}),
        ("AveragePool", {"kernel_shape": [3], "pads": [1, 1]}),
        ("AveragePool", {"kernel_shape": [3], "pads": [1, 2], "strides": [2],
                         "count_include_pad": 1}),
    ],
)  # fmt: skip
def test_pooling_1d(op, attrs):
    x = np.random.default_rng(7).normal(size=(2, 3, 8))
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    model = _model([node], [("x", x.shape)], ["y"])
    fn = sonnx.load(model)
    y = np.asarray(_call(fn, x))
    np.testing.assert_allclose(y, _np_pool_1d(x, op, **attrs), rtol=0, atol=TOL)
    if op == "AveragePool" or "pads" not in attrs:
        # (onnx 1.23's reference fails on a padded 1-D MaxPool with an IndexError.)
        _check_against_reference(model, x)


def test_conv_and_pooling_1d_are_tracked_exactly():
    rng = np.random.default_rng(8)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1]),
        helper.make_node("MaxPool", ["h"], ["p"], kernel_shape=[2], strides=[2]),
        helper.make_node("AveragePool", ["h"], ["q"], kernel_shape=[3], strides=[2],
                         pads=[1, 0]),
        helper.make_node("Sub", ["p", "q"], ["y"]),
    ]  # fmt: skip
    model = _model(nodes, [("x", (1, 2, 6))], ["y"], {"w": rng.normal(size=(3, 2, 3))})
    fn = _check_against_reference(model, rng.normal(size=(1, 2, 6)))
    _assert_tracked_exactly(fn, (1, 2, 6))


# ------------------------------------------------------------------ Split


@pytest.mark.parametrize(
    "opset,axis,split,outputs",
    [
        (11, 1, [1, 3], 2),  # the split attribute
        (13, 2, [2, 1, 2], 3),  # the split input
        (13, -1, None, 2),  # equal parts
        (18, 2, None, 3),  # num_outputs, unequal: 2, 2, 1
        (18, 1, [4], 1),
    ],
)
def test_split(opset, axis, split, outputs):
    x = np.random.default_rng(9).normal(size=(1, 4, 5, 6))
    names = [f"y{i}" for i in range(outputs)]
    ins, attrs, inits = ["x"], {"axis": axis}, {}
    if split is not None and opset < 13:
        attrs["split"] = split
    elif split is not None:
        ins.append("split")
        inits["split"] = np.array(split, np.int64)
    elif opset >= 18:
        attrs["num_outputs"] = outputs
    node = helper.make_node("Split", ins, names, **attrs)
    fn = _check_against_reference(
        _model([node], [("x", x.shape)], names, inits, opset=opset), x
    )
    assert fn.weights == {}  # the split sizes are static


def test_split_and_noise_of_a_convolution_are_tracked_exactly():
    """Split and RandomNormalLike of channels-last tensors (a Conv's output)."""
    rng = np.random.default_rng(10)
    inits = {"w": rng.normal(size=(4, 1, 3, 3)), "split": np.array([1, 3], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Split", ["h", "split"], ["a", "b"], axis=1),
        helper.make_node("Split", ["b"], ["c", "d"], axis=2, num_outputs=2),
        helper.make_node("RandomNormalLike", ["a"], ["e"], seed=2.0),
        helper.make_node("Add", ["a", "e"], ["ae"]),
        helper.make_node("Relu", ["ae"], ["r"]),
        helper.make_node("Sub", ["r", "b"], ["y"]),
    ]  # fmt: skip
    model = _model(nodes, [("x", (1, 1, 4, 4))], ["y", "c", "d"], inits, opset=18)
    fn = _check_against_reference(model, rng.normal(size=(1, 1, 4, 4)))
    _assert_tracked_exactly(fn, (1, 1, 4, 4))


def test_split_bad_sizes():
    node = helper.make_node("Split", ["x", "split"], ["a", "b"], name="s", axis=1)
    inits = {"split": np.array([1, 1], np.int64)}
    fn = sonnx.load(_model([node], [("x", (1, 3))], ["a", "b"], inits))
    with pytest.raises(InputError, match="'s'.*parts"):
        fn(np.zeros((1, 3)))


# ------------------------------------------------------------ random draws


def test_random_normal_like_is_the_seeded_draw():
    x = np.random.default_rng(11).normal(size=(2, 3, 4))
    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["e"], seed=7.0, mean=0.5,
                         scale=2.0),
        helper.make_node("Add", ["x", "e"], ["y"]),
    ]  # fmt: skip
    model = _model(nodes, [("x", x.shape)], ["y"])
    fn = _check_against_reference(model, x)
    y1, y2 = np.asarray(fn(x)), np.asarray(sonnx.load(model)(x))
    np.testing.assert_array_equal(y1, y2)  # deterministic given the seed
    e = np.random.RandomState(7).standard_normal(x.shape) * 2.0 + 0.5
    np.testing.assert_allclose(y1 - x, e, rtol=0, atol=TOL)
    # Another seed, another draw; the dtype attribute rounds the draw to float32.
    node = helper.make_node("RandomNormalLike", ["x"], ["y"], seed=8.0,
                            dtype=TensorProto.FLOAT)  # fmt: skip
    fn = sonnx.load(_model([node], [("x", x.shape)], ["y"]))
    e8 = np.random.RandomState(8).standard_normal(x.shape)
    np.testing.assert_array_equal(np.asarray(fn(x)), e8.astype(np.float32))


def test_random_normal():
    node = helper.make_node("RandomNormal", [], ["e"], shape=[1, 2, 3], seed=3.0,
                            scale=0.5, dtype=DOUBLE)  # fmt: skip
    nodes = [node, helper.make_node("Mul", ["x", "e"], ["y"])]
    x = np.random.default_rng(12).normal(size=(1, 2, 3))
    _check_against_reference(_model(nodes, [("x", x.shape)], ["y"]), x)


def test_a_random_draw_is_a_constant_for_the_tracker():
    nodes = [
        helper.make_node("RandomNormalLike", ["x"], ["e"], seed=1.0),
        helper.make_node("Add", ["x", "e"], ["s"]),
        helper.make_node("Relu", ["s"], ["y"]),
    ]
    fn = sonnx.load(_model(nodes, [("x", (1, 6))], ["y"]))
    _assert_tracked_exactly(fn, (1, 6))
    piece = sijax.track(fn)(jnp.zeros((1, 6)), jnp.ones((1, 6)), 0.0)
    e = np.random.RandomState(1).standard_normal((1, 6))
    on = e > 0  # at x = 0 the ReLU is on where the draw is positive
    np.testing.assert_allclose(np.asarray(piece.out.beta), on * 1.0, atol=0)
    np.testing.assert_allclose(np.asarray(piece.out.alpha), on * e, atol=TOL)


def test_a_random_draw_needs_a_seed():
    node = helper.make_node("RandomNormalLike", ["x"], ["y"], name="noise")
    fn = sonnx.load(_model([node], [("x", (1, 2))], ["y"]))
    with pytest.raises(sonnx.UnsupportedOperatorError, match="'noise'.*seed"):
        fn(np.zeros((1, 2)))


# --------------------------------------------- several inputs and outputs


def test_several_inputs_and_outputs():
    model = _model(*_parts_without_reduce())
    rng = np.random.default_rng(14)
    x, m = rng.normal(size=(1, 1, 3, 3)), rng.normal(size=(1, 1, 3, 3))
    fn = _check_against_reference(model, x, m)
    assert fn.input_names == ("x", "m") and fn.output_names == ("r", "d", "h")
    by_position = fn(x, m)
    assert isinstance(by_position, tuple) and len(by_position) == 3
    for call in (fn(x, m=m), fn(m=m, x=x), jax.jit(lambda f: f(m=m, x=x))(fn)):
        for u, v in zip(call, by_position, strict=True):
            np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=TOL)
    # vmap over both inputs; track in x with m closed over.
    ys = jax.vmap(fn)(np.stack([x, x + 1]), np.stack([m, m]))
    np.testing.assert_allclose(
        np.asarray(ys[0][1]), np.asarray(fn(x + 1, m)[0]), atol=TOL
    )
    _assert_tracked_exactly(lambda v: fn(v, jnp.asarray(m)), (1, 1, 3, 3))
    for args, kw, match in [
        ((x,), {}, "missing.*'m'"),
        ((), {"x": x}, "missing.*'m'"),
        ((x, m), {"m": m}, "both"),
        ((x,), {"mask": m}, "no inputs"),
        ((x, m, m), {}, "takes 2 inputs"),
    ]:
        with pytest.raises(InputError, match=match):
            fn(*args, **kw)


def _parts_without_reduce():
    rng = np.random.default_rng(13)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("Mul", ["h", "m"], ["hm"]),
        helper.make_node("Relu", ["hm"], ["r"]),
        helper.make_node("Sub", ["x", "m"], ["d"]),
    ]
    inputs = [("x", (1, 1, 3, 3)), ("m", (1, 1, 3, 3))]
    return nodes, inputs, ["r", "d", "h"], {"w": rng.normal(size=(1, 1, 3, 3))}


def test_initializers_listed_among_the_graph_inputs_are_no_inputs():
    """Old exporters (IR < 4) list every initializer as a graph input too."""
    nodes, inputs, outputs, inits = _parts_without_reduce()
    model = _model(nodes, inputs + [("w", (1, 1, 3, 3))], outputs, inits)
    fn = sonnx.load(model)
    assert fn.input_names == ("x", "m")
    x = np.ones((1, 1, 3, 3))
    np.testing.assert_allclose(
        np.asarray(fn(x, x)[2]), _reference(model, x, x, inits["w"])[2], atol=TOL
    )


# ------------------------------------------------- the other operators


def _unary(op, shape=(2, 3, 4, 5), **attrs):
    return [helper.make_node(op, ["x"], ["y"], **attrs)], shape, {}


_OTHERS = {
    "LeakyRelu": lambda: _unary("LeakyRelu", alpha=0.2),
    "Sigmoid": lambda: _unary("Sigmoid"),
    "MaxPool": lambda: _unary("MaxPool", kernel_shape=[3, 2], strides=[2, 1],
                              pads=[1, 0, 1, 1], dilations=[1, 2]),
    "GlobalAveragePool": lambda: _unary("GlobalAveragePool"),
    "Transpose": lambda: _unary("Transpose", perm=[0, 2, 3, 1]),
    "Gemm": lambda: (
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], transA=1, transB=1,
                          alpha=0.5, beta=2.0)],
        (4, 3),
        {"w": np.arange(20.0).reshape(5, 4) / 7, "c": np.linspace(-1, 1, 5)},
    ),
    "MatMul": lambda: (
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        (2, 3, 4),
        {"w": np.arange(8.0).reshape(4, 2) - 3},
    ),
    "BatchNormalization": lambda: (
        [helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"],
                          epsilon=1e-3)],
        (2, 3, 4, 5),
        {"s": np.array([1.0, -2.0, 0.5]), "b": np.array([0.1, 0.2, 0.3]),
         "m": np.array([0.0, 1.0, -1.0]), "v": np.array([1.0, 0.5, 2.0])},
    ),
    "Resize-linear": lambda: (
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear")],
        (1, 2, 3, 4),
        {"scales": np.array([1.0, 1.0, 2.0, 1.5])},
    ),
    "Resize-nearest": lambda: (
        [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="nearest",
                          coordinate_transformation_mode="asymmetric",
                          nearest_mode="floor")],
        (1, 2, 3, 4),
        {"sizes": np.array([1, 2, 6, 8], np.int64)},
    ),
    "Slice": lambda: (
        [helper.make_node("Slice", ["x", "st", "en", "ax", "sp"], ["y"])],
        (2, 3, 6, 5),
        {"st": np.array([-1, 1], np.int64), "en": np.array([-100, 5], np.int64),
         "ax": np.array([2, 3], np.int64), "sp": np.array([-2, 2], np.int64)},
    ),
    "ReduceSum": lambda: (
        [helper.make_node("ReduceSum", ["x", "ax"], ["y"], keepdims=0)],
        (2, 3, 4, 5),
        {"ax": np.array([1, -1], np.int64)},
    ),
    # On the data path these two are not piecewise linear: forward passes only.
    "Reciprocal": lambda: _unary("Reciprocal"),
    "Softmax": lambda: _unary("Softmax", axis=1),
    "Squeeze-Unsqueeze": lambda: (
        [helper.make_node("Unsqueeze", ["x", "a"], ["u"]),
         helper.make_node("Squeeze", ["u", "b"], ["y"])],
        (2, 1, 4),
        {"a": np.array([0, -1], np.int64), "b": np.array([0, 2], np.int64)},
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(_OTHERS))
def test_other_operators_match_the_reference(name):
    nodes, shape, inits = _OTHERS[name]()
    x = np.random.default_rng(15).normal(size=shape)
    _check_against_reference(_model(nodes, [("x", shape)], ["y"], inits), x)


def test_a_chain_of_the_other_operators_is_tracked_exactly():
    """Conv, BatchNorm, LeakyRelu, MaxPool, Resize, Slice, Transpose, Unsqueeze,
    Squeeze, GlobalAveragePool, Flatten, Gemm, MatMul on one line."""
    rng = np.random.default_rng(16)
    inits = {
        "k": rng.normal(size=(3, 1, 3, 3)), "s": rng.normal(size=3),
        "b": rng.normal(size=3), "m": rng.normal(size=3),
        "v": np.abs(rng.normal(size=3)) + 0.5,
        "scales": np.array([1.0, 1.0, 2.0, 2.0]),
        "st": np.array([1], np.int64), "en": np.array([7], np.int64),
        "ax": np.array([3], np.int64), "a0": np.array([0], np.int64),
        "wg": rng.normal(size=(4, 3)), "wm": rng.normal(size=(4, 2)),
    }  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "k"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["h", "s", "b", "m", "v"], ["n"]),
        helper.make_node("LeakyRelu", ["n"], ["l"], alpha=0.1),
        helper.make_node("MaxPool", ["l"], ["p"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("Resize", ["p", "", "scales"], ["r"], mode="linear"),
        helper.make_node("Slice", ["r", "st", "en", "ax"], ["c"]),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 1, 3, 2]),
        helper.make_node("Unsqueeze", ["t", "a0"], ["u"]),
        helper.make_node("Squeeze", ["u", "a0"], ["q"]),
        helper.make_node("GlobalAveragePool", ["q"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wg"], ["z"], transB=1),
        helper.make_node("LeakyRelu", ["z"], ["zl"], alpha=0.3),
        helper.make_node("MatMul", ["zl", "wm"], ["y"]),
    ]  # fmt: skip
    model = _model(nodes, [("x", (1, 1, 4, 4))], ["y", "t"], inits)
    fn = _check_against_reference(model, rng.normal(size=(1, 1, 4, 4)))
    _assert_tracked_exactly(fn, (1, 1, 4, 4), threshold=0.1)


# ------------------------------------------------------------ U-Nets


def _unet(nd, rng, c=1, w1=3, w2=4, alpha=0.1):
    """A two-level U-Net in ``nd`` dimensions, as si4onnx's example: conv-LeakyReLU,
    MaxPool, conv-LeakyReLU, ConvTranspose up, skip concatenation, conv-LeakyReLU,
    1x1 conv."""
    k = (3,) * nd
    pad = [1] * (2 * nd)
    inits = {
        "k1": rng.normal(size=(w1, c, *k)) * 0.6, "b1": rng.normal(size=w1),
        "k2": rng.normal(size=(w2, w1, *k)) * 0.4, "b2": rng.normal(size=w2),
        "kt": rng.normal(size=(w2, w1, *(2,) * nd)) * 0.4, "bt": rng.normal(size=w1),
        "k3": rng.normal(size=(w1, 2 * w1, *k)) * 0.4, "b3": rng.normal(size=w1),
        "k4": rng.normal(size=(c, w1, *(1,) * nd)), "b4": rng.normal(size=c),
    }  # fmt: skip
    two = [2] * nd
    nodes = [
        helper.make_node("Conv", ["x", "k1", "b1"], ["h1"], pads=pad, name="enc1"),
        helper.make_node("LeakyRelu", ["h1"], ["e1"], alpha=alpha),
        helper.make_node("MaxPool", ["e1"], ["p1"], kernel_shape=two, strides=two),
        helper.make_node("Conv", ["p1", "k2", "b2"], ["h2"], pads=pad, name="enc2"),
        helper.make_node("LeakyRelu", ["h2"], ["e2"], alpha=alpha),
        helper.make_node("ConvTranspose", ["e2", "kt", "bt"], ["u"], strides=two,
                         name="up"),
        helper.make_node("Concat", ["u", "e1"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "k3", "b3"], ["h3"], pads=pad, name="dec"),
        helper.make_node("LeakyRelu", ["h3"], ["d"], alpha=alpha),
        helper.make_node("Conv", ["d", "k4", "b4"], ["y"], name="out"),
    ]  # fmt: skip
    return nodes, inits


@pytest.mark.parametrize("shape", [(1, 1, 8), (1, 1, 4, 6)], ids=["1d", "2d"])
def test_unet_matches_the_reference_and_is_tracked_exactly(shape):
    nd = len(shape) - 2
    rng = np.random.default_rng(17 + nd)
    nodes, inits = _unet(nd, rng)
    model = _model(nodes, [("x", shape)], ["y"], inits)
    fn = _check_against_reference(model, rng.normal(size=shape))
    assert fn.output_shapes == (shape,)
    _assert_tracked_exactly(fn, shape, seed=nd)


# ------------------------------------------------------------ bad input


def test_an_unsupported_operator_names_the_node_and_lists_the_supported_ones():
    nodes = [
        helper.make_node("ConvTranspose", ["x", "w"], ["h"], name="up"),
        helper.make_node("Softplus", ["h"], ["y"], name="head.act"),
    ]
    model = _model(nodes, [("x", (1, 1, 2))], ["y"], {"w": np.ones((1, 1, 2))})
    with pytest.raises(sonnx.UnsupportedOperatorError, match="head.act") as e:
        sonnx.load(model)
    msg = str(e.value)
    assert "'Softplus'" in msg and "supported:" in msg
    for op in ("ConvTranspose", "Split", "RandomNormalLike", "LeakyRelu"):
        assert op in msg and op in sonnx.SUPPORTED_OPS


def test_exp_on_the_data_path_is_refused_and_off_it_is_not():
    rng = np.random.default_rng(19)
    inits = {"w": rng.normal(size=(2, 1, 3)), "c": rng.normal(size=(1, 2, 1))}
    on_path = [
        helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1]),
        helper.make_node("Exp", ["h"], ["y"]),
    ]
    fn = _check_against_reference(_model(on_path, [("x", (1, 1, 4))], ["y"], inits),
                                  rng.normal(size=(1, 1, 4)))  # fmt: skip
    with pytest.raises(NotPiecewiseLinearError, match="exp"):
        sijax.track(fn)(jnp.zeros((1, 1, 4)), jnp.ones((1, 1, 4)), 0.0)
    # Exp of a weight only: a constant factor for the tracker.
    off_path = [
        helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1]),
        helper.make_node("Exp", ["c"], ["ec"]),
        helper.make_node("Mul", ["h", "ec"], ["y"]),
    ]
    model = _model(off_path, [("x", (1, 1, 4))], ["y"], inits)
    fn = _check_against_reference(model, rng.normal(size=(1, 1, 4)))
    _assert_tracked_exactly(fn, (1, 1, 4))


# ------------------------------------- si4onnx's other operators: ReduceSum, and
# EyeLike, Reciprocal, Equal, Greater, Softmax folded on constants and shapes


@pytest.mark.parametrize(
    ("opset", "attrs", "axes"),
    [(11, {"axes": [0, 2], "keepdims": 1}, None),
     (11, {"keepdims": 0}, None),
     (13, {"keepdims": 1}, np.array([-2], np.int64)),
     (13, {"noop_with_empty_axes": 1}, np.array([], np.int64))],
    ids=["attr", "all", "input", "noop"],
)  # fmt: skip
def test_reduce_sum(opset, attrs, axes):
    inputs, inits = ["x"], {}
    if axes is not None:
        inputs, inits = ["x", "ax"], {"ax": axes}
    nodes = [helper.make_node("ReduceSum", inputs, ["y"], **attrs)]
    x = np.random.default_rng(20).normal(size=(2, 3, 4))
    _check_against_reference(_model(nodes, [("x", (2, 3, 4))], ["y"], inits, opset), x)


def test_si4onnx_constant_operators_are_folded_and_tracked_exactly():
    """EyeLike, Softmax, Reciprocal and Greater of weights, Equal of a shape, and
    ReduceSum on the data path: the graph matches the reference and is tracked
    exactly (the folded operators are constants for the tracker)."""
    rng = np.random.default_rng(21)
    inits = {
        "w": rng.normal(size=(3, 3)),
        "r": rng.uniform(1, 2, size=3),
        "sh": np.array([2, 4], np.int64),
        "ax": np.array([1], np.int64),
    }
    cast = TensorProto.DOUBLE
    nodes = [
        helper.make_node("EyeLike", ["w"], ["e"], k=1),
        helper.make_node("Softmax", ["w"], ["s"], axis=0),
        helper.make_node("Greater", ["w", "r"], ["gb"]),
        helper.make_node("Cast", ["gb"], ["g"], to=cast),
        helper.make_node("Reciprocal", ["r"], ["rr"]),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Equal", ["xs", "sh"], ["qb"]),
        helper.make_node("Cast", ["qb"], ["q"], to=cast),
        helper.make_node("ReduceSum", ["q"], ["qs"], keepdims=1),
        helper.make_node("Mul", ["s", "g"], ["sg"]),
        helper.make_node("Add", ["e", "sg"], ["m"]),
        helper.make_node("MatMul", ["x", "m"], ["h0"]),
        helper.make_node("Relu", ["h0"], ["h1"]),
        helper.make_node("Mul", ["h1", "rr"], ["h"]),
        helper.make_node("ReduceSum", ["h", "ax"], ["y0"], keepdims=1),
        helper.make_node("Mul", ["y0", "qs"], ["y"]),
    ]
    model = _model(nodes, [("x", (2, 3))], ["y"], inits)
    fn = _check_against_reference(model, rng.normal(size=(2, 3)))
    _assert_tracked_exactly(fn, (2, 3), threshold=0.1)


@pytest.mark.parametrize("op", ["Reciprocal", "Softmax"])
def test_reciprocal_and_softmax_on_the_data_path_are_refused(op):
    model = _model([helper.make_node(op, ["x"], ["y"])], [("x", (1, 4))], ["y"])
    fn = sonnx.load(model)
    with pytest.raises(NotPiecewiseLinearError):
        sijax.track(fn)(jnp.ones((1, 4)), jnp.ones((1, 4)), 0.0)


def test_a_comparison_on_the_data_path_is_a_decision_of_the_tracker():
    """Greater of the data (and Equal, never true on a line of continuous data):
    the tracker conditions on it (a piece ends where it flips), exactly."""
    rng = np.random.default_rng(22)
    nodes = [
        helper.make_node("Greater", ["x", "c"], ["gb"]),
        helper.make_node("Cast", ["gb"], ["g"], to=TensorProto.DOUBLE),
        helper.make_node("Equal", ["x", "c"], ["qb"]),
        helper.make_node("Cast", ["qb"], ["q"], to=TensorProto.DOUBLE),
        helper.make_node("Add", ["g", "q"], ["gq"]),
        helper.make_node("Mul", ["x", "gq"], ["y"]),
    ]
    model = _model(nodes, [("x", (1, 4))], ["y"], {"c": rng.normal(size=(1, 4))})
    fn = _check_against_reference(model, rng.normal(size=(1, 4)))
    _assert_tracked_exactly(fn, (1, 4), threshold=0.1)
