"""``load`` and the selective-inference model: si4onnx's computation on sijax's engine.

si4onnx 0.1.13 walks the ONNX graph layer by layer in PyTorch at every z, and sicore
3.0.0 grows the searched set in Python. Here the region of interest as a function of
the tested input,

    roi(x) = squeeze(post_process(net(x)[o_idx]) > threshold) AND mask,

is one JAX function; :func:`sijax.track` follows it along the line x(z) = a + b z and
:func:`sijax.selective.search` runs sicore's "pi3" search, its stopping rules and its
equal-tailed p-value 2 min(F, 1 - F) inside one compiled ``lax.while_loop``. Every
operator's decision (ReLU, LeakyReLU and abs signs, max-pooling winners, the
threshold comparisons, and with ``use_norm`` the arg-max and arg-min of the score
map) ends a piece, as each ``forward_si`` of si4onnx does.

sicore's other strategies ("pi1", "pi2", callables) and its parallel search
(``n_jobs > 1``) run sicore's loop on the host, one compiled piece per step
(:mod:`sijax.si4onnx.host_search`), with the same points, pieces and counts.

The compiled search is cached per network (by its serialised bytes), pipeline and
input shapes: ``load`` inside a loop over images compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from sijax.errors import InputError, SearchError
from sijax.selective.intervals import to_list
from sijax.selective.pvalues import naive_p_value
from sijax.selective.search import SearchStatus, search
from sijax.si4onnx import host_search as hs
from sijax.si4onnx.hypothesis import (
    NoHypothesisError,
    PresetHypothesis,
    ReferenceMeanDiff,
)
from sijax.tracking import memo_init, track, track_memo

__all__ = [
    "InferenceResult",
    "InfiniteLoopError",
    "PresetSelectiveInferenceModel",
    "SelectiveInferenceModel",
    "load",
]

MODES = ("parametric", "exhaustive", "over_conditioning")


class InfiniteLoopError(SearchError):
    """The search reached ``max_iter`` pieces (sicore's ``InfiniteLoopError``)."""


@dataclasses.dataclass
class InferenceResult:
    """si4onnx's ``InferenceResult`` (sicore's ``SelectiveInferenceResult`` with the
    region and the network's output).

    Attributes:
      stat: eta^T data, the unstandardised statistic (sicore's ``stat``).
      p_value: the selective p-value (equal-tailed, two-sided) on the searched part.
      inf_p, sup_p: its bounds over every Zset consistent with the search.
      searched_intervals: the searched part of the line, in units of ``stat``.
      truncated_intervals: Zset found, in units of ``stat``.
      search_count: pieces evaluated.
      detect_count: accepted pieces (sicore's count) from the host search
        (``search_strategy`` "pi1" / "pi2" / callables, ``n_jobs > 1``); None
        from the compiled one, which does not count them.
      null_rv: N(0, sd^2), sd = sqrt(eta^T Sigma eta), the null law of ``stat``.
      alternative: "two-sided".
      output: the network's output at the data (an array, or a list of arrays for
        a graph with several outputs).
      score_map: the squeezed score map (min-max normalised with ``use_norm``).
      roi: int32 region of interest (squeezed).
      non_roi: int32 comparison set (background or ring), None for the reference
        hypothesis.
    """

    stat: float
    p_value: float
    inf_p: float
    sup_p: float
    searched_intervals: list[list[float]]
    truncated_intervals: list[list[float]]
    search_count: int
    detect_count: int | None
    null_rv: Any
    alternative: str
    output: Any = None
    score_map: np.ndarray | None = None
    roi: np.ndarray | None = None
    non_roi: np.ndarray | None = None
    z: float = math.nan  # the standardised statistic stat / sd

    def naive_p_value(self) -> float:
        """2 Phi(-|z|): the p-value that ignores the selection."""
        return float(naive_p_value(jnp.asarray(self.z), "two-sided"))

    def __str__(self) -> str:
        def ivs(x):
            return "[" + ", ".join(f"[{lo:.6f}, {hi:.6f}]" for lo, hi in x) + "]"

        return "\n".join([
            f"stat: {self.stat:.6f}",
            f"p_value: {self.p_value:.6f}",
            f"inf_p: {self.inf_p:.6f}",
            f"sup_p: {self.sup_p:.6f}",
            f"searched_intervals: {ivs(self.searched_intervals)}",
            f"truncated_intervals: {ivs(self.truncated_intervals)}",
            f"search_count: {self.search_count}",
            f"alternative: {self.alternative}",
        ])  # fmt: skip


# ------------------------------------------------------------------ the network


def _as_proto(model):
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes | bytearray | memoryview):
        return onnx.load_model_from_string(bytes(model))
    return onnx.load(model)


