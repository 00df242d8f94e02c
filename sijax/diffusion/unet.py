"""The v5 U-Net of the DAL paper (docs/method.md §6): architecture only.

Every operation at test time is linear or ReLU (convolutions, dense layers, eval-mode
batch-norm, average pooling, bilinear resize, concatenation), so the network is
piecewise linear in its input and the tracker in ``sijax.tracking`` can follow it.
``UNetConfig.activation`` swaps ReLU for an 8-knot piecewise-linear approximation of
SiLU or GELU (v5 Appendix C), built from max and affine operations only.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sijax.diffusion.conv import conv2d
from sijax.errors import InputError


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Hyperparameters of the U-Net (and nothing else).

    Attributes:
        channels: widths of the levels; ``channels[-1]`` is the bottleneck, so the
            depth is ``len(channels)`` and there are ``len(channels) - 1`` poolings.
            The image side must be divisible by ``2 ** (len(channels) - 1)``.
        in_channels: image channels C (1 grey, 3 colour); also the output channels.
        temb_dim: size of the sinusoidal time embedding (100 in the paper).
        bn_momentum: running-average momentum of batch-norm in the Flax convention
            (new = momentum * old + (1 - momentum) * batch); 0.9 equals PyTorch's
            default 0.1.
        bn_epsilon: batch-norm epsilon (PyTorch default 1e-5).
        activation: "relu" (the paper's v5 network), or "pwl_silu" / "pwl_gelu", the
            8-knot piecewise-linear approximations of :data:`PWL_KNOTS` (Appendix C).
    """

    channels: tuple[int, ...] = (32, 64, 128, 256)
    in_channels: int = 1
    temb_dim: int = 100
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    activation: str = "relu"

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if len(self.channels) < 1 or min(self.channels) < 1:
            raise InputError(f"channels must be positive: {self.channels=}")
        if self.activation not in ACTIVATIONS:
            raise InputError(f"{self.activation=} must be one of {ACTIVATIONS}")
        if self.in_channels < 1 or self.temb_dim < 2:
            raise InputError(f"bad {self.in_channels=} or {self.temb_dim=}")

    @property
    def depth(self) -> int:
        return len(self.channels)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (one halving per pooling)."""
        return 2 ** (self.depth - 1)


# Knots of the piecewise-linear activations (v5 Appendix C: 8 knots). Chosen by
# minimising the sup-norm error on [-10, 10] over interpolants that pass through the
# function at the knots, are flat left of the first knot and have slope 1 right of the
# last; the errors are 0.0295 (SiLU) and 0.0189 (GELU).
PWL_KNOTS = {
    "pwl_silu": (-8.0, -4.63, -2.0, -1.22, -0.41, 0.28, 1.04, 5.29),
    "pwl_gelu": (-2.46, -1.6, -0.71, -0.7, -0.22, 0.19, 0.67, 2.45),
}
ACTIVATIONS = ("relu", *PWL_KNOTS)


def _silu(x: float) -> float:
    return x / (1.0 + math.exp(-x))


def _gelu(x: float) -> float:
    return 0.5 * x * (1.0 + math.erf(x / math.sqrt(2.0)))


def pwl_coefficients(name: str) -> tuple[float, tuple[tuple[float, float], ...]]:
    """(v0, ((k_j, ds_j), ...)) with f(x) = v0 + sum_j ds_j max(x - k_j, 0).

    f interpolates SiLU or GELU at the knots k_1 < ... < k_8, is constant f(k_1) left
    of k_1 and has slope 1 right of k_8; ds_j is the change of slope at k_j.
    """
    fn = {"pwl_silu": _silu, "pwl_gelu": _gelu}[name]
    k = PWL_KNOTS[name]
    v = [fn(kj) for kj in k]
    slopes = [0.0]
    slopes += [(v[j + 1] - v[j]) / (k[j + 1] - k[j]) for j in range(len(k) - 1)]
    slopes += [1.0]
    return v[0], tuple((k[j], slopes[j + 1] - slopes[j]) for j in range(len(k)))


def activation_fn(name: str):
    """The activation ``name`` of :data:`ACTIVATIONS` as an elementwise function.

    The piecewise-linear ones use only ``max`` with constants, multiplications by
    constants and additions, so the tracker follows them exactly.
    """
    if name == "relu":
        return jax.nn.relu
    if name not in PWL_KNOTS:
        raise InputError(f"{name=} must be one of {ACTIVATIONS}")
    v0, terms = pwl_coefficients(name)

    def pwl(x: jax.Array) -> jax.Array:
        out = jnp.full_like(x, v0)
        for kj, dsj in terms:
            out = out + dsj * jnp.maximum(x - kj, 0.0)
        return out

    return pwl


def time_embedding(t: jax.Array, dim: int = 100) -> jax.Array:
    """Sinusoidal embedding with the paper's exponent (docs/method.md §6).

    v_i = sin(t / 10000^(i/dim)) for even i and cos(t / 10000^(i/dim)) for odd i,
    i = 0..dim-1 (the exponent uses i itself, not 2*floor(i/2)).

    Args:
        t: (B,) time steps, int or float.
        dim: embedding size.

    Returns:
        (B, dim) embedding in the default float dtype.
    """
    t = jnp.asarray(t, dtype=jnp.result_type(float))
    i = jnp.arange(dim)
    freq = 1.0 / jnp.power(10000.0, i / dim)
    arg = t[:, None] * freq[None, :]
    return jnp.where((i % 2 == 0)[None, :], jnp.sin(arg), jnp.cos(arg))


def upsample_bilinear2x(x: jax.Array) -> jax.Array:
    """Bilinear x2 upsampling with half-pixel centres (align_corners=False).

    Same values as PyTorch's ``F.interpolate(x, scale_factor=2, mode="bilinear",
    align_corners=False)``: output pixel i samples the input at (i + 0.5) / 2 - 0.5,
    clamped at the borders. For a factor of 2 this gives the fixed weights
    out[2j] = 0.75 x[j] + 0.25 x[j-1] and out[2j+1] = 0.75 x[j] + 0.25 x[j+1], with
    x[-1] := x[0] and x[n] := x[n-1]. Written with slices, scalings, adds and a
    reshape only, so it is plainly linear for the tracker.

    Args:
        x: (B, H, W, C).

    Returns:
        (B, 2H, 2W, C).
    """
    return _up2_axis(_up2_axis(x, 1), 2)


def _up2_axis(x: jax.Array, axis: int) -> jax.Array:
    n = x.shape[axis]
    first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
    last = jax.lax.slice_in_dim(x, n - 1, n, axis=axis)
    prev = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, n - 1, axis=axis)], axis)
    nxt = jnp.concatenate([jax.lax.slice_in_dim(x, 1, n, axis=axis), last], axis)
    even = 0.75 * x + 0.25 * prev
    odd = 0.75 * x + 0.25 * nxt
    out = jnp.stack([even, odd], axis=axis + 1)
    shape = list(x.shape)
    shape[axis] = 2 * n
    return out.reshape(shape)


def avg_pool2(x: jax.Array) -> jax.Array:
    """2x2 average pooling with stride 2. (B, H, W, C) -> (B, H/2, W/2, C)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3x3 convolution with zero padding 1 (cross-correlation, as in PyTorch).

    Args:
        x: (B, H, W, cin).
        kernel: (3, 3, cin, cout), HWIO.
        bias: (cout,).

    Returns:
        (B, H, W, cout), computed by :func:`sijax.diffusion.conv.conv2d`.
    """
    return conv2d(x, kernel, ((1, 1), (1, 1))) + bias[None, None, None, :]


class Conv3x3(nnx.Module):
    """3x3 convolution, padding 1, with bias; parameters like ``nnx.Conv``."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (3, 3, cin, cout), param_dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return conv3x3(x, self.kernel[...], self.bias[...])


