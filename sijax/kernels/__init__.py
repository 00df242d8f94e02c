"""Optional hand-written kernels, each with a plain-jnp reference twin.

The library works with every kernel switched off (the default).
"""