def _score_source(proto, o_idx: int) -> tuple[str, bool]:
    """(name of the tensor the region is thresholded on, whether it is the input of
    a final Sigmoid).

    si4onnx thresholds the logit when the selected output comes out of a Sigmoid
    (``use_sigmoid``): ``sigmoid(v) > t`` iff ``v > logit(t)``, which is piecewise
    linear in v.
    """
    outputs = [o.name for o in proto.graph.output]
    if not 0 <= o_idx < len(outputs):
        raise InputError(f"o_idx={o_idx} but the graph has outputs {outputs}")
    name = outputs[o_idx]
    for node in proto.graph.node:
        if name in node.output and node.op_type == "Sigmoid":
            return node.input[0], True
    return name, False


def _pruned(proto, o_idx: int, name: str):
    """The graph with ``name`` as its only output and only the nodes it needs.

    si4onnx's interval for an output collects only the decisions upstream of that
    output (forward_si intersects the intervals along the data path), so the
    tracker must not see the other outputs' branches. ``name`` is output ``o_idx``
    or the input of the Sigmoid producing it: either has that output's type.
    """
    import onnx

    needed, keep = {name}, []
    for node in reversed(proto.graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    g = out.graph
    info = onnx.ValueInfoProto()
    info.CopyFrom(proto.graph.output[o_idx])
    info.name = name
    del g.node[:]
    g.node.extend(reversed(keep))
    del g.output[:]
    g.output.extend([info])
    return out


@functools.lru_cache(maxsize=16)
def _functions(digest: str, proto_bytes: bytes, o_idx: int):
    """(full network, network of the thresholded tensor, uses a final sigmoid),
    cached by the model's bytes so that repeated ``load`` calls share compiles."""
    import onnx

    from sijax import onnx as sonnx

    proto = onnx.load_model_from_string(proto_bytes)
    name, sigmoid = _score_source(proto, o_idx)
    return sonnx.load(proto), sonnx.load(_pruned(proto, o_idx, name)), sigmoid


# ------------------------------------------------------------- the region of x


@dataclasses.dataclass(frozen=True)
class _Spec:
    """Static description of roi(x) (part of the compiled search's cache key)."""

    i_idx: int
    post_process: tuple
    use_norm: bool
    sigmoid: bool
    has_mask: bool


def _roi(spec: _Spec, fn, inputs: tuple, x, threshold, mask):
    """roi(x): the thresholded, squeezed score map of input ``spec.i_idx`` = x.

    Returns (score map before thresholding, roi) as bool; with ``use_norm`` the
    comparison is score - min > threshold (max - min) (no division: piecewise
    linear, with the arg-extremes as decisions of the tracker).
    """
    args = list(inputs)
    args[spec.i_idx] = x
    s = fn(*args)
    if spec.sigmoid:
        # threshold on the logit (si4onnx skips post_process and use_norm here)
        keep = s > jnp.log(threshold / (1.0 - threshold))
    else:
        for op in spec.post_process:
            s = op(s, x)
        if spec.use_norm:
            lo, hi = jnp.min(s), jnp.max(s)
            keep = (s - lo) > threshold * (hi - lo)
        else:
            keep = s > threshold
    keep = jnp.squeeze(keep)
    if spec.has_mask:
        keep = keep & mask
    return keep


def _piece(params, z, direction, memo=None, *, spec):
    fn, inputs, a, b, threshold, mask, roi_obs = params

    def f(x):
        return _roi(spec, fn, inputs, x, threshold, mask)

    if memo is None:
        piece = track(f)(a, b, z, direction)
        return piece.lo, piece.hi, jnp.all(piece.out == roi_obs)
    piece, memo = track_memo(f)(a, b, z, direction, memo)
    return piece.lo, piece.hi, jnp.all(piece.out == roi_obs), memo


@functools.partial(
    jax.jit,
    static_argnames=("spec", "policy", "termination", "max_pieces", "memoization"),
)
def _search(params, z_obs, precision, alpha, margin, *, spec, policy, termination,
            max_pieces, memoization):  # fmt: skip
    fn, inputs, a, b, threshold, mask, _ = params
    memo = None
    if memoization:
        memo = memo_init(lambda x: _roi(spec, fn, inputs, x, threshold, mask), a, b)
    return search(
        functools.partial(_piece, spec=spec),
        params,
        z_obs,
        policy=policy,
        termination=termination,
        alternative="two-sided",
        precision=precision,
        alpha=alpha,
        max_pieces=max_pieces,
        margin=margin,
        memo=memo,
    )


@functools.partial(jax.jit, static_argnames=("spec",))
def _memo_start(params, *, spec):
    fn, inputs, a, b, threshold, mask, _ = params
    return memo_init(lambda x: _roi(spec, fn, inputs, x, threshold, mask), a, b)


@functools.partial(jax.jit, static_argnames=("spec",))
def _piece_jit(params, z, memo, *, spec):
    # sicore asks for pieces at points inside them (a breakpoint plus its step, a
    # midpoint), so the side of a breakpoint does not matter: +1.
    return _piece(params, z, jnp.asarray(1, jnp.int32), memo, spec=spec)


def _host_oracle(params, spec: _Spec, memoization: bool, target: float):
    """oracle(z) -> (lo, hi, accept) for the host search: one compiled, tracked
    evaluation of the region per piece. With memoization, one memo per side of
    the strategy's target (the walks right and left each continue from theirs)."""
    memos = {}
    if memoization:
        memos[True] = memos[False] = _memo_start(params, spec=spec)

    def oracle(z: float):
        zj = jnp.asarray(z, jnp.float64)
        if memoization:
            side = z >= target
            lo, hi, accept, memos[side] = _piece_jit(params, zj, memos[side], spec=spec)
        else:
            lo, hi, accept = _piece_jit(params, zj, None, spec=spec)
        return float(lo), float(hi), bool(accept)

    return oracle


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Which search runs: sicore's options after its own dispatch."""

    mode: str  # "parametric", "exhaustive" or "over_conditioning"
    host: bool  # sicore's loop on the host (hs), else the compiled search
    n_jobs: int  # > 1: sicore's parallel chunks
    strategy: Any  # "pi1" / "pi2" / "pi3" or a callable
    termination: Any  # "precision" / "decision" or a callable
    step: float


@functools.partial(jax.jit, static_argnames=("spec",))
def _observe(full, fn, inputs, threshold, mask, *, spec):
    """The network's outputs, the score map and the region at the data, as
    si4onnx's construct_hypothesis computes them (normalisation by division)."""
    outs = full(*inputs)
    x = inputs[spec.i_idx]
    if spec.sigmoid:
        s = jax.nn.sigmoid(fn(*inputs))
        roi = jnp.squeeze(_roi(spec, fn, inputs, x, threshold, mask))
        return outs, jnp.squeeze(s), roi
    s = fn(*inputs)
    for op in spec.post_process:
        s = op(s, x)
    if spec.use_norm:
        s = (s - jnp.min(s)) / (jnp.max(s) - jnp.min(s))
    s = jnp.squeeze(s)
    roi = s > threshold
    if spec.has_mask:
        roi = roi & mask
    return outs, s, roi


# --------------------------------------------------------------------- helpers


def _array(x) -> np.ndarray:
    """float64 NumPy array of a NumPy array or anything with ``__array__`` (a torch
    tensor is detached and moved to the CPU first; torch is never imported)."""
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "cpu"):
        x = x.cpu()
    return np.asarray(x, dtype=np.float64)


