"""Noise models from normal images (issue 25, item 3).

Oracles: the dense matrices the covariance operators stand for (built entry by entry
from their definitions), the exact covariance of simulated Gaussian fields, the
N(0, 1) law of the standardised statistic under the real-data null (KS), and the
same DAL test run with the equivalent dense covariance.
"""

import dataclasses
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec
from scipy import stats

from sijax.checkpoint import load_model
from sijax.detect.dal import DALConfig, dal_test, dal_test_batch, draw_noises
from sijax.errors import CheckpointError, InputError
from sijax.noise_model import (
    NoiseModel,
    NoiseModelWarning,
    _unbiased_kernel,  # the estimate before its projection
    estimate_noise_model,
    load_noise_model,
    save_noise_model,
)
from sijax.selective import statistics as st

H, W, C = 6, 5, 2
N_PIX = H * W * C

TINY = os.environ.get("SIJAX_TINY") or os.path.join(
    os.path.dirname(__file__), "..", "sijax", "checkpoints", "tiny_8"
)


# ------------------------------------------------------------------------- oracles


def dense_stationary(kernel, shape):
    """The (n, n) block-Toeplitz matrix of a kernel, entry by entry."""
    h, w, c = shape
    lh, lw = (kernel.shape[0] - 1) // 2, (kernel.shape[1] - 1) // 2
    s = np.zeros((h, w, c, h, w, c))
    for i in range(h):
        for j in range(w):
            for i2 in range(h):
                for j2 in range(w):
                    di, dj = i2 - i, j2 - j
                    if abs(di) <= lh and abs(dj) <= lw:
                        s[i, j, :, i2, j2, :] = kernel[lh + di, lw + dj]
    n = h * w * c
    return s.reshape(n, n)


def symmetric_kernel(rng, lh, lw, c):
    k = rng.standard_normal((2 * lh + 1, 2 * lw + 1, c, c))
    return k + np.swapaxes(k[::-1, ::-1], 2, 3)  # k[-d] = k[d]^T


class Field:
    """A stationary Gaussian field: white noise filtered by a (3, 3, C, C) filter.

    ``sigma`` is its exact covariance (the linear map applied to unit vectors).
    """

    def __init__(self, shape, rng):
        self.shape = shape
        c = shape[2]
        # A blur (neighbours correlate positively, as in most textures) with some
        # random mixing of the channels and of the taps.
        b = np.array([0.6, 1.0, 0.6])
        f = 0.2 * rng.standard_normal((3, 3, c, c))
        f += np.outer(b, b)[:, :, None, None] * np.eye(c)
        self.filt = f
        ne = (shape[0] + 2) * (shape[1] + 2) * c
        a = self._apply(np.eye(ne).reshape(ne, shape[0] + 2, shape[1] + 2, c))
        a = a.reshape(ne, -1).T  # (n, ne)
        self.sigma = a @ a.T

    def _apply(self, e):
        h, w, _ = self.shape
        out = np.zeros((e.shape[0], *self.shape))
        for p in range(3):
            for q in range(3):
                out += np.einsum(
                    "mhwd,cd->mhwc", e[:, p : p + h, q : q + w], self.filt[p, q]
                )
        return out

    def draw(self, rng, m):
        h, w, c = self.shape
        return self._apply(rng.standard_normal((m, h + 2, w + 2, c)))


class Modes:
    """Low-rank plus diagonal noise: brightness and two gradients (illumination)
    over independent pixels of varying variance."""

    def __init__(self, shape, rng):
        h, w, c = shape
        self.shape = shape
        ii, jj, _ = np.meshgrid(
            np.linspace(-1, 1, h), np.linspace(-1, 1, w), np.arange(c), indexing="ij"
        )
        u = np.stack([np.ones(shape), ii, jj], -1).reshape(-1, 3)
        self.u, _ = np.linalg.qr(u)
        self.s = np.array([30.0, 12.0, 6.0])
        self.d = rng.uniform(0.5, 1.5, h * w * c)
        self.sigma = self.u * self.s @ self.u.T + np.diag(self.d)

    def draw(self, rng, m):
        z = rng.standard_normal((m, 3)) * np.sqrt(self.s) @ self.u.T
        z = z + rng.standard_normal((m, self.d.size)) * np.sqrt(self.d)
        return z.reshape(m, *self.shape)


