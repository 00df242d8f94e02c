"""Statistics, covariance forms and the line, against direct dense NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from sijax.errors import InputError
from sijax.selective import statistics as st

H, W, C = 5, 6, 2
N = H * W * C


def dense_corr(n, rho=0.5, var=1.0):
    i = np.arange(n)
    return var * rho ** np.abs(i[:, None] - i[None, :])


def random_spd(n, rng):
    a = rng.standard_normal((n, n))
    return a @ a.T / n + 0.5 * np.eye(n)


def covariance_forms(rng):
    """(name, sigma as passed to line_statistic, dense matrix) for each form."""
    var = rng.uniform(0.5, 2.0, (H, W, C))
    dense = random_spd(N, rng)
    corr = dense_corr(N)
    return [
        ("scalar", 1.7, 1.7 * np.eye(N)),
        ("per-pixel", var, np.diag(var.reshape(-1))),
        ("dense", dense, dense),
        ("corr", "corr", corr),
        ("operator", st.OperatorCovariance(lambda v: jnp.asarray(corr) @ v, N), corr),
    ]


def dense_eta(mask3, hypothesis, radius=1):
    m = mask3.astype(float)
    if hypothesis == "reference":
        return m / m.sum(), -m / m.sum()
    if hypothesis == "background":
        return m / m.sum() - (1 - m) / (1 - m).sum(), None
    window = np.ones((2 * radius + 1, 2 * radius + 1, 1), bool)
    nb = ndimage.binary_dilation(mask3, structure=window) & ~mask3
    return m / m.sum() - nb / nb.sum(), None


@pytest.mark.parametrize("hypothesis", ["reference", "background", "neighbour"])
def test_statistic_and_line_match_dense_formulas(hypothesis):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((H, W, C))
    x_ref = rng.standard_normal((H, W, C)) + 0.3
    mask = np.zeros((H, W), bool)
    mask[1:3, 2:5] = True
    mask3 = np.broadcast_to(mask[:, :, None], (H, W, C))
    eta_x, eta_r = dense_eta(mask3, hypothesis)
    for name, sigma, s in covariance_forms(rng):
        s_ref = 0.8 * s  # a different reference covariance
        cov = st.as_covariance(sigma, x.shape)
        cov_ref = st.as_covariance(0.8 * s, x.shape)

        @jax.jit
        def f(x, x_ref, mask, cov, cov_ref):
            return st.line_statistic(
                x, x_ref, mask, sigma=cov, sigma_ref=cov_ref, hypothesis=hypothesis
            )

        out = f(x, x_ref, mask, cov, cov_ref)
        ex, er = eta_x.reshape(-1), None if eta_r is None else eta_r.reshape(-1)
        t = ex @ x.reshape(-1)
        v = ex @ s @ ex
        if er is not None:
            t += er @ x_ref.reshape(-1)
            v += er @ s_ref @ er
        z = t / np.sqrt(v)
        b = (s @ ex / np.sqrt(v)).reshape(x.shape)
        assert int(out.status) == st.StatStatus.OK, name
        np.testing.assert_allclose(float(out.z_obs), z, rtol=1e-12, err_msg=name)
        np.testing.assert_allclose(np.asarray(out.b), b, rtol=1e-11, atol=1e-14)
        np.testing.assert_allclose(np.asarray(out.a), x - z * b, rtol=1e-11, atol=1e-13)
        np.testing.assert_allclose(np.asarray(out.eta), eta_x, atol=1e-15)
        # The line passes through X at z_obs and eta^T x~(z) / sd == z along it
        # (X block only when there is no reference part).
        np.testing.assert_allclose(np.asarray(out.a + out.b * out.z_obs), x, atol=1e-12)
        if er is None:
            for zz in (-3.0, 0.5, 7.0):
                xz = np.asarray(out.a + out.b * zz).reshape(-1)
                assert ex @ xz / np.sqrt(v) == pytest.approx(zz, rel=1e-11, abs=1e-12)


def test_custom_eta_and_three_d_mask():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((H, W, C))
    x_ref = rng.standard_normal((H, W, C))
    eta = rng.standard_normal((H, W, C))
    out = st.line_statistic(x, None, None, sigma=2.0, eta=eta)
    z = (eta * x).sum() / np.sqrt(2.0 * (eta**2).sum())
    assert float(out.z_obs) == pytest.approx(z, rel=1e-12)
    out = st.line_statistic(x, x_ref, None, sigma=2.0, eta=(eta, -eta))
    z = (eta * (x - x_ref)).sum() / np.sqrt(4.0 * (eta**2).sum())
    assert float(out.z_obs) == pytest.approx(z, rel=1e-12)
    mask3 = np.zeros((H, W, C), bool)
    mask3[2, 3, 1] = True
    out = st.line_statistic(x, x_ref, mask3, sigma=1.0)
    assert float(out.z_obs) == pytest.approx((x - x_ref)[2, 3, 1] / np.sqrt(2.0))


@pytest.mark.parametrize("n,rho,var", [(1, 0.5, 1.0), (37, 0.5, 1.0), (300, -0.3, 2.5)])
def test_corr_operator_equals_dense_matrix(n, rho, var):
    cov = st.AR1Covariance(n, rho, var)
    v = np.random.default_rng(n).standard_normal(n)
    got = jax.jit(lambda c, v: c.matvec(v))(cov, jnp.asarray(v))
    np.testing.assert_allclose(got, dense_corr(n, rho, var) @ v, rtol=1e-12, atol=1e-12)
    if n <= 37:
        np.testing.assert_allclose(
            jax.jit(st.covariance_matrix, static_argnums=1)(cov, n),
            dense_corr(n, rho, var),
            atol=1e-15,
        )


def test_per_pixel_variances_of_a_gray_image_may_drop_the_channel():
    """(H, W) variances for an (H, W, 1) image (how a 2-D .npy loads) mean the same."""
    var = np.random.default_rng(1).uniform(0.5, 2.0, (5, 4))
    want = st.covariance_matrix(st.as_covariance(var[..., None], (5, 4, 1)), 20)
    got = st.covariance_matrix(st.as_covariance(var, (5, 4, 1)), 20)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.diagonal(got), var.reshape(-1))
    with pytest.raises(InputError, match="fits neither"):
        st.as_covariance(var, (5, 4, 2))  # two channels: (H, W) is ambiguous
    zero_diag = np.eye(20)
    zero_diag[3, 3] = 0.0
    with pytest.raises(InputError, match=r"S\[3,3\] = 0$"):
        st.as_covariance(zero_diag, (5, 4, 1))


def test_large_image_uses_no_dense_matrix():
    x = np.random.default_rng(0).standard_normal((128, 128, 1))
    mask = np.zeros((128, 128), bool)
    mask[40:60, 30:50] = True
    f = jax.jit(lambda x, m: st.line_statistic(x, x, m, sigma="corr"))
    out = f(x, mask)
    assert int(out.status) == st.StatStatus.OK and float(out.z_obs) == 0.0
    # b = Sigma eta / sd: positive inside the region, decaying along rows outside.
    assert out.b.shape == x.shape and float(out.b[50, 40, 0]) > 0


def test_empty_region_is_a_status_not_a_crash():
    x = np.zeros((H, W, C))
    empty = np.zeros((H, W), bool)
    out = st.line_statistic(x, x, empty, sigma=1.0)
    assert int(out.status) == st.StatStatus.EMPTY_REGION
    assert np.isnan(float(out.z_obs))
    with pytest.raises(InputError, match="empty region"):
        st.line_statistic(x, x, empty, sigma=1.0, empty="raise")
    full = np.ones((H, W), bool)
    out = st.line_statistic(x, None, full, sigma=1.0, hypothesis="background")
    assert int(out.status) == st.StatStatus.EMPTY_COMPARISON
    # Under jit every value problem becomes a status code.
    f = jax.jit(lambda x, r, m: st.line_statistic(x, r, m, sigma=1.0).status)
    assert int(f(x, x, empty)) == st.StatStatus.EMPTY_REGION
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    assert int(f(bad, x, full)) == st.StatStatus.NONFINITE


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((H, W, C))
    mask = np.zeros((H, W), bool)
    mask[1, 1] = True

    def call(**kw):
        args = dict(x=x, x_ref=x, mask=mask, sigma=1.0)
        args.update(kw)
        xx, xr, m = args.pop("x"), args.pop("x_ref"), args.pop("mask")
        return st.line_statistic(xx, xr, m, **args)

    nan = x.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="x holds NaN"):
        call(x=nan)
    with pytest.raises(InputError, match="x_ref holds NaN"):
        call(x_ref=np.where(np.isnan(nan), np.inf, x))
    with pytest.raises(InputError, match="x_ref.shape"):
        call(x_ref=x[:, :, :1])
    with pytest.raises(InputError, match="needs a reference"):
        call(x_ref=None)
    with pytest.raises(InputError, match="mask.shape"):
        call(mask=mask[:-1])
    with pytest.raises(InputError, match="boolean"):
        call(mask=mask.astype(int))
    with pytest.raises(InputError, match="hypothesis"):
        call(hypothesis="paired")
    with pytest.raises(InputError, match="variance > 0"):
        call(sigma=-1.0)
    var = np.ones((H, W, C))
    var[2, 2, 0] = -0.5
    with pytest.raises(InputError, match="1 negative"):
        call(sigma=var)
    var[2, 2, 0] = 0.0
    with pytest.raises(InputError, match="1 zero"):
        call(sigma=var)
    asym = np.eye(N)
    asym[0, 1] = 0.3
    with pytest.raises(InputError, match="not symmetric"):
        call(sigma=asym)
    indefinite = np.eye(N)
    indefinite[0, 1] = indefinite[1, 0] = 2.0
    with pytest.raises(InputError, match="positive semi-definite"):
        call(sigma=indefinite)
    with pytest.raises(InputError, match="fits neither"):
        call(sigma=np.ones((3, 3)))
    with pytest.raises(InputError, match="rho"):
        call(sigma=st.AR1Covariance(N, 1.0))
    with pytest.raises(InputError, match="not symmetric"):
        call(sigma=lambda v: jnp.cumsum(v))
    # Singular along eta: Sigma = u u^T with eta orthogonal to u -> eta^T Sigma eta = 0.
    u = np.ones(N)
    with pytest.raises(InputError, match="degenerate variance"):
        call(sigma=np.outer(u, u), hypothesis="background")
    with pytest.raises(InputError, match="degenerate variance"):
        st.line_statistic(x, None, None, sigma=1.0, eta=np.zeros_like(x))
