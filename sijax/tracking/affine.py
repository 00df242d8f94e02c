"""Types of the tracker: affine forms along a line, and one linear piece.

docs/method.md §4: along x(t) = a + b t every tensor of a piecewise-linear program
equals
alpha + beta t on a piece [lo, hi]. Inside the interpreter a line-dependent value is
carried as its value *at the tracked point z* and its slope (`Lin`), not as alpha =
f(0): for large |z| (extreme statistics, |z| of 10 to 40) alpha is a difference of two
large numbers, while value-at-z is what the forward pass computes anyway. `alpha = value
- slope * z` is formed once, at the output.
"""

from typing import Any, NamedTuple

import jax


class Affine(NamedTuple):
    """An affine function of the line parameter t: alpha + beta * t.

    `alpha` and `beta` have the shape and dtype of the tracked output leaf. On its piece
    [lo, hi], f(a + b t) == alpha + beta * t for every t (to rounding).
    """

    alpha: jax.Array  # (...) value at t = 0 of the affine extension
    beta: jax.Array  # (...) slope d/dt

    def at(self, t: jax.Array) -> jax.Array:
        """Evaluates the affine form at a scalar t."""
        return self.alpha + self.beta * t


class Piece(NamedTuple):
    """One linear piece of f along the line.

    `out` has the structure of f's output: floating leaves are `Affine`, boolean and
    integer leaves their (constant) value on the piece. `lo <= z <= hi`, infinite where
    no decision of f can change on that side.
    """

    out: Any  # pytree like f(x): Affine for float leaves, arrays for bool/int leaves
    lo: jax.Array  # () start of the piece
    hi: jax.Array  # () end of the piece


class Lin(NamedTuple):
    """A line-dependent value inside the interpreter: u(t) = value + slope * (t - z).

    Only floating values are ever `Lin`; booleans and integers computed from the line
    are constant on a piece and carried as plain arrays. A plain array (anything not
    `Lin`) is a constant: it does not depend on t.
    """

    value: jax.Array  # (...) u(z)
    slope: jax.Array  # (...) du/dt, same shape and dtype as value
