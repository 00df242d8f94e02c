"""sijax.si4onnx against si4onnx 0.1.13 + sicore 3.0.0 (docs/si4onnx.md).

The oracle is si4onnx itself, run once in its own environment by
tests/data/si4onnx/make_reference.py on the committed ONNX files; this test needs
neither torch nor si4onnx. For every case the same call goes through
``sijax.si4onnx`` and must give:

* the same region, comparison set and squeezed score map (exactly / 1e-12: both
  evaluate the same float64 network, with the threshold rounded to float32 alike);
* the same statistic (1e-12 relative) and the same number of pieces searched
  (for the searches run as sicore's loop on the host: "pi1", "pi2", callables,
  n_jobs > 1, also the same detect_count and searched intervals);
* p_value, inf_p and sup_p within 1e-6 relative (measured: about 1e-12; the two
  compute the same pieces, and the truncated-normal masses in log space alike, up
  to the order of floating-point sums);
* the same truncated intervals (ends within 1e-7 relative: si4onnx solves each
  boundary from its intercept form a + b z, sijax from the value at the tracked z;
  measured agreement about 1e-12).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("onnx")

import sijax  # noqa: E402
import sijax.si4onnx as si4onnx  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "si4onnx")
with open(os.path.join(DATA, "reference.json")) as _f:
    REFERENCE = json.load(_f)
CASES = {c["name"]: c for c in REFERENCE["cases"]}
ARRAYS = dict(np.load(os.path.join(DATA, "reference.npz")))

# Every case compiles its own search (tens of seconds on a busy 2-core machine), so
# the default run checks one case per hypothesis, inference mode and feature; the
# others (U-Nets, si4onnx's examples, the remaining combinations) are marked slow and
# run in CI after the default run, and by name.
FAST = {"tiny2d_back_param", "tiny2d_neighbor_exh", "tiny2d_reference_oc",
        "tiny2d_back_norm", "tiny2d_back_empty", "two_io_i0_o1",
        "segmenter_back", "tiny2d_back_pi2_decision", "tiny2d_back_njobs2"}  # fmt: skip

# The callables of make_reference.py's CALLABLES (sicore's search strategies and
# termination criteria receive RealSubsets; sijax passes its re-implementation).
CALLABLES = {
    "walk_right": lambda s: 2.0 if s.is_empty() else s[-1][1] + 1e-6,
    "right_of_7": lambda s, t: s[-1][1] > 7.0,
    "measure_over_4": lambda s, t: 1.0 if s.measure > 4.0 else 0.0,
}


def _hypothesis(spec: dict):
    ops = [getattr(si4onnx, name)(*args) for name, *args in spec["post_process"]] \
        if "post_process" in spec else []  # fmt: skip
    kw = {k: v for k, v in spec.items() if k not in ("class", "post_process")}
    return getattr(si4onnx, spec["class"])(post_process=ops, **kw)


def _call(case: dict):
    """The case's si4onnx call, through sijax.si4onnx."""
    name = case["name"]
    model = si4onnx.load(
        os.path.join(DATA, case["model"]), _hypothesis(case["hypothesis"]),
        **case.get("load", {}),
    )  # fmt: skip
    ins = [ARRAYS[f"{name}/in{k}"] for k in range(case["n_inputs"])]
    kind = case["inputs"]
    inp = ins[0] if kind in ("single", "reference") else ins
    if kind.startswith("reference"):
        inp = (inp, ARRAYS[f"{name}/ref"])
    var = case["var"]
    var = ARRAYS[var] if isinstance(var, str) else var
    mask = ARRAYS.get(f"{name}/mask")
    kw = {k: CALLABLES[v[1:]] if isinstance(v, str) and v.startswith("@") else v
          for k, v in case["kwargs"].items()}  # fmt: skip
    return model.inference(inp, var, mask=mask, **kw)


def _params():
    out = []
    for name in CASES:
        marks = [] if name in FAST else [pytest.mark.slow]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def _close(a, b, rtol, atol=0.0):
    return abs(a - b) <= atol + rtol * max(abs(a), abs(b))


