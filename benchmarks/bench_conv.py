"""Time of each 3x3 convolution of the dal_v5 U-Net per formulation (not a test).

The seven convolutions of one U-Net call at ``--size`` (channels 32, 64, 128, 256), on
a float64 batch of ``--batch`` images (2: the tracker's value and slope), jitted,
median of 20 calls after a warm-up. Formulations:

- im2col: nine shifted copies of the padded input side by side, one product
  (pixels, 9 cin) x (9 cin, cout); sijax's convolution until b1abef7;
- lax: XLA's ``lax.conv_general_dilated``;
- taps: one product (pixels, cin) x (cin, 9 cout), the nine outputs shifted and added;
- conv2d: ``sijax.diffusion.conv.conv2d``, which picks lax or taps by output size.

    taskset -c 1 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \\
        intra_op_parallelism_threads=1" python benchmarks/bench_conv.py --size 16
"""

import argparse
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from bench_tracking import _environment  # noqa: E402  (commit, device, load)

from sijax.diffusion.conv import LAX_CONV_MIN_PIXELS, conv2d  # noqa: E402

PADS = ((1, 1), (1, 1))


def im2col(x, k):
    b, h, w, cin = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate(
        [xp[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1
    )
    return jnp.einsum("bhwk,kc->bhwc", cols, k.reshape(9 * cin, -1))


def lax_conv(x, k):
    return conv2d(x, k, PADS, lax_min_pixels=0)


def taps(x, k):
    return conv2d(x, k, PADS, lax_min_pixels=2**62)


def rule(x, k):
    return conv2d(x, k, PADS)


FORMS = {"im2col": im2col, "lax": lax_conv, "taps": taps, "conv2d": rule}


def median_ms(f, *args, reps=20):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(ts))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()
    s = args.size
    layers = [(s, 1, 32), (s // 2, 32, 64), (s // 4, 64, 128), (s // 8, 128, 256),
              (s // 4, 384, 128), (s // 2, 192, 64), (s, 96, 32)]  # fmt: skip
    env = _environment()
    print(f"size {s}, batch {args.batch}, float64; commit {env['commit']}, "
          f"{env['device']}, {env['cpu']}, cores {env['cores']}, load {env['load']}; "
          f"conv2d uses lax from {LAX_CONV_MIN_PIXELS} output pixels")  # fmt: skip
    print("| layer | MFLOP | " + " | ".join(f"{n} (ms)" for n in FORMS) + " |")
    print("|---|---|" + "---|" * len(FORMS))
    total = dict.fromkeys(FORMS, 0.0)
    for hw, cin, cout in layers:
        x = jax.random.normal(jax.random.key(0), (args.batch, hw, hw, cin), jnp.float64)
        k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout), jnp.float64)
        ref = np.asarray(im2col(x, k))
        row = []
        for name, f in FORMS.items():
            jf = jax.jit(f)
            np.testing.assert_allclose(jf(x, k), ref, rtol=1e-9, atol=1e-9)
            ms = median_ms(jf, x, k)
            total[name] += ms
            row.append(f"{ms:.3f}")
        mflop = 2e-6 * args.batch * hw * hw * 9 * cin * cout
        print(f"| {hw}x{hw} {cin}->{cout} | {mflop:.1f} | " + " | ".join(row) + " |")
    print("| all seven | | " + " | ".join(f"{v:.2f}" for v in total.values()) + " |")


if __name__ == "__main__":
    main()