def _covariance_times(var, eta: np.ndarray) -> np.ndarray:
    """Sigma eta for sicore's ``var``: a scalar (Sigma = var I), a 1-D array (the
    diagonal) or a 2-D array (Sigma itself)."""
    if isinstance(var, int | float | np.number):
        return float(var) * eta
    v = _array(var)
    if v.ndim == 0:
        return float(v) * eta
    if v.ndim == 1:
        if v.shape != eta.shape:
            raise InputError(f"var has shape {v.shape}, the data {eta.shape}")
        return v * eta
    if v.shape != (eta.size, eta.size):
        raise InputError(f"var has shape {v.shape}, need {(eta.size, eta.size)}")
    return v @ eta


# ----------------------------------------------------------------------- model


class SelectiveInferenceModel:
    """Base class (si4onnx's abstract model); see
    :class:`PresetSelectiveInferenceModel`."""


class PresetSelectiveInferenceModel(SelectiveInferenceModel):
    """An ONNX network with a preset hypothesis (what :func:`load` returns).

    Attributes after :meth:`inference`: ``output``, ``score_map``, ``roi``,
    ``non_roi`` of the last call (as si4onnx's model keeps them).
    """

    def __init__(self, model, hypothesis: PresetHypothesis, seed=None,
                 memoization: bool = True):  # fmt: skip
        proto = _as_proto(model)
        data = proto.SerializeToString()
        digest = hashlib.sha1(data).hexdigest()
        self.full, self.fn, self.sigmoid = _functions(digest, data, hypothesis.o_idx)
        self.hypothesis = hypothesis
        self.seed = seed
        self.memoization = bool(memoization)
        random = [t for t in self.full.op_types if t.startswith("RandomNormal")]
        if random:
            warnings.warn(
                f"the graph draws random numbers ({sorted(set(random))}): sijax "
                "fixes them from each node's own seed, not from si4onnx's seed "
                "stream, so the numbers (and the results) differ from si4onnx's",
                stacklevel=3,
            )
        if self.sigmoid and hypothesis.use_norm and hypothesis.post_process:
            raise ValueError(
                "use_sigmoid is True, so cannot specify use_norm or post_process."
            )
        self.output = self.score_map = self.roi = self.non_roi = None

    def _inputs(self, input) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
        """(network inputs, reference image or None) from si4onnx's ``input``."""
        h = self.hypothesis
        ref = None
        if isinstance(h, ReferenceMeanDiff):
            if not isinstance(input, tuple) or len(input) != 2:
                raise ValueError(
                    f"Input must be a tuple of length 2, got {type(input).__name__}"
                )
            input, ref = input
            if ref is None:
                raise ValueError("reference_data is not set.")
            ref = _array(ref)
        xs = list(input) if isinstance(input, list | tuple) else [input]
        xs = tuple(_array(x) for x in xs)
        names = self.full.input_names
        if len(xs) != len(names):
            raise InputError(f"the graph takes inputs {names}, got {len(xs)} arrays")
        if not 0 <= h.i_idx < len(xs):
            raise InputError(f"i_idx={h.i_idx} but the graph has inputs {names}")
        return xs, ref

    def inference(
        self,
        input,
        var,
        mask=None,
        *,
        inference_mode: str = "parametric",
        search_strategy="pi3",
        termination_criterion="precision",
        max_iter: int = 100_000,
        n_jobs: int = 1,
        step: float = 1e-6,
        significance_level: float = 0.05,
        precision: float = 0.001,
        progress: bool = False,
    ) -> InferenceResult:
        """The selective test of the region the network finds in ``input``.

        Args:
          input: an array (one network input), a list of arrays (several inputs),
            or for :class:`ReferenceMeanDiff` a tuple (input, reference image).
            NumPy arrays or anything with ``__array__`` (torch tensors included).
          var: the noise covariance of the data: a scalar, a 1-D array (diagonal)
            or a 2-D matrix (for the reference hypothesis, of (input, reference)).
          mask: optional bool array of the squeezed score map's shape; the region
            and the comparison set are restricted to it.
          inference_mode: "parametric" (default), "exhaustive" or
            "over_conditioning".
          search_strategy: sicore's "pi3" (default: grow the searched interval
            on the side of larger N(0, 1) density; one compiled loop), "pi1" (the
            side nearer the statistic), "pi2" (the piece of the statistic, then
            grow around 0), or a callable ``fn(searched: RealSubset) -> z``. The
            last three run sicore's loop on the host around the compiled piece
            oracle (:mod:`sijax.si4onnx.host_search`), with sicore's ``step``.
            As in sicore, "exhaustive" follows the strategy too and
            "over_conditioning" ignores it.
          termination_criterion: "precision" (default), "decision", or a callable
            ``fn(searched, truncated) -> bool | float`` (stop on True or 1.0).
          max_iter: most pieces evaluated; more raise :class:`InfiniteLoopError`.
          n_jobs: > 1: sicore's parallel search (the exhaustive range cut into
            ``n_jobs`` chunks, each covered by midpoints), run one chunk after the
            other: the same pieces and ``search_count`` as sicore. -1 (where sicore
            3.0.0 fails) runs ``inference_mode="exhaustive"``; 0 and < -1 are 1.
          step: sicore's step past a searched end for the host strategies; the
            compiled "pi3" asks for the next piece at the breakpoint itself.
          significance_level: alpha of the "decision" criterion.
          precision: the "precision" criterion stops once sup_p - inf_p < precision.
          progress: accepted for compatibility (no progress bar).

        Returns:
          :class:`InferenceResult`.

        Raises:
          NoHypothesisError: empty region or comparison set.
          sijax.NotPiecewiseLinearError: an operation that is not piecewise linear
            on the data path (names it).
          InfiniteLoopError: ``max_iter`` reached.
        """
        del progress
        if inference_mode not in MODES:
            raise InputError(f"{inference_mode=} must be one of {MODES}")
        n_jobs = int(n_jobs)
        if n_jobs == -1:
            # sicore 3.0.0 fails here (no job is started, and the p-value of the
            # empty Zset raises); "all cores" of an exhaustive search is meant, and
            # every exhaustive order gives the same Zset and p-value.
            inference_mode, search_strategy = "exhaustive", "pi3"
            termination_criterion = "precision"
        host = (
            n_jobs > 1
            or callable(termination_criterion)
            or callable(search_strategy)
            or (search_strategy != "pi3" and inference_mode != "over_conditioning")
        )
        if n_jobs <= 1:
            if (
                not callable(search_strategy)
                and search_strategy not in ("pi1", "pi2", "pi3")
                and inference_mode != "over_conditioning"
            ):
                raise InputError(
                    f"search_strategy={search_strategy!r} must be 'pi1', 'pi2', "
                    "'pi3' or a callable"
                )
            if (
                not callable(termination_criterion)
                and termination_criterion not in ("precision", "decision")
                and inference_mode == "parametric"
            ):
                raise InputError(
                    f"termination_criterion={termination_criterion!r} must be "
                    "'precision', 'decision' or a callable"
                )
        plan = _Plan(
            mode=inference_mode,
            host=host,
            n_jobs=n_jobs if n_jobs > 1 else 1,
            strategy=search_strategy,
            termination=termination_criterion,
            step=float(step),
        )
        with jax.default_matmul_precision("highest"):  # no TF32 on GPUs
            return self._inference(
                input, var, mask, plan, max_iter, significance_level, precision
            )

    def _inference(self, input, var, mask, plan, max_iter, significance_level,
                   precision):  # fmt: skip
        h = self.hypothesis
        xs, ref = self._inputs(input)
        m = None if mask is None else np.asarray(_array(mask), bool)
        spec = _Spec(h.i_idx, h.post_process, h.use_norm, self.sigmoid, m is not None)
        inputs = tuple(jnp.asarray(x) for x in xs)
        thr = jnp.asarray(h.threshold, jnp.float64)
        m_j = jnp.ones((), bool) if m is None else jnp.asarray(m)
        outs, score, roi = _observe(self.full, self.fn, inputs, thr, m_j, spec=spec)
        outs = (outs,) if not isinstance(outs, tuple) else outs
        roi = np.asarray(roi).astype(np.int32)
        self.output = np.asarray(outs[0]) if len(outs) == 1 else [
            np.asarray(o) for o in outs
        ]  # fmt: skip
        self.score_map, self.roi = np.asarray(score), roi
        other = h.comparison(roi, m)
        self.non_roi = other

        x = xs[h.i_idx]
        n = x.size
        if roi.size != n:
            raise InputError(
                f"the region has {roi.size} elements but input {h.i_idx} has {n}: "
                "the score map must have the tested input's size"
            )
        data = x.reshape(-1) if ref is None else np.concatenate(
            [x.reshape(-1), ref.reshape(-1)]
        )  # fmt: skip
        eta = h.eta(roi, other)
        if np.any(np.isnan(eta)):
            raise NoHypothesisError
        sigma_eta = _covariance_times(var, eta)
        sd = float(np.sqrt(eta @ sigma_eta))
        z_obs = float(eta @ data) / sd
        if not math.isfinite(z_obs):
            raise NoHypothesisError
        b_full = sigma_eta / sd
        a_full = data - z_obs * b_full
        a = jnp.asarray(a_full[:n].reshape(x.shape))
        b = jnp.asarray(b_full[:n].reshape(x.shape))

        params = (self.fn, inputs, a, b, thr, m_j, jnp.asarray(roi.astype(bool)))
        if plan.host:
            found = self._host_search(
                params, spec, z_obs, plan, max_iter, significance_level, precision
            )
        else:
            found = self._compiled_search(
                params, spec, z_obs, plan, max_iter, significance_level, precision
            )
        searched, truncated, count, detect, p, inf_p, sup_p = found
        return InferenceResult(
            stat=z_obs * sd,
            p_value=p,
            inf_p=inf_p,
            sup_p=sup_p,
            searched_intervals=[[lo * sd, hi * sd] for lo, hi in searched],
            truncated_intervals=[[lo * sd, hi * sd] for lo, hi in truncated],
            search_count=count,
            detect_count=detect,
            null_rv=stats.norm(loc=0.0, scale=sd),
            alternative="two-sided",
            output=self.output,
            score_map=self.score_map,
            roi=self.roi,
            non_roi=self.non_roi,
            z=z_obs,
        )

    def _compiled_search(self, params, spec, z_obs, plan, max_iter,
                         significance_level, precision):  # fmt: skip
        """sicore's "pi3" search (and "exhaustive", "over_conditioning") as one
        compiled ``lax.while_loop``."""
        oc = plan.mode == "over_conditioning"
        # Over-conditioning is the parametric search stopped after its first piece
        # (precision = inf): its p-value and its bounds over the unsearched line are
        # those sicore reports, and it shares the parametric search's compile.
        res = _search(
            params,
            jnp.asarray(z_obs),
            jnp.asarray(math.inf if oc else float(precision)),
            jnp.asarray(float(significance_level)),
            jnp.asarray(10.0),
            spec=spec,
            policy="parametric" if oc else plan.mode,
            termination=plan.termination if plan.mode == "parametric" else "precision",
            max_pieces=int(max_iter),
            memoization=self.memoization,
        )
        res = jax.device_get(res)
        status = int(res.status)
        if status == SearchStatus.MAX_PIECES:
            raise InfiniteLoopError(
                f"The search was performed {max_iter} times (max_iter) and did not "
                "finish"
            )
        if status != SearchStatus.OK:
            raise SearchError(SearchStatus.MESSAGES.get(status, str(status)))
        searched = [
            (float(res.searched.bounds[0, 0]), float(res.searched.bounds[0, 1]))
        ]
        return (
            searched, to_list(res.truncated), int(res.search_count), None,
            float(res.p_value), float(res.inf_p), float(res.sup_p),
        )  # fmt: skip

    def _host_search(self, params, spec, z_obs, plan, max_iter, significance_level,
                     precision):  # fmt: skip
        """sicore's loop on the host (:mod:`sijax.si4onnx.host_search`) around the
        compiled piece oracle: "pi1", "pi2", callables and ``n_jobs > 1``."""
        target = 0.0 if plan.strategy == "pi2" else z_obs
        oracle = _host_oracle(params, spec, self.memoization, target)
        try:
            if plan.n_jobs > 1:
                res = hs.parallel_search(oracle, z_obs, plan.n_jobs, int(max_iter))
            else:
                res = hs.host_search(
                    oracle,
                    z_obs,
                    hs.strategy(plan.mode, plan.strategy, z_obs, plan.step),
                    hs.termination(
                        plan.mode,
                        plan.termination,
                        z_obs,
                        float(precision),
                        float(significance_level),
                    ),  # fmt: skip
                    int(max_iter),
                )
        except hs.LoopError as e:
            raise InfiniteLoopError(str(e)) from None
        return (
            res.searched.tolist(), res.truncated.tolist(), res.search_count,
            res.detect_count, res.p_value, res.inf_p, res.sup_p,
        )  # fmt: skip


