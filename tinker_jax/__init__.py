"""tinker-jax: a self-hostable, JAX-native Tinker service.

Importing this package must not import JAX: a client-only install has no JAX. The client
API (`ServiceClient`, `TrainingClient`, ..., the exceptions, `types`) is importable from
here and loaded on first access.
"""

import importlib

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "types":
        return importlib.import_module("tinker_jax.types")
    client = importlib.import_module("tinker_jax.client")
    if name in client.__all__:
        return getattr(client, name)
    raise AttributeError(f"module 'tinker_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *importlib.import_module("tinker_jax.client").__all__])
