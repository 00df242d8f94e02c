"""U-Net, schedule and sampler of docs/method.md §6 against independent oracles."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from diffusion_helpers import TINY, random_model
from flax import nnx

from sijax.checkpoint import load_model
from sijax.diffusion.conv import conv2d
from sijax.diffusion.schedule import alpha_bar, linear_schedule
from sijax.diffusion.unet import (
    UNet,
    UNetConfig,
    avg_pool2,
    conv3x3,
    count_params,
    time_embedding,
    upsample_bilinear2x,
)

# --- building blocks -----------------------------------------------------------------

def _torch_bilinear_numpy(x, scale=2):
    """PyTorch's bilinear, align_corners=False, written from its documented formula."""
    def axis_weights(n_in):
        n_out = n_in * scale
        w = np.zeros((n_out, n_in))
        for i in range(n_out):
            src = max((i + 0.5) / scale - 0.5, 0.0)  # clamp below at 0
            i0 = min(int(np.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            lam = src - i0
            w[i, i0] += 1.0 - lam
            w[i, i1] += lam
        return w

    wh, ww = axis_weights(x.shape[1]), axis_weights(x.shape[2])
    return np.einsum("ih,jw,bhwc->bijc", wh, ww, x)


@pytest.mark.parametrize("shape", [(2, 1, 1, 3), (1, 2, 3, 2), (2, 4, 4, 1),
                                   (1, 5, 7, 2)])
def test_upsample_matches_torch_semantics(shape):
    x = np.random.default_rng(1).normal(size=shape)
    got = jax.jit(upsample_bilinear2x)(jnp.asarray(x))
    np.testing.assert_allclose(got, _torch_bilinear_numpy(x), rtol=0, atol=1e-14)
    # Half-pixel corners: the edge output pixels copy the edge input pixels.
    np.testing.assert_allclose(got[:, 0, 0], x[:, 0, 0], atol=1e-15)
    np.testing.assert_allclose(got[:, -1, -1], x[:, -1, -1], atol=1e-15)


def _conv_loops(x, k, pads, strides, dilations):
    """Cross-correlation by plain loops over output pixels and taps."""
    kh, kw, _, cout = k.shape
    (sh, sw), (dh, dw) = strides, dilations
    xp = np.pad(x, ((0, 0), *pads, (0, 0)))
    ho = (xp.shape[1] - (kh - 1) * dh - 1) // sh + 1
    wo = (xp.shape[2] - (kw - 1) * dw - 1) // sw + 1
    out = np.zeros((x.shape[0], ho, wo, cout))
    for p in range(ho):
        for q in range(wo):
            for i in range(kh):
                for j in range(kw):
                    out[:, p, q] += xp[:, p * sh + i * dh, q * sw + j * dw] @ k[i, j]
    return out


@pytest.mark.parametrize("hw,kernel,pads,strides,dilations", [
    ((6, 5), (3, 3), ((1, 1), (1, 1)), (1, 1), (1, 1)),  # 30 pixels: tap products
    ((12, 10), (3, 3), ((1, 1), (1, 1)), (1, 1), (1, 1)),  # 120: XLA's convolution
    ((7, 9), (3, 2), ((2, 0), (1, 3)), (2, 1), (1, 2)),  # 4x11 out, strided, dilated
    ((20, 18), (3, 3), ((0, 1), (2, 1)), (1, 2), (2, 1)),  # 17x10 out
])
@pytest.mark.parametrize("lax_min_pixels", [64, 0, 2**62])  # the rule, lax, taps
def test_conv2d_equals_loops_in_both_formulations(hw, kernel, pads, strides, dilations,
                                                  lax_min_pixels):
    rng = np.random.default_rng(2)
    x, k = rng.normal(size=(3, *hw, 4)), rng.normal(size=(*kernel, 4, 7))
    got = conv2d(jnp.asarray(x), jnp.asarray(k), pads, strides, dilations,
                 lax_min_pixels=lax_min_pixels)
    np.testing.assert_allclose(got, _conv_loops(x, k, pads, strides, dilations),
                               rtol=1e-12, atol=1e-12)


def test_conv3x3_adds_bias_and_keeps_size():
    rng = np.random.default_rng(3)
    x, k, b = rng.normal(size=(2, 4, 4, 3)), rng.normal(size=(3, 3, 3, 5)), \
        rng.normal(size=(5,))
    got = conv3x3(jnp.asarray(x), jnp.asarray(k), jnp.asarray(b))
    np.testing.assert_allclose(got, _conv_loops(x, k, ((1, 1), (1, 1)), (1, 1), (1, 1))
                               + b, rtol=1e-12, atol=1e-12)


def test_avg_pool_and_time_embedding():
    x = np.arange(2 * 4 * 4 * 3, dtype=float).reshape(2, 4, 4, 3)
    ref = x.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(avg_pool2(jnp.asarray(x)), ref, atol=1e-14)
    t = np.array([0.0, 1.0, 115.0, 460.0, 999.0])
    i = np.arange(100)
    # The exponent is i/100 with i itself (docs/method.md §6).
    arg = t[:, None] / 10000.0 ** (i / 100)
    ref = np.where(i % 2 == 0, np.sin(arg), np.cos(arg))
    np.testing.assert_allclose(time_embedding(jnp.asarray(t), 100), ref, atol=1e-13)


# --- the network ---------------------------------------------------------------------

def _n_params(cfg: UNetConfig) -> int:
    abstract = nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0)))
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_dal_v5_parameter_count():
    cfg = UNetConfig()
    n = _n_params(cfg)
    print(f"dal_v5 U-Net (1 channel) parameters: {n}")
    assert n == count_params(cfg) == 1_276_648
    # Colour input changes the first block (MLP 100->3, 3x3, conv 3->32) and the last
    # conv: 212 + 576 + 66 more parameters.
    cfg3 = UNetConfig(in_channels=3)
    assert _n_params(cfg3) == count_params(cfg3)
    assert _n_params(UNetConfig(channels=TINY)) == count_params(
        UNetConfig(channels=TINY))
    assert count_params(cfg3) == 1_276_648 + 854