@pytest.mark.parametrize("name", _params())
def test_matches_si4onnx(name):
    case = CASES[name]
    if "error" in case:
        with pytest.raises(si4onnx.NoHypothesisError):
            _call(case)
        return
    res = _call(case)
    np.testing.assert_array_equal(res.roi, ARRAYS[f"{name}/roi"])
    assert res.roi.dtype == np.int32
    if f"{name}/non_roi" in ARRAYS:
        np.testing.assert_array_equal(res.non_roi, ARRAYS[f"{name}/non_roi"])
    else:
        assert res.non_roi is None
    np.testing.assert_allclose(res.score_map, ARRAYS[f"{name}/score_map"],
                               rtol=0, atol=1e-12)  # fmt: skip
    outs = res.output if isinstance(res.output, list) else [res.output]
    for k, o in enumerate(outs):
        np.testing.assert_allclose(o, ARRAYS[f"{name}/output{k}"], rtol=0, atol=1e-12)
    assert _close(res.stat, case["stat"], 1e-12, 1e-14)
    assert _close(res.null_rv.kwds["scale"], case["scale"], 1e-12)
    for key in ("p_value", "inf_p", "sup_p"):
        assert _close(getattr(res, key), case[key], 1e-6, 1e-300), (
            key, getattr(res, key), case[key])  # fmt: skip
    assert _close(res.naive_p_value(), case["naive_p_value"], 1e-10)
    assert res.search_count == case["search_count"]
    if res.detect_count is not None:  # sicore's loop, run on the host
        assert res.detect_count == case["detect_count"]
        got, want = np.asarray(res.searched_intervals), np.asarray(
            case["searched_intervals"])  # fmt: skip
        assert got.shape == want.shape, (got, want)
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)
    got, want = np.asarray(res.truncated_intervals), np.asarray(
        case["truncated_intervals"])  # fmt: skip
    assert got.shape == want.shape, (got, want)
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-12)


def test_torch_like_inputs_and_threshold_rounding():
    """Anything with ``__array__`` (a torch tensor: detach(), cpu()) is accepted, and
    the threshold is rounded as ``torch.tensor(threshold).double()`` does."""

    class FakeTensor:
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def __array__(self, dtype=None, copy=None):
            return np.asarray(self.a, dtype=dtype)

    assert si4onnx.BackMeanDiff(0.8).threshold == float(np.float32(0.8))
    assert si4onnx.BackMeanDiff(np.float64(0.8)).threshold == 0.8
    assert si4onnx.BackMeanDiff(FakeTensor(np.float64(0.8))).threshold == 0.8
    assert si4onnx.BackMeanDiff(1).threshold == 1.0
    case = CASES["tiny2d_back_oc"]
    model = si4onnx.load(os.path.join(DATA, case["model"]),
                         _hypothesis(case["hypothesis"]))  # fmt: skip
    res = model.inference(FakeTensor(ARRAYS["tiny2d_back_oc/in0"]), 1.0,
                          inference_mode="over_conditioning")  # fmt: skip
    assert _close(res.p_value, case["p_value"], 1e-6)


def test_use_norm_is_tracked_without_division():
    """use_norm: the region is score - min > t (max - min); the piece ends where the
    arg-max or arg-min changes, so every piece's region is constant on it (checked
    on a dense grid of the found truncation set's neighbourhood)."""
    import jax
    import jax.numpy as jnp

    from sijax.si4onnx import si

    name = "tiny2d_back_norm"
    case = CASES[name]
    hyp = _hypothesis(case["hypothesis"])
    model = si4onnx.load(os.path.join(DATA, case["model"]), hyp)
    x = ARRAYS[f"{name}/in0"]
    spec = si._Spec(0, hyp.post_process, True, False, False)
    thr = jnp.asarray(hyp.threshold)

    def roi_at(xz):
        return si._roi(spec, model.fn, (xz,), xz, thr, jnp.ones((), bool))

    f = jax.jit(lambda a, b, z, d: sijax.track(roi_at)(a, b, z, d))
    rng = np.random.default_rng(0)
    b = rng.normal(size=x.shape)
    for z in np.linspace(-3, 3, 7):
        piece = f(jnp.asarray(x), jnp.asarray(b), z, 1)
        lo, hi = float(piece.lo), float(piece.hi)
        for t in np.linspace(max(lo, z - 1), min(hi, z + 1), 9)[1:-1]:
            np.testing.assert_array_equal(roi_at(jnp.asarray(x + b * t)), piece.out)


