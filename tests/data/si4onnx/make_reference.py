"""Reference outputs of si4onnx 0.1.13 + sicore 3.0.0 for tests/test_si4onnx.py.

Builds small networks in PyTorch (U-Nets with Conv, LeakyReLU, MaxPool, ConvTranspose
and skip concatenations, as si4onnx's own examples; a 3-channel autoencoder; a graph
with two inputs and two outputs; a 1-D U-Net; a sigmoid-output segmenter), exports
them to ONNX (committed next to this file), runs si4onnx on every case of ``CASES``
and writes ``reference.json`` (the calls and their scalar results) and
``reference.npz`` (inputs, masks, ROIs, score maps, outputs).

si4onnx pins numpy < 2, so this runs in its own virtual environment, never in
sijax's::

    python3 -m venv /work/venv_si4onnx
    /work/venv_si4onnx/bin/pip install si4onnx==0.1.13 sicore==3.0.0 onnx torch
    /work/venv_si4onnx/bin/python tests/data/si4onnx/make_reference.py

The tests read only the files this writes; they need neither torch nor si4onnx.
"""

from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
import onnx
import si4onnx
import sicore
import torch
import torch.nn.functional as F  # noqa: N812
from si4onnx.hypothesis import NoHypothesisError
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ the networks


def _double_conv(cin, cout, conv):
    return nn.Sequential(conv(cin, cout, 3, padding=1), nn.LeakyReLU(),
                         conv(cout, cout, 3, padding=1), nn.LeakyReLU())  # fmt: skip


class UNet(nn.Module):
    """si4onnx's example U-Net (tests/build_models/unet.py), channels 4/8/16."""

    def __init__(self, dim: int = 2, ch=(4, 8, 16)):
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv1d
        convt = nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose1d
        self.pool = nn.MaxPool2d(2) if dim == 2 else nn.MaxPool1d(2)
        self.inc = _double_conv(1, ch[0], conv)
        self.down1 = _double_conv(ch[0], ch[1], conv)
        self.down2 = _double_conv(ch[1], ch[2], conv)
        self.up1 = convt(ch[2], ch[1], 2, stride=2)
        self.conv1 = _double_conv(2 * ch[1], ch[1], conv)
        self.up2 = convt(ch[1], ch[0], 2, stride=2)
        self.conv2 = _double_conv(2 * ch[0], ch[0], conv)
        self.outc = conv(ch[0], 1, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(self.pool(x1))
        x3 = self.down2(self.pool(x2))
        x = self.conv1(torch.cat([x2, self.up1(x3)], dim=1))
        x = self.conv2(torch.cat([x1, self.up2(x)], dim=1))
        return self.outc(x)


class TinyUNet(nn.Module):
    """The same operators as :class:`UNet` at 8x8 with one level (fast to compile):
    Conv, LeakyReLU, MaxPool, ConvTranspose, a skip concatenation."""

    def __init__(self):
        super().__init__()
        self.inc = nn.Conv2d(1, 3, 3, padding=1)
        self.down = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 2, stride=2)
        self.outc = nn.Conv2d(6, 1, 1)

    def forward(self, x):
        x1 = F.leaky_relu(self.inc(x), 0.1)
        x2 = F.leaky_relu(self.down(F.max_pool2d(x1, 2)))
        return self.outc(torch.cat([x1, self.up(x2)], dim=1))


class AE3(nn.Module):
    """A 3-channel convolutional autoencoder (Conv, ReLU, AveragePool, bilinear
    Resize)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.avg_pool2d(h, 2)
        h = F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=False)
        return self.c2(h)


class TwoIO(nn.Module):
    """Two inputs (x, y), two outputs: the selected one and another branch."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 1, 3, padding=1)
        self.c = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x, y):
        h = F.relu(self.a(x) + y)
        return F.relu(self.c(y - x)), self.b(h)