class ConvBlock(nnx.Module):
    """h = x + MLP(temb); conv3x3 (pad 1); batch-norm; ReLU (docs/method.md §6).

    MLP = Linear(temb_dim -> cin), ReLU, Linear(cin -> cin): a per-channel bias that
    depends on t only. Both ReLUs become ``cfg.activation``.
    """

    def __init__(self, cin: int, cout: int, cfg: UNetConfig, *, rngs: nnx.Rngs,
                 param_dtype=jnp.float32):
        self.mlp1 = nnx.Linear(cfg.temb_dim, cin, rngs=rngs, param_dtype=param_dtype)
        self.mlp2 = nnx.Linear(cin, cin, rngs=rngs, param_dtype=param_dtype)
        self.conv = Conv3x3(cin, cout, rngs=rngs, param_dtype=param_dtype)
        self.bn = nnx.BatchNorm(cout, momentum=cfg.bn_momentum,
                                epsilon=cfg.bn_epsilon, rngs=rngs,
                                param_dtype=param_dtype)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array, temb: jax.Array, *, train: bool) -> jax.Array:
        act = activation_fn(self.activation)
        bias = self.mlp2(act(self.mlp1(temb)))  # (B, cin)
        h = x + bias[:, None, None, :]
        h = self.bn(self.conv(h), use_running_average=not train)
        return act(h)


