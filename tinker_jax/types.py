"""Tinker's types (`ModelInput`, `Datum`, `TensorData`, `SamplingParams`, ...).

A re-export of `tinker_jax.client.types`, so `import tinker_jax.types as types` works like
`tinker.types`, JAX or not.
"""

from tinker_jax.client.types import *  # noqa: F403
from tinker_jax.client.types import __all__  # noqa: F401