def load(model, hypothesis: PresetHypothesis, seed=None,
         memoization: bool = True) -> PresetSelectiveInferenceModel:  # fmt: skip
    """si4onnx's ``load``: an ONNX network and a preset hypothesis as a model whose
    :meth:`~PresetSelectiveInferenceModel.inference` runs the selective test.

    Args:
      model: an ``onnx.ModelProto`` (also a path or the serialised bytes).
      hypothesis: :class:`BackMeanDiff`, :class:`NeighborMeanDiff` or
        :class:`ReferenceMeanDiff`.
      seed: accepted for compatibility (si4onnx seeds RandomNormalLike with it;
        sijax draws from each node's own seed and warns when the graph has one).
      memoization: reuse the unchanged part of the network between neighbouring
        pieces (:func:`sijax.tracking.track_memo`); same pieces, less work.

    Raises:
      ValueError: ``hypothesis`` is not a preset hypothesis.
      sijax.onnx.UnsupportedOperatorError: an operator sijax cannot import (names
        the node).
    """
    if not isinstance(hypothesis, PresetHypothesis):
        raise ValueError("hypothesis should be an instance of PresetHypothesis")
    if not jax.config.jax_enable_x64:
        # load() is this API's entry point (a si4onnx script has no JAX set-up of
        # its own): the test runs in float64, as si4onnx's.
        jax.config.update("jax_enable_x64", True)
    return PresetSelectiveInferenceModel(model, hypothesis, seed, memoization)