class Segmenter(nn.Module):
    """A sigmoid output (si4onnx thresholds the logit: its ``use_sigmoid``)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        return torch.sigmoid(self.b(F.relu(self.a(x))))


def _remove_identities(proto) -> None:
    """Rewires around Identity nodes (si4onnx 0.1.13 has no Identity operator)."""
    g = proto.graph
    outputs = {o.name for o in g.output}
    alias, keep = {}, []
    for n in g.node:
        if n.op_type == "Identity" and n.output[0] not in outputs:
            alias[n.output[0]] = alias.get(n.input[0], n.input[0])
        else:
            keep.append(n)
    for n in keep:
        for i, name in enumerate(n.input):
            n.input[i] = alias.get(name, name)
    del g.node[:]
    g.node.extend(keep)


def export(name: str, module: nn.Module, shapes, n_out: int = 1) -> onnx.ModelProto:
    torch.manual_seed({"unet2d": 0, "unet1d": 1, "ae3": 2, "two_io": 3,
                       "segmenter": 4, "tiny2d": 5}[name])  # fmt: skip
    module = module.eval()
    # Re-initialise under the seed so that the weights do not depend on call order.
    for p in module.parameters():
        with torch.no_grad():
            p.copy_(torch.randn_like(p) * (1.0 / np.sqrt(max(p[0].numel(), 1))))
    # Small outputs: the score is then mostly the input itself, and a threshold of
    # about 1 selects a few pixels around the planted square, as in the DAL test.
    last = list(module.parameters())[-2:]
    with torch.no_grad():
        for p in last:
            p.mul_(0.2)
    args = tuple(torch.zeros(s) for s in shapes)
    path = os.path.join(HERE, f"{name}.onnx")
    ins = ["x", "y"][: len(shapes)]
    outs = ["out", "aux"][:n_out]
    with torch.no_grad():
        torch.onnx.export(module, args, path, opset_version=13, dynamo=False,
                          input_names=ins, output_names=outs)  # fmt: skip
    proto = onnx.load(path)
    _remove_identities(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return proto


# ------------------------------------------------------------------------ cases

RNG = np.random.default_rng(2026)


def _img(shape, signal=0.0, square=None):
    x = RNG.normal(size=shape)
    if square is not None:
        sl = tuple(slice(a, b) for a, b in square)
        x[(0, 0) + sl] += signal
    return x


def _ops(spec):
    """Operators from their JSON spec: [["InputDiff"], ["AverageFilter", 3], ...]."""
    out = []
    for name, *args in spec:
        cls = getattr(si4onnx.operators, name)
        out.append(cls(*args))
    return out


def _hyp(spec):
    cls = getattr(si4onnx.hypothesis, spec["class"])
    kw = {k: v for k, v in spec.items() if k not in ("class", "post_process")}
    return cls(post_process=_ops(spec.get("post_process", [])), **kw)


DAL = [["InputDiff"], ["AverageFilter", 3], ["Abs"]]
# si4onnx.load options per case. With its memoization on, si4onnx 0.1.13 fails an
# assertion (l <= z <= u in Abs.forward_si) on the second output of a two-output
# graph: the memo restarts from a node whose interval belongs to the other output.
LOAD = {"two_io_i0_o1": {"memoization": False}}


def cases():
    """(name, model, hypothesis spec, inputs, var, mask, inference kwargs)."""
    x16 = _img((1, 1, 16, 16), 2.5, ((4, 9), (5, 10)))
    r16 = _img((1, 1, 16, 16))
    x32 = _img((1, 1, 32), 2.0, ((10, 16),))
    x3 = _img((1, 3, 8, 8), 2.0, ((2, 5), (2, 5)))
    x8 = _img((1, 1, 8, 8), 2.0, ((1, 4), (2, 5)))
    y8 = _img((1, 1, 8, 8))
    r8 = _img((1, 1, 8, 8))
    x8b = _img((1, 1, 8, 8))
    mask8 = np.ones((8, 8), bool)
    mask8[:, 6:] = False
    cov = 0.5 ** np.abs(np.subtract.outer(np.arange(128), np.arange(128)))
    out = []
    hyp_back = {"class": "BackMeanDiff", "threshold": 1.0, "post_process": DAL}
    hyp_nb = {"class": "NeighborMeanDiff", "threshold": 1.0, "neighborhood_range": 1,
              "post_process": DAL}  # fmt: skip
    hyp_ref = {"class": "ReferenceMeanDiff", "threshold": 1.0, "post_process": DAL}
    modes = {
        "param": {},
        "exh": {"inference_mode": "exhaustive"},
        "oc": {"inference_mode": "over_conditioning"},
    }
    for tag, hyp, inp in (("back", hyp_back, x8), ("neighbor", hyp_nb, x8),
                          ("reference", hyp_ref, (x8, r8))):  # fmt: skip
        for mname, kw in modes.items():
            out.append((f"tiny2d_{tag}_{mname}", "tiny2d", hyp, inp, 1.0, None, kw))
    out += [
        ("tiny2d_back_decision", "tiny2d", hyp_back, x8, 1.0, None,
         {"termination_criterion": "decision", "significance_level": 0.05}),
        ("tiny2d_back_precision1e-4", "tiny2d", hyp_back, x8, 1.0, None,
         {"precision": 1e-4}),
        ("tiny2d_back_null", "tiny2d", hyp_back, x8b, 1.0, None, {}),
        ("tiny2d_back_mask", "tiny2d", hyp_back, x8, 1.0, mask8, {}),
        ("tiny2d_neighbor_r2_mask", "tiny2d",
         {**hyp_nb, "neighborhood_range": 2}, x8, 1.0, mask8, {}),
        ("tiny2d_back_vardiag", "tiny2d", hyp_back, x8, 1.0, None, {}),
        ("tiny2d_reference_corr", "tiny2d", hyp_ref, (x8, r8), cov, None, {}),
        ("unet2d_back_param", "unet2d", {**hyp_back, "threshold": 1.2}, x16, 1.0,
         None, {}),
        ("unet2d_reference_exh", "unet2d", {**hyp_ref, "threshold": 1.2},
         (x16, r16), 1.0, None, {"inference_mode": "exhaustive"}),
        # The other operators and use_norm.
        ("tiny2d_back_gauss_neg", "tiny2d",
         {"class": "BackMeanDiff", "threshold": 0.5,
          "post_process": [["InputDiff"], ["GaussianFilter", 3, 1.0], ["Neg"]]},
         x8, 1.0, None, {}),
        ("tiny2d_back_norm", "tiny2d",
         {"class": "BackMeanDiff", "threshold": 0.6, "use_norm": True,
          "post_process": [["InputDiff"], ["Abs"]]}, x8, 1.0, None, {}),
        ("tiny2d_back_norm_exh", "tiny2d",
         {"class": "BackMeanDiff", "threshold": 0.6, "use_norm": True,
          "post_process": [["InputDiff"], ["Abs"]]}, x8, 1.0, None,
         {"inference_mode": "exhaustive"}),
        ("ae3_back_l1", "ae3",
         {"class": "BackMeanDiff", "threshold": 2.5,
          "post_process": [["InputDiff"], ["L1Norm"]]}, x3, 1.0, None, {}),
        ("ae3_back_l1_exh", "ae3",
         {"class": "BackMeanDiff", "threshold": 2.5,
          "post_process": [["InputDiff"], ["L1Norm"]]}, x3, 1.0, None,
         {"inference_mode": "exhaustive"}),
        ("two_io_i0_o1", "two_io",
         {"class": "BackMeanDiff", "threshold": 1.0, "i_idx": 0, "o_idx": 1,
          "post_process": [["InputDiff"], ["Abs"]]}, [x8, y8], 1.0, None, {}),
        ("two_io_i1_o0", "two_io",
         {"class": "ReferenceMeanDiff", "threshold": 1.0, "i_idx": 1, "o_idx": 0},
         ([y8, x8], _img((1, 1, 8, 8))), 1.0, None, {}),
        ("segmenter_back", "segmenter",
         {"class": "BackMeanDiff", "threshold": 0.52}, x8, 1.0, None, {}),
        ("segmenter_back_exh", "segmenter",
         {"class": "BackMeanDiff", "threshold": 0.52}, x8, 1.0, None,
         {"inference_mode": "exhaustive"}),
        # si4onnx's own example scripts (tests/sample_back.py, sample_neighbor.py,
        # sample_reference.py), scaled down: 16x16 instead of 64x64 and 28x28,
        # a 32-sample 1-D signal and neighborhood_range 2 instead of 128 and 20.
        ("example_back", "unet2d",
         {"class": "BackMeanDiff", "threshold": 0.95, "use_norm": True,
          "post_process": [["InputDiff"], ["Abs"], ["GaussianFilter", 3, 1.0]]},
         x16, 1.0, None, {}),
        ("example_back_oc", "unet2d",
         {"class": "BackMeanDiff", "threshold": 0.95, "use_norm": True,
          "post_process": [["InputDiff"], ["Abs"], ["GaussianFilter", 3, 1.0]]},
         x16, 1.0, None, {"inference_mode": "over_conditioning"}),
        ("example_neighbor", "unet1d",
         {"class": "NeighborMeanDiff", "threshold": 0.95, "neighborhood_range": 2,
          "i_idx": 0, "o_idx": 0, "use_norm": True,
          "post_process": [["GaussianFilter", 3, 1.0]]}, x32, 1.0, None, {}),
        ("example_neighbor_oc", "unet1d",
         {"class": "NeighborMeanDiff", "threshold": 0.95, "neighborhood_range": 2,
          "i_idx": 0, "o_idx": 0, "use_norm": True,
          "post_process": [["GaussianFilter", 3, 1.0]]}, x32, 1.0, None,
         {"inference_mode": "over_conditioning"}),
        ("example_reference", "unet2d",
         {"class": "ReferenceMeanDiff", "threshold": 0.8, "i_idx": 0, "o_idx": 0,
          "use_norm": True}, (x16, r16), 1.0, None, {}),
        ("example_reference_oc", "unet2d",
         {"class": "ReferenceMeanDiff", "threshold": 0.8, "i_idx": 0, "o_idx": 0,
          "use_norm": True}, (x16, r16), 1.0, None,
         {"inference_mode": "over_conditioning"}),
        ("tiny2d_back_empty", "tiny2d",
         {"class": "BackMeanDiff", "threshold": 50.0, "post_process": DAL},
         x8, 1.0, None, {}),
        # sicore's other search strategies, its exhaustive mode with one of them
        # (sicore's exhaustive search follows the strategy), callables, n_jobs.
        ("tiny2d_back_pi1", "tiny2d", hyp_back, x8, 1.0, None,
         {"search_strategy": "pi1"}),
        ("tiny2d_back_pi1_decision", "tiny2d", hyp_back, x8, 1.0, None,
         {"search_strategy": "pi1", "termination_criterion": "decision"}),
        ("tiny2d_back_pi2", "tiny2d", hyp_back, x8, 1.0, None,
         {"search_strategy": "pi2"}),
        ("tiny2d_back_pi2_decision", "tiny2d", hyp_back, x8, 1.0, None,
         {"search_strategy": "pi2", "termination_criterion": "decision"}),
        ("tiny2d_neighbor_pi2_exh", "tiny2d", hyp_nb, x8, 1.0, None,
         {"search_strategy": "pi2", "inference_mode": "exhaustive"}),
        ("tiny2d_back_callables", "tiny2d", hyp_back, x8, 1.0, None,
         {"search_strategy": "@walk_right", "termination_criterion": "@right_of_7"}),
        ("tiny2d_back_pi3_measure", "tiny2d", hyp_back, x8, 1.0, None,
         {"termination_criterion": "@measure_over_4"}),
        ("tiny2d_back_njobs2", "tiny2d", hyp_back, x8, 1.0, None, {"n_jobs": 2}),
        ("tiny2d_neighbor_njobs3", "tiny2d", hyp_nb, x8, 1.0, None, {"n_jobs": 3}),
    ]  # fmt: skip
    # A diagonal variance (one entry per pixel), as an array.
    i = [c[0] for c in out].index("tiny2d_back_vardiag")
    var = np.linspace(0.5, 1.5, 64)
    out[i] = out[i][:4] + (var,) + out[i][5:]
    return out


# Callable search strategies and termination criteria of sicore (in units of the
# standardised statistic), named in the JSON as "@name"; tests/test_si4onnx.py
# defines the same functions.
CALLABLES = {
    # walk right from z = 2, one piece at a time
    "walk_right": lambda s: 2.0 if s.is_empty() else s[-1][1] + 1e-6,
    "right_of_7": lambda s, t: s[-1][1] > 7.0,
    "measure_over_4": lambda s, t: 1.0 if s.measure > 4.0 else 0.0,
}


def _kwargs(kw):
    return {k: CALLABLES[v[1:]] if isinstance(v, str) and v.startswith("@") else v
            for k, v in kw.items()}  # fmt: skip


def _flat_inputs(inp):
    """{key: array} of a case's inputs (x, list [x, y], or tuple (x, ref))."""
    if isinstance(inp, tuple):
        first, ref = inp
        d = {f"in{k}": v for k, v in enumerate(first)} if isinstance(first, list) \
            else {"in0": first}  # fmt: skip
        return d, "reference_list" if isinstance(first, list) else "reference", ref
    if isinstance(inp, list):
        return {f"in{k}": v for k, v in enumerate(inp)}, "list", None
    return {"in0": inp}, "single", None


