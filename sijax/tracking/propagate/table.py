"""The rule table: one rule per primitive."""

from collections.abc import Callable

from sijax.tracking.control import CALLS
from sijax.tracking.propagate.control_flow import (
    call_rule,
    cond_rule,
    scan_rule,
    while_rule,
)
from sijax.tracking.propagate.pointwise import (
    checked_rule,
    elementwise_rule,
    envelope_rule,
    identity_rule,
    integer_pow_rule,
    linear_rule,
    reduce_entries,
    reduce_window_max,
    reduce_window_rule,
)
from sijax.tracking.rules import (
    COMPARE,
    LINEAR,
)


def _pair_max(invals):
    return [(invals[0], invals[1])]


def _pair_abs(invals):
    return [(invals[0], 0.0)]


def _pair_clamp(invals):
    lo, x, hi = invals
    return [(x, lo), (x, hi)]


RULES: dict[str, Callable] = {name: linear_rule for name in LINEAR}
RULES.update(
    {
        "mul": checked_rule,
        "dot_general": checked_rule,
        "conv_general_dilated": checked_rule,
        "div": checked_rule,
        "convert_element_type": checked_rule,
        "integer_pow": integer_pow_rule,
        "stop_gradient": identity_rule,
        "optimization_barrier": identity_rule,
        "debug_callback": linear_rule,
        "max": elementwise_rule(_pair_max, discrete=False),
        "min": elementwise_rule(_pair_max, discrete=False),
        "clamp": elementwise_rule(_pair_clamp, discrete=False),
        "abs": elementwise_rule(_pair_abs, discrete=False),
        "sign": elementwise_rule(_pair_abs, discrete=True),
        "reduce_max": envelope_rule(reduce_entries, discrete=False),
        "reduce_min": envelope_rule(reduce_entries, discrete=False),
        "argmax": envelope_rule(reduce_entries, discrete=True),
        "argmin": envelope_rule(reduce_entries, discrete=True),
        "reduce_window_max": reduce_window_max,
        "reduce_window_min": reduce_window_max,
        "reduce_window": reduce_window_rule,
        **{name: elementwise_rule(_pair_max, discrete=True) for name in COMPARE},
        **{name: call_rule for name in CALLS},
        "scan": scan_rule,
        "cond": cond_rule,
        "while": while_rule,
    }
)
