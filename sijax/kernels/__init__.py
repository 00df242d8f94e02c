"""Optional hand-written kernels, each with a plain-jnp reference twin (STYLE habit 20).

The library works with every kernel switched off (the default).
"""
