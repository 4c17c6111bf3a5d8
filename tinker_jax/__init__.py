"""tinker-jax: a self-hostable, JAX-native Tinker service.

Importing this package must not import JAX: a client-only install has no JAX. The client
API (`ServiceClient`, `TrainingClient`, ..., the exceptions, `types`) is importable from
here and loaded on first access.
"""

import importlib
import importlib.util

__version__ = "0.1.0"


def __getattr__(name: str):
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # A submodule (`from tinker_jax import checkpoints`, `tinker_jax.types`): the import
        # system asks here first, and must not load the client (and gRPC) for it.
        return importlib.import_module(f"{__name__}.{name}")
    client = importlib.import_module("tinker_jax.client")
    if name in client.__all__:
        return getattr(client, name)
    raise AttributeError(f"module 'tinker_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *importlib.import_module("tinker_jax.client").__all__])