def test_errors():
    case = CASES["tiny2d_back_param"]
    path = os.path.join(DATA, case["model"])
    with pytest.raises(ValueError, match="PresetHypothesis"):
        si4onnx.load(path, object())
    model = si4onnx.load(path, si4onnx.ReferenceMeanDiff(1.0))
    with pytest.raises(ValueError, match="tuple of length 2"):
        model.inference(ARRAYS["tiny2d_back_param/in0"], 1.0)
    with pytest.raises(sijax.InputError, match="pi4"):
        si4onnx.load(path, si4onnx.BackMeanDiff(1.0)).inference(
            ARRAYS["tiny2d_back_param/in0"], 1.0, search_strategy="pi4"
        )
    with pytest.raises(si4onnx.InfiniteLoopError):
        si4onnx.load(path, _hypothesis(case["hypothesis"])).inference(
            ARRAYS["tiny2d_back_param/in0"], 1.0, max_iter=3
        )


def test_not_piecewise_linear_on_the_data_path():
    """A Tanh between the input and the score: NotPiecewiseLinearError, never a
    p-value (si4onnx has no Tanh layer; an Exp it would follow wrongly)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    graph = helper.make_graph([helper.make_node("Tanh", ["x"], ["y"])], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(proto)
    model = si4onnx.load(proto, si4onnx.BackMeanDiff(
        0.5, post_process=[si4onnx.InputDiff(), si4onnx.Abs()]))  # fmt: skip
    xs = np.zeros((1, 1, 4, 4))
    xs[0, 0, :2, :2] = 3.0
    with pytest.raises(sijax.NotPiecewiseLinearError):
        model.inference(xs, 1.0)


def test_an_operator_sijax_lacks_is_named_at_load():
    """An operator sijax.onnx does not import (Softplus): UnsupportedOperatorError
    naming the node, at load."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 4, 4])
    node = helper.make_node("Softplus", ["x"], ["y"], name="the_act")
    graph = helper.make_graph([node], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(sijax.onnx.UnsupportedOperatorError, match="the_act"):
        si4onnx.load(proto, si4onnx.BackMeanDiff(0.5))


def test_real_subset_has_sicore_semantics():
    """What callables receive: sicore's RealSubset (closed intervals, gaps under
    1e-10 merged). Expected values printed by sicore 3.0.0's own class."""
    inf = np.inf
    a = si4onnx.RealSubset([[1.0, 3.0], [5.0, 7.0]])
    b = si4onnx.RealSubset([[2.0, 4.0], [6.0, 8.0]])
    assert (~a).tolist() == [[-inf, 1.0], [3.0, 5.0], [7.0, inf]]
    assert (a | b).tolist() == [[1.0, 4.0], [5.0, 8.0]]
    assert (a & b).tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert (a - b).tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert (a ^ b).tolist() == [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]]
    assert 3.0 in a and 4.0 not in a and a <= (a | b)
    assert si4onnx.RealSubset([[0, 1], [1 + 1e-11, 2]]).tolist() == [[0.0, 2.0]]
    assert a.measure == 4.0 and a[-1] == [5.0, 7.0]
    assert a.find_interval_containing(6.0) == [5.0, 7.0]
    full = si4onnx.RealSubset([[0.0, 10.0]])
    assert (full - full).is_empty()