def _to_torch(inp):
    if isinstance(inp, tuple):
        return tuple(_to_torch(v) for v in inp)
    if isinstance(inp, list):
        return [torch.from_numpy(v) for v in inp]
    return torch.from_numpy(inp)


def main() -> None:
    torch.set_num_threads(1)
    protos = {
        "unet2d": export("unet2d", UNet(2), [(1, 1, 16, 16)]),
        "unet1d": export("unet1d", UNet(1), [(1, 1, 32)]),
        "tiny2d": export("tiny2d", TinyUNet(), [(1, 1, 8, 8)]),
        "ae3": export("ae3", AE3(), [(1, 3, 8, 8)]),
        "two_io": export("two_io", TwoIO(), [(1, 1, 8, 8), (1, 1, 8, 8)], n_out=2),
        "segmenter": export("segmenter", Segmenter(), [(1, 1, 8, 8)]),
    }
    records, arrays = [], {}
    for name, model, hyp, inp, var, mask, kw in cases():
        si_model = si4onnx.load(
            protos[model], hypothesis=_hyp(hyp), **LOAD.get(name, {})
        )
        ins, kind, ref = _flat_inputs(inp)
        for k, v in ins.items():
            arrays[f"{name}/{k}"] = v
        if ref is not None:
            arrays[f"{name}/ref"] = ref
        if mask is not None:
            arrays[f"{name}/mask"] = mask
        var_key = None
        if isinstance(var, np.ndarray):
            var_key = f"{name}/var"
            arrays[var_key] = var
        rec = dict(name=name, model=f"{model}.onnx", hypothesis=hyp, inputs=kind,
                   n_inputs=len(ins), var=var_key or var, kwargs=kw,
                   load=LOAD.get(name, {}),
                   mask=mask is not None)  # fmt: skip
        t0 = time.perf_counter()
        try:
            res = si_model.inference(_to_torch(inp), var, mask=mask,
                                     **_kwargs(kw))  # fmt: skip
        except NoHypothesisError:
            rec["error"] = "NoHypothesisError"
            records.append(rec)
            print(f"{name}: NoHypothesisError")
            continue
        sec = time.perf_counter() - t0
        rec.update(
            p_value=float(res.p_value), inf_p=float(res.inf_p),
            sup_p=float(res.sup_p), stat=float(res.stat),
            naive_p_value=float(res.naive_p_value()),
            search_count=int(res.search_count), detect_count=int(res.detect_count),
            truncated_intervals=[[float(a), float(b)] for a, b in
                                 res.truncated_intervals],
            searched_intervals=[[float(a), float(b)] for a, b in
                                res.searched_intervals],
            scale=float(res.null_rv.kwds["scale"]), seconds=sec,
        )  # fmt: skip
        arrays[f"{name}/roi"] = np.asarray(res.roi)
        arrays[f"{name}/score_map"] = np.asarray(res.score_map)
        if res.non_roi is not None:
            arrays[f"{name}/non_roi"] = np.asarray(res.non_roi)
        outs = res.output if isinstance(res.output, list) else [res.output]
        for k, o in enumerate(outs):
            arrays[f"{name}/output{k}"] = np.asarray(o)
        records.append(rec)
        print(f"{name}: p={res.p_value:.10g} [{res.inf_p:.4g}, {res.sup_p:.4g}] "
              f"pieces={res.search_count} roi={int(np.sum(res.roi))} {sec:.2f}s",
              flush=True)  # fmt: skip
    meta = dict(si4onnx="0.1.13", sicore=sicore.__version__ if hasattr(
        sicore, "__version__") else "3.0.0", torch=torch.__version__,
        numpy=np.__version__, python=platform.python_version())  # fmt: skip
    with open(os.path.join(HERE, "reference.json"), "w") as f:
        json.dump(dict(meta=meta, cases=records), f, indent=1)
    np.savez_compressed(os.path.join(HERE, "reference.npz"), **arrays)


if __name__ == "__main__":
    main()