def dense(cov, n):
    return np.asarray(st.covariance_matrix(cov, n))


@jax.jit
def _quad(cov, eta):
    return eta @ cov.matvec(eta)


# ------------------------------------------------------------- covariance operators


@pytest.mark.parametrize("lags", [(5, 4), (2, 1), (1, 3), (0, 0)])
@pytest.mark.parametrize("c", [1, 2])
def test_stationary_matvec_is_the_block_toeplitz_matrix(lags, c):
    rng = np.random.default_rng(sum(lags) + c)
    k = symmetric_kernel(rng, *lags, c)
    cov = st.StationaryCovariance(k, (H, W, c), check_psd=False)
    n = H * W * c
    want = dense_stationary(k, (H, W, c))
    np.testing.assert_allclose(dense(cov, n), want, rtol=0, atol=1e-12)
    v = rng.standard_normal(n)
    got = jax.jit(lambda cv, x: cv.matvec(x))(cov, jnp.asarray(v))
    np.testing.assert_allclose(got, want @ v, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov.diagonal(n), np.diag(want), rtol=0, atol=1e-15)


def test_stationary_of_a_gray_image_takes_h_w():
    k = np.zeros((3, 3, 1, 1))
    k[1, 1] = 1.0
    cov = st.StationaryCovariance(k, (H, W))
    assert cov.image_shape == (H, W, 1) and cov.n == H * W
    np.testing.assert_allclose(dense(cov, H * W), np.eye(H * W), atol=1e-15)


def test_low_rank_matvec_is_the_dense_matrix():
    rng = np.random.default_rng(0)
    u = rng.standard_normal((N_PIX, 4))
    s = rng.uniform(0.1, 3.0, 4)
    d = rng.uniform(0.5, 2.0, N_PIX)
    cov = st.LowRankDiagonalCovariance(u, s, d)
    want = u @ np.diag(s) @ u.T + np.diag(d)
    np.testing.assert_allclose(dense(cov, N_PIX), want, rtol=0, atol=1e-12)
    v = rng.standard_normal(N_PIX)
    got = jax.jit(lambda cv, x: cv.matvec(x))(cov, jnp.asarray(v))
    np.testing.assert_allclose(got, want @ v, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov.diagonal(N_PIX), np.diag(want), atol=1e-12)


@pytest.mark.parametrize("form", ["stationary", "lowrank"])
def test_line_statistic_equals_the_dense_covariance(form):
    """Same z, line and status as the dense matrix, eagerly and under jit + vmap."""
    rng = np.random.default_rng(1)
    if form == "stationary":
        field = Field((H, W, C), rng)
        lag = np.zeros((2 * H - 1, 2 * W - 1, C, C))
        # The field's kernel, read off its exact covariance at pixel (H-1, W-1).
        s6 = field.sigma.reshape(H, W, C, H, W, C)
        for di in range(-(H - 1), H):
            for dj in range(-(W - 1), W):
                i, j = (0, 0) if di >= 0 and dj >= 0 else (max(-di, 0), max(-dj, 0))
                lag[H - 1 + di, W - 1 + dj] = s6[i, j, :, i + di, j + dj, :]
        cov = st.StationaryCovariance(lag, (H, W, C))
        matrix = field.sigma
    else:
        m = Modes((H, W, C), rng)
        cov = st.LowRankDiagonalCovariance(m.u, m.s, m.d)
        matrix = m.sigma
    np.testing.assert_allclose(dense(cov, N_PIX), matrix, rtol=0, atol=1e-12)
    x = rng.standard_normal((H, W, C))
    x_ref = rng.standard_normal((H, W, C))
    mask = np.zeros((H, W), bool)
    mask[1:4, 2:4] = True

    def stat(sigma, x, x_ref):
        return st.line_statistic(x, x_ref, mask, sigma=sigma, sigma_ref=sigma)

    want = stat(st.DenseCovariance(matrix), x, x_ref)
    for got in (
        stat(cov, x, x_ref),
        jax.tree.map(
            lambda a: a[1],
            jax.jit(jax.vmap(stat, in_axes=(None, 0, 0)))(
                cov, jnp.stack([x_ref, x]), jnp.stack([x, x_ref])
            ),
        ),
    ):
        for name in ("z_obs", "sd", "a", "b"):
            np.testing.assert_allclose(
                getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12
            )
        assert int(got.status) == st.StatStatus.OK


