"""tinker-jax: a self-hostable, JAX-native Tinker service.

Importing this package must not import JAX: a client-only install has no JAX.
"""

__version__ = "0.1.0"