class UNet(nnx.Module):
    """The v5 noise-prediction U-Net, eps_hat = UNet(x_t, t) (docs/method.md §6).

    With ``channels = (32, 64, 128, 256)`` and one input channel: down1 1->32, pool,
    down2 32->64, pool, down3 64->128, pool, bottleneck 128->256, then three times
    (bilinear x2 up, concat [up, skip], block): up3 384->128, up2 192->64,
    up1 96->32, and a final conv1x1 32->1. Other widths/depths follow the same
    pattern.
    """

    def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.cfg = cfg
        ch = cfg.channels
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        self.down = nnx.List(
            [ConvBlock(cfg.in_channels if i == 0 else ch[i - 1], ch[i], cfg, **kw)
             for i in range(cfg.depth - 1)])
        cmid_in = cfg.in_channels if cfg.depth == 1 else ch[-2]
        self.mid = ConvBlock(cmid_in, ch[-1], cfg, **kw)
        # up[i] takes the output of level i+1 (upsampled) and the skip of level i.
        self.up = nnx.List(
            [ConvBlock(ch[i + 1] + ch[i], ch[i], cfg, **kw)
             for i in range(cfg.depth - 1)])
        self.out = nnx.Conv(ch[0], cfg.in_channels, (1, 1), **kw)

    def __call__(self, x: jax.Array, t: jax.Array, *, train: bool = False) -> jax.Array:
        """Predict the noise.

        Args:
            x: (B, H, W, C) noisy images x_t; H and W multiples of
                ``cfg.size_multiple``.
            t: (B,) time steps (ints or floats).
            train: batch statistics (and running-average updates) if True, running
                statistics otherwise (the piecewise-linear test-time network).

        Returns:
            (B, H, W, C) eps_hat, in the dtype of the computation.
        """
        temb = time_embedding(t, self.cfg.temb_dim).astype(x.dtype)
        skips = []
        h = x
        for block in self.down:
            h = block(h, temb, train=train)
            skips.append(h)
            h = avg_pool2(h)
        h = self.mid(h, temb, train=train)
        for i in reversed(range(self.cfg.depth - 1)):
            h = jnp.concatenate([upsample_bilinear2x(h), skips[i]], axis=-1)
            h = self.up[i](h, temb, train=train)
        return self.out(h)


def count_params(cfg: UNetConfig) -> int:
    """Number of trainable parameters (conv/dense weights and biases, BN scale/bias).

    Computed in closed form from the architecture; the tests check it against the
    initialised module.
    """
    def block(cin, cout):
        mlp = cfg.temb_dim * cin + cin + cin * cin + cin
        return mlp + 9 * cin * cout + cout + 2 * cout

    ch, c = cfg.channels, cfg.in_channels
    n = sum(block(c if i == 0 else ch[i - 1], ch[i]) for i in range(cfg.depth - 1))
    n += block(c if cfg.depth == 1 else ch[-2], ch[-1])
    n += sum(block(ch[i + 1] + ch[i], ch[i]) for i in range(cfg.depth - 1))
    return n + ch[0] * c + c