@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_shapes_and_dtypes(size, in_channels):
    # Tiny widths keep compile time low; depth 3 for 8x8, 4 above.
    channels = (4, 8, 8, 16) if size >= 16 else TINY
    model = random_model(channels, size, in_channels)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, size, size, in_channels)))
    out = jax.jit(jax.vmap(model.denoiser()))(x, jnp.array([0, 999]))
    assert out.shape == x.shape and out.dtype == jnp.float64
    assert np.all(np.isfinite(out))


def test_float32_weights_compute_in_float32():
    model = random_model().astype(jnp.float32)
    out = model.apply(jnp.zeros((1, 8, 8, 1), jnp.float32), jnp.array([5]))
    assert out.dtype == jnp.float32 and out.shape == (1, 8, 8, 1)


def test_committed_dal_v5_models_forward():
    for name, size in (("dal_v5_8", 8), ("dal_v5_16", 16)):
        model = load_model(name)
        assert model.image_shape == (size, size, 1)
        assert model.config.channels == (32, 64, 128, 256)
        out = jax.jit(model.apply)(jnp.zeros((2, size, size, 1)), jnp.array([3, 4]))
        assert out.shape == (2, size, size, 1) and out.dtype == jnp.float64


def test_batchnorm_train_vs_eval():
    model = random_model()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 8, 8, 1)))
    t = jnp.array([1, 2, 3, 4])
    def run(x, t, train):  # a fresh copy: training mode updates the running stats
        return nnx.merge(model.graphdef, model.state, copy=True)(x, t, train=train)

    ev = run(x, t, False)
    # Eval mode: each image is processed on its own.
    np.testing.assert_allclose(run(x[:2], t[:2], False), ev[:2], atol=1e-13)
    tr = run(x, t, True)
    assert not np.allclose(tr, ev)
    assert not np.allclose(run(x[:2], t[:2], True), tr[:2])


def test_eval_network_is_piecewise_linear_along_a_line():
    """Second differences vanish except where a ReLU switches (docs/method.md §4)."""
    eps_fn = jax.jit(random_model().denoiser())
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(8, 8, 1)), rng.normal(size=(8, 8, 1))

    def second_differences(zs):
        f = jax.vmap(lambda z: eps_fn(a + b * z, 230))(jnp.asarray(zs))
        return np.abs(np.asarray(f[2:] - 2 * f[1:-1] + f[:-2])).max(axis=(1, 2, 3))

    # Fine grid: almost every triple lies inside one linear piece.
    d2 = second_differences(np.linspace(-0.01, 0.01, 201))
    assert np.mean(d2 < 1e-11) > 0.8, np.mean(d2 < 1e-11)
    # Coarse grid: the network is not globally linear.
    assert second_differences(np.linspace(-3.0, 3.0, 61)).max() > 1e-6


def test_denoiser_jaxpr_has_only_piecewise_linear_ops():
    """No SiLU/GELU/sigmoid/softmax/normalisation of x: the tracker can follow it."""
    model = random_model()
    jaxpr = jax.make_jaxpr(model.denoiser())(jnp.zeros((8, 8, 1)), 460.0)
    names = set()

    def walk(jp):
        for eqn in jp.eqns:
            names.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert not names & {"logistic", "erf", "tanh", "exp", "log", "reduce_max",
                        "argmax", "div_by_x"}, names
    assert "dot_general" in names and "max" in names  # matmul and ReLU


# --- schedule ------------------------------------------------------------------------

def test_schedule_constants():
    s = linear_schedule()
    assert s.T == 1000 and s.betas[0] == 1e-4 and s.betas[-1] == 0.02
    assert alpha_bar(s, -1) == 1.0
    assert abs(alpha_bar(s, 460) - 0.114760) < 5e-7
    assert abs(float(jax.jit(lambda t: alpha_bar(s, t))(jnp.array(-1))) - 1.0) == 0
    np.testing.assert_allclose(alpha_bar(s, np.array([0, 1])),
                               [1 - 1e-4, (1 - 1e-4) * (1 - s.betas[1])], rtol=1e-15)