def test_covariances_cross_shard_map_replicated():
    """As dal_test_batch passes them to each device's block (in_specs replicated):
    the line statistic of a batch split over two devices equals the unsplit one."""
    rng = np.random.default_rng(16)
    imgs = Field((H, W, C), rng).draw(rng, 30)
    covs = (
        estimate_noise_model(imgs, "stationary").covariance(),
        estimate_noise_model(imgs, "lowrank", rank=3).template_covariance(),
    )
    xs, refs = rng.standard_normal((2, 4, H, W, C))
    mask = np.zeros((H, W), bool)
    mask[1:4, 2:4] = True

    def block(covs, xs, refs):
        def one(x, r):
            line = st.line_statistic(x, r, mask, sigma=covs[0], sigma_ref=covs[1])
            return line.z_obs, line.b

        return jax.vmap(one)(xs, refs)

    mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
    batch, rep = PartitionSpec("batch"), PartitionSpec()
    split = jax.jit(
        jax.shard_map(block, mesh=mesh, in_specs=(rep, batch, batch), out_specs=batch)
    )
    for got, want in zip(split(covs, xs, refs), block(covs, xs, refs), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_covariance_checks_raise_clear_errors():
    k = np.zeros((3, 3, C, C))
    k[1, 1] = np.eye(C)
    st.as_covariance(st.StationaryCovariance(k, (H, W, C)), (H, W, C))
    with pytest.raises(InputError, match="image has n="):
        st.as_covariance(st.StationaryCovariance(k, (H, W, C)), (H, W, 1))
    with pytest.raises(InputError, match="kernel must be"):
        st.as_covariance(st.StationaryCovariance(k[:2], (H, W, C)), (H, W, C))
    with pytest.raises(InputError, match="kernel must be"):  # lag >= H
        st.StationaryCovariance(np.zeros((13, 3, C, C)), (H, W, C)).validate(N_PIX)
    asym = k.copy()
    asym[0, 1, 0, 1] = 0.3
    with pytest.raises(InputError, match="not symmetric"):
        st.StationaryCovariance(asym, (H, W, C)).validate(N_PIX)
    with pytest.raises(InputError, match="variances"):
        st.StationaryCovariance(0 * k, (H, W, C)).validate(N_PIX)
    # Horizontal neighbours correlating 0.9: indefinite already as a 5 x 5 Toeplitz.
    bad = np.zeros((1, 3, 1, 1))
    bad[0, :, 0, 0] = [0.9, 1.0, 0.9]
    assert np.linalg.eigvalsh(dense_stationary(bad, (H, W, 1)))[0] < 0
    with pytest.raises(InputError, match="PSD check"):
        st.StationaryCovariance(bad, (H, W, 1)).validate(H * W)
    st.StationaryCovariance(bad, (H, W, 1), check_psd=False).validate(H * W)
    u, s, d = np.ones((N_PIX, 2)), np.ones(2), np.ones(N_PIX)
    with pytest.raises(InputError, match="basis"):
        st.LowRankDiagonalCovariance(u[:, :1], s, d).validate(N_PIX)
    with pytest.raises(InputError, match="scales must be >= 0"):
        st.LowRankDiagonalCovariance(u, -s, d).validate(N_PIX)
    with pytest.raises(InputError, match="residual variances must be > 0"):
        st.LowRankDiagonalCovariance(u, s, 0 * d).validate(N_PIX)
    with pytest.raises(InputError, match="NaN"):
        st.LowRankDiagonalCovariance(u * np.nan, s, d).validate(N_PIX)


# ----------------------------------------------------------------------- estimation


def test_estimators_shapes_and_template_covariance():
    rng = np.random.default_rng(2)
    imgs = Field((H, W, C), rng).draw(rng, 40)
    for kind in ("pixel", "stationary", "lowrank"):
        nm = estimate_noise_model(imgs, kind)
        assert nm.kind == kind and nm.n_images == 40
        assert nm.image_shape == (H, W, C) and nm.n_floored == 0
        np.testing.assert_allclose(nm.mean, imgs.mean(0), rtol=0, atol=1e-14)
        full, tmpl = (
            dense(nm.covariance(), N_PIX),
            dense(nm.template_covariance(), N_PIX),
        )
        np.testing.assert_allclose(tmpl, full / 40, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(full, full.T, rtol=0, atol=1e-12)
        assert np.linalg.eigvalsh(full)[0] > 0
        np.testing.assert_allclose(
            nm.covariance().diagonal(N_PIX), np.diag(full), rtol=1e-12
        )
    pixel = estimate_noise_model(imgs, "pixel")
    np.testing.assert_allclose(pixel.variance, imgs.var(0, ddof=1), rtol=1e-12)
    assert estimate_noise_model(imgs, "lowrank").rank == 10


def test_stationary_estimate_is_psd_even_from_three_images():
    """Three images, every lag kept: the raw kernel estimate is indefinite, the
    projected one is PSD with the floor as its smallest eigenvalue or above."""
    rng = np.random.default_rng(3)
    imgs = Field((H, W, C), rng).draw(rng, 3)
    nm = estimate_noise_model(imgs, "stationary", max_lag=H)
    assert nm.max_lag == (H - 1, W - 1)
    # The same estimate without the projection (the unbiased kernel, all lags).
    r = imgs - imgs.mean(0)
    raw = np.zeros_like(nm.kernel)
    for di in range(-(H - 1), H):
        for dj in range(-(W - 1), W):
            total, pairs = _direct_kernel(r, di, dj)
            raw[H - 1 + di, W - 1 + dj] = total / (2 * pairs)
    assert np.linalg.eigvalsh(dense_stationary(raw, (H, W, C)))[0] < -1e-3
    lam = np.linalg.eigvalsh(dense(nm.covariance(), N_PIX))
    assert lam[0] >= nm.floor * (1 - 1e-6)
    lowest = np.min(st.circulant_spectrum(nm.kernel, (H, W, C)))
    assert lowest >= nm.floor - 1e-12 * np.max(np.abs(nm.kernel))


def _direct_kernel(r, di, dj):
    """sum over images and positions of r[p, c] r[p + d, c'], and the pair count."""
    h, w = r.shape[1:3]
    a = r[:, max(0, -di) : h - max(0, di), max(0, -dj) : w - max(0, dj)]
    b = r[:, max(0, di) : h + min(0, di), max(0, dj) : w + min(0, dj)]
    return np.einsum("mhwc,mhwd->cd", a, b), a.shape[1] * a.shape[2]


def test_stationary_kernel_is_unbiased_before_taper_and_projection():
    """The FFT estimate equals the direct average over positions at every lag, and
    the tapered, projected kernel stays close to it up to max_lag."""
    rng = np.random.default_rng(4)
    imgs = Field((H, W, C), rng).draw(rng, 400)
    r = imgs - imgs.mean(0)
    raw = np.fft.fftshift(_unbiased_kernel(r), axes=(0, 1))
    for di in range(-(H - 1), H):
        for dj in range(-(W - 1), W):
            total, pairs = _direct_kernel(r, di, dj)
            np.testing.assert_allclose(
                raw[H - 1 + di, W - 1 + dj], total / (399 * pairs), rtol=0, atol=1e-12
            )
    nm = estimate_noise_model(imgs, "stationary", max_lag=1)
    k0 = raw[H - 1, W - 1].max()
    for di, dj in [(0, 0), (1, 0), (0, 1), (1, -1)]:
        got = nm.kernel[H - 1 + di, W - 1 + dj]
        # The projection moves the kernel where the tapered estimate was indefinite.
        np.testing.assert_allclose(
            got, raw[H - 1 + di, W - 1 + dj], rtol=0, atol=0.05 * k0
        )


def test_low_rank_randomized_path_equals_the_eigendecomposition():
    """N > n takes the randomized range finder: same top components as the exact
    eigendecomposition of the sample covariance (n x n is fine at n = 24)."""
    rng = np.random.default_rng(5)
    shape = (2, 3, 4)
    m = Modes(shape, rng)
    imgs = m.draw(rng, 200)
    nm = estimate_noise_model(imgs, "lowrank", rank=3, shrinkage=0.0)
    sample = np.cov(imgs.reshape(200, -1).T)
    lam, vec = np.linalg.eigh(sample)
    np.testing.assert_allclose(nm.scales, lam[::-1][:3], rtol=1e-6)
    u = vec[:, ::-1][:, :3]
    np.testing.assert_allclose(np.abs(nm.basis.T @ u), np.eye(3), atol=1e-6)
    resid = np.diag(sample) - np.sum(u**2 * lam[::-1][:3], 1)
    np.testing.assert_allclose(nm.residual, resid, rtol=1e-6)
    # The Gram path (N <= n) gives the same for the first 20 images.
    few = estimate_noise_model(imgs[:20], "lowrank", rank=3, shrinkage=0.0)
    sample = np.cov(imgs[:20].reshape(20, -1).T)
    np.testing.assert_allclose(few.scales, np.linalg.eigvalsh(sample)[::-1][:3])


def test_low_rank_shrinkage_moves_residuals_towards_their_mean():
    rng = np.random.default_rng(6)
    imgs = Modes((H, W, C), rng).draw(rng, 30)
    raw = estimate_noise_model(imgs, "lowrank", rank=3, shrinkage=0.0)
    half = estimate_noise_model(imgs, "lowrank", rank=3, shrinkage=0.5)
    auto = estimate_noise_model(imgs, "lowrank", rank=3)
    np.testing.assert_allclose(
        half.residual, 0.5 * raw.residual + 0.5 * raw.residual.mean(), rtol=1e-12
    )
    assert 0 < auto.shrinkage < 1
    np.testing.assert_allclose(auto.residual.mean(), raw.residual.mean(), rtol=1e-12)


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(7)
    imgs = rng.standard_normal((5, H, W, C))
    with pytest.raises(InputError, match="at least 2"):
        estimate_noise_model(imgs[:1], "pixel")
    with pytest.raises(InputError, match=r"channel axis, images\[..., None\]"):
        estimate_noise_model(imgs[..., 0], "pixel")
    with pytest.raises(InputError, match=r"\(N, H, W, C\)"):
        estimate_noise_model(imgs[0, 0], "pixel")
    nan = imgs.copy()
    nan[2, 1, 3, 0] = np.nan
    with pytest.raises(InputError, match=r"NaN/Inf values \(first: image 2, pixel"):
        estimate_noise_model(nan, "stationary")
    with pytest.raises(InputError, match="real numbers"):
        estimate_noise_model(imgs.astype(complex), "pixel")
    with pytest.raises(InputError, match="kind"):
        estimate_noise_model(imgs, "dense")
    with pytest.raises(InputError, match="rank=5 must be"):
        estimate_noise_model(imgs, "lowrank", rank=5)
    with pytest.raises(InputError, match="rank=0 must be"):
        estimate_noise_model(imgs, "lowrank", rank=0)
    with pytest.raises(InputError, match="rank applies to kind='lowrank' only"):
        estimate_noise_model(imgs, "pixel", rank=2)
    with pytest.raises(InputError, match="max_lag applies"):
        estimate_noise_model(imgs, "lowrank", max_lag=2)
    with pytest.raises(InputError, match="max_lag=-1"):
        estimate_noise_model(imgs, "stationary", max_lag=-1)
    with pytest.raises(InputError, match="shrinkage=2"):
        estimate_noise_model(imgs, "lowrank", shrinkage=2)
    with pytest.raises(InputError, match="identical"):
        estimate_noise_model(np.ones((4, H, W, C)), "pixel")
    with pytest.raises(InputError, match="floor"):
        estimate_noise_model(imgs, "pixel", floor=0.0)
    with pytest.raises(InputError, match="needs kernel"):
        NoiseModel("stationary", imgs[0], 5)


@pytest.mark.parametrize("kind", ["pixel", "stationary", "lowrank"])
def test_constant_border_gets_the_floor_with_a_warning(kind):
    """A border with no variation would make Sigma singular: it gets the documented
    floor, with a warning that says so, never silently."""
    rng = np.random.default_rng(8)
    imgs = rng.standard_normal((12, H, W, C))
    imgs[:, 0] = 0.25  # a constant top row
    kw = {"rank": 3, "shrinkage": 0.0} if kind == "lowrank" else {}
    with pytest.warns(NoiseModelWarning, match=f"{W * C} of {N_PIX} pixels vary less"):
        nm = estimate_noise_model(imgs, kind, **kw)
    assert nm.n_floored == W * C and nm.floor == pytest.approx(
        1e-6 * imgs[:, 1:].var(0, ddof=1).sum() / N_PIX, rel=1e-9
    )
    full = dense(nm.covariance(), N_PIX)
    assert np.linalg.eigvalsh(full)[0] >= nm.floor * (1 - 1e-6)
    st.as_covariance(nm.covariance(), (H, W, C))  # valid for the test
    if kind != "stationary":  # the stationary model spreads the variance evenly
        np.testing.assert_allclose(np.diag(full)[: W * C], nm.floor, rtol=1e-6)


# --------------------------------------------------------------------- save and load


@pytest.mark.parametrize("kind", ["pixel", "stationary", "lowrank"])
def test_save_and_load_round_trip(tmp_path, kind):
    rng = np.random.default_rng(9)
    nm = estimate_noise_model(rng.standard_normal((8, H, W, C)), kind)
    save_noise_model(tmp_path / "m", nm)
    back = load_noise_model(tmp_path / "m")
    for f in dataclasses.fields(NoiseModel):
        a, b = getattr(nm, f.name), getattr(back, f.name)
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)
        else:
            assert a == b, f.name
    meta = json.loads((tmp_path / "m" / "noise_model.json").read_text())
    assert meta["kind"] == kind and len(meta["sha256"]) == 64


def test_damaged_or_missing_files_are_checkpoint_errors(tmp_path):
    rng = np.random.default_rng(10)
    nm = estimate_noise_model(rng.standard_normal((8, H, W, C)), "pixel")
    d = save_noise_model(tmp_path / "m", nm)
    npz = os.path.join(d, "noise_model.npz")
    data = bytearray(open(npz, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(npz, "wb").write(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_noise_model(d)
    os.remove(npz)
    with pytest.raises(CheckpointError, match="not found"):
        load_noise_model(d)
    save_noise_model(d, nm)
    open(os.path.join(d, "noise_model.json"), "w").write("{bad json")
    with pytest.raises(CheckpointError, match="corrupt noise_model.json"):
        load_noise_model(d)
    with pytest.raises(CheckpointError, match="not found"):
        load_noise_model(tmp_path / "nowhere")


# ------------------------------------------------------------ validity on Gaussians


def _quad_forms(cov, etas):
    return np.array([float(_quad(cov, jnp.asarray(e))) for e in etas])


@pytest.mark.parametrize("truth", ["stationary", "lowrank"])
def test_estimators_recover_a_known_covariance(truth):
    """500 images from a known correlated covariance: the matching estimator gets
    Sigma within 20% in operator norm, no worse than the unstructured sample
    covariance (x 1.25), and every quadratic form eta^T Sigma eta (random and
    region-mean eta) within 15%. (The sampling error of the largest low-rank
    variance alone is sqrt(2 / 500) = 6% per standard deviation.) The per-pixel
    estimate misses the region mean's variance by more than 30%."""
    rng = np.random.default_rng(11)
    shape = (8, 7, 2)
    n = int(np.prod(shape))
    gen = Field(shape, rng) if truth == "stationary" else Modes(shape, rng)
    imgs = gen.draw(rng, 500)
    region = np.zeros(shape)
    region[2:5, 3:6] = 1 / 18
    etas = np.concatenate([rng.standard_normal((20, n)), region.reshape(1, -1)])
    want = np.einsum("ki,ij,kj->k", etas, gen.sigma, etas)
    match = {"stationary": {}, "lowrank": {"rank": 3}}[truth]
    nm = estimate_noise_model(imgs, truth, **match)
    size = np.linalg.norm(gen.sigma, 2)
    err = np.linalg.norm(dense(nm.covariance(), n) - gen.sigma, 2) / size
    sample = np.cov(imgs.reshape(500, n).T)
    assert err < 0.2 and err < 1.25 * np.linalg.norm(sample - gen.sigma, 2) / size
    assert np.max(np.abs(_quad_forms(nm.covariance(), etas) / want - 1)) < 0.15
    pixel = estimate_noise_model(imgs, "pixel")
    assert np.abs(_quad_forms(pixel.covariance(), etas[-1:]) / want[-1:] - 1)[0] > 0.3


@pytest.mark.parametrize("truth", ["stationary", "lowrank"])
def test_standardised_statistic_is_standard_normal_under_the_real_data_null(truth):
    """The real-data null in miniature: each of 400 trials draws 200 normal images,
    estimates the model and its template, then one test image X. For fixed eta,
    z = eta^T (X - template) / sqrt(eta^T (Sigma + Sigma / N) eta) is N(0, 1) with
    the matching noise model (KS p > 0.01, variance within 1 +- 0.25) and not
    with the per-pixel model when the true noise is correlated (KS p < 1e-4 and a
    variance above 2 for the region mean)."""
    rng = np.random.default_rng(12)
    shape = (8, 8, 2)
    n = int(np.prod(shape))
    gen = Field(shape, rng) if truth == "stationary" else Modes(shape, rng)
    region = np.zeros(shape)
    region[2:5, 3:6] = 1 / 18
    etas = [region.reshape(-1), rng.standard_normal(n) / np.sqrt(n)]
    kinds = {truth: {"rank": 3} if truth == "lowrank" else {}, "pixel": {}}
    z = {kind: [] for kind in kinds}
    for _ in range(400):
        imgs = gen.draw(rng, 200)
        x = gen.draw(rng, 1)[0]
        for kind, kw in kinds.items():
            nm = estimate_noise_model(imgs, kind, **kw)
            v = _quad_forms(nm.covariance(), etas)
            v = v + _quad_forms(nm.template_covariance(), etas)
            z[kind].append(np.array(etas) @ (x - nm.mean).reshape(-1) / np.sqrt(v))
    for kind in kinds:
        zk = np.array(z[kind])  # (trials, etas)
        p = [stats.kstest(zk[:, e], "norm").pvalue for e in range(len(etas))]
        var = zk.var(0)  # 1 +- 0.07 (one sd) for N(0, 1)
        if kind == truth:
            assert min(p) > 0.01 and np.all(np.abs(var - 1) < 0.25), (kind, p, var)
        else:  # the region mean of correlated pixels varies more than it says
            assert p[0] < 1e-4 and var[0] > 2, (kind, p, var)


# ---------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def model():
    return load_model(TINY)


@pytest.fixture(scope="module")
def normal_images(model):
    """300 normal 8x8x1 images: a unit-variance-ish correlated stationary field."""
    rng = np.random.default_rng(13)
    field = Field(model.image_shape, rng)
    imgs = field.draw(rng, 300)
    return imgs / np.sqrt(np.mean(np.diag(field.sigma)))


@pytest.fixture(scope="module")
def noise_models(normal_images):
    return {
        "pixel": estimate_noise_model(normal_images, "pixel"),
        "stationary": estimate_noise_model(normal_images, "stationary"),
        "lowrank": estimate_noise_model(normal_images, "lowrank", rank=5),
    }


def _anomalous(model, normal_images):
    rng = np.random.default_rng(14)
    x = normal_images[rng.integers(len(normal_images))].copy()
    x[2:5, 3:6] += 3.0
    return x, draw_noises(jax.random.key(7), model.image_shape)


@pytest.mark.parametrize("kind", ["pixel", "stationary", "lowrank"])
def test_dal_test_with_a_noise_model(model, normal_images, noise_models, kind):
    """sigma = the model's covariance, sigma_ref = the template's, x_ref = the
    template: a finite p-value in [0, 1], equal to the test run with the same
    covariances as dense matrices."""
    nm = noise_models[kind]
    x, nz = _anomalous(model, normal_images)
    cfg = DALConfig(search="exhaustive", engine="propagate")
    res = dal_test(
        model, x, nm.mean, sigma=nm.covariance(), sigma_ref=nm.template_covariance(),
        noises=nz, config=cfg,
    )  # fmt: skip
    assert res.status == "ok" and res.search_count > 0
    assert np.isfinite(res.p_value) and 0 <= res.p_value <= 1
    n = int(np.prod(model.image_shape))
    as_dense = dal_test(
        model, x, nm.mean, sigma=dense(nm.covariance(), n),
        sigma_ref=dense(nm.template_covariance(), n), noises=nz, config=cfg,
    )  # fmt: skip
    np.testing.assert_allclose(res.stat, as_dense.stat, rtol=1e-12)
    np.testing.assert_allclose(res.p_value, as_dense.p_value, rtol=1e-9, atol=1e-14)
    assert res.search_count == as_dense.search_count


@pytest.mark.slow
def test_dal_test_batch_accepts_the_new_covariances(model, normal_images, noise_models):
    """Both engines; a stationary sigma with a low-rank sigma_ref in one compiled
    batch (walk), and on the host (propagate): the same p-values."""
    x, nz = _anomalous(model, normal_images)
    xs = np.stack([x, normal_images[0]])
    nzs = jax.tree.map(lambda a: jnp.stack([a, a]), nz)
    sigma = noise_models["stationary"].covariance()
    sigma_ref = noise_models["lowrank"].template_covariance()
    ref = noise_models["stationary"].mean
    refs = np.stack([ref, ref])
    out = {}
    for engine in ("walk", "propagate"):
        out[engine] = dal_test_batch(
            model, xs, refs, sigma=sigma, sigma_ref=sigma_ref, noises=nzs,
            config=DALConfig(search="exhaustive", engine=engine),
        )  # fmt: skip
    p = np.asarray(out["walk"].p_value)
    assert int(out["walk"].status[0]) == 0 and np.isfinite(p[0]) and 0 <= p[0] <= 1
    ok = np.asarray(out["walk"].status) == 0
    np.testing.assert_array_equal(out["walk"].status, out["propagate"].status)
    np.testing.assert_allclose(
        p[ok], np.asarray(out["propagate"].p_value)[ok], rtol=0, atol=1e-12
    )


def test_noise_model_warnings_are_only_for_floors():
    """A clean estimate raises no warning (a harness with warnings as errors)."""
    rng = np.random.default_rng(15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for kind in ("pixel", "stationary", "lowrank"):
            kw = {"rank": 2} if kind == "lowrank" else {}
            estimate_noise_model(rng.standard_normal((6, H, W, C)), kind, **kw)


def test_check_noise_model_finds_the_model_that_understates_region_variance():
    """check_noise_model on held-out images of correlated noise (shared modes): the
    matching low-rank model gives z of variance about 1 for every square side and
    |z| > 1.96 about 5% of the time; the per-pixel model misses the region mean's
    variance (var z above 1.5 for 3 x 3 squares, and rejects far too often)."""
    from sijax.noise_model import check_noise_model

    rng = np.random.default_rng(21)
    shape = (8, 8, 1)
    gen = Modes(shape, rng)
    train, held_out = gen.draw(rng, 400), gen.draw(rng, 600)
    right = check_noise_model(estimate_noise_model(train, "lowrank", rank=3),
                              held_out, sizes=(1, 3))
    wrong = check_noise_model(estimate_noise_model(train, "pixel"), held_out,
                              sizes=(1, 3))
    for row in right:
        lo, hi = row["var_z_interval_99"]
        assert lo < 1.0 < hi * 1.1, row  # (the estimate's own error: x 1.1)
        assert row["rate_196_interval_99"][0] < 0.05 < row["rate_196_interval_99"][1]
    assert wrong[1]["size"] == 3 and wrong[1]["var_z"] > 1.5
    assert wrong[1]["rate_196_interval_99"][0] > 0.05
    json.dumps(right)  # plain JSON values
    nm = estimate_noise_model(train, "pixel")
    with pytest.raises(InputError, match="do not match"):
        check_noise_model(nm, held_out[:, :4])
    with pytest.raises(InputError, match="NaN"):
        check_noise_model(nm, np.where(np.arange(8)[None, :, None, None] == 2,
                                       np.nan, held_out))
    with pytest.raises(InputError, match="side 9"):
        check_noise_model(nm, held_out, sizes=(9,))


def test_few_training_images_leave_the_low_rank_residual_to_the_data(tmp_path):
    """20 normal images and noise_rank 32: the stored low-rank model keeps at most
    half of the 19 centred directions, so its residual variances come from the
    images (rank N - 1 would leave a zero residual, all from the floor)."""
    from sijax.config import TrainConfig
    from sijax.noise_model import load_noise_model
    from sijax.train import TrainingData, save_noise_models

    rng = np.random.default_rng(0)
    x = rng.standard_normal((20, 8, 8, 1)).astype(np.float32)
    data = TrainingData(train=x[:18], val=x[18:], preprocessing=None, source=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "vary less than the floor" warning
        save_noise_models(str(tmp_path), TrainConfig(noise_rank=32), data)
    nm = load_noise_model(str(tmp_path / "noise" / "lowrank"))
    assert nm.rank == 9
    assert np.all(np.asarray(nm.residual) > 0.1)
