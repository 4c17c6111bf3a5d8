"""Loading a base model from a local HF folder (or the HF cache) into its target sharding.

The model is first built abstractly (`nnx.eval_shape`: no memory); then every parameter is
created with `jax.make_array_from_callback`, which reads from safetensors only the slice each
device holds. Neither one device nor host RAM ever holds the whole model. A joined parameter
(k and v, gate and up: `lora.JoinedLinear`) is filled from its members' HF tensors, each
device reading its slice of each (`hf_parts`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy before safetensors reads it)
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from tinker_jax.errors import ValidationError
from tinker_jax.lora import LoRAParam, LoRASpec
from tinker_jax.models import FAMILIES
from tinker_jax.models.config import ModelConfig, load_config
from tinker_jax.models.decoder import Transformer
from tinker_jax.models.family import expand_key, stacked_axes
from tinker_jax.sharding import make_mesh, named_sharding


def resolve_model_dir(name_or_path: str) -> Path:
    """A local folder, or a hub-style name already in the HF cache (never downloads)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or name_or_path.startswith("."):
        raise ValidationError("base_model", f"folder {name_or_path} does not exist")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as e:  # the hub raises several types for "not cached"/"bad name"
        raise ValidationError(
            "base_model",
            f"{name_or_path!r} is neither a local folder nor a model in the HF cache ({e})",
        ) from None


class SafetensorsIndex:
    """Maps tensor names to the safetensors file that holds them (single or sharded)."""

    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        single = model_dir / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: model_dir / f for k, f in weight_map.items()}
        elif single.is_file():
            with safe_open(single, framework="numpy") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise ValidationError(
                "base_model", f"no model.safetensors or model.safetensors.index.json in {model_dir}"
            )
        for f in set(self.files.values()):
            if not f.is_file():
                raise ValidationError("base_model", f"missing weight file {f}")

    def read(self, key: str, index: tuple[slice, ...], transpose: bool) -> np.ndarray:
        """The slice `index` of tensor `key` in our layout (transposed from HF's when asked)."""
        if key not in self.files:
            raise ValidationError("base_model", f"tensor {key} not found in the checkpoint")
        hf_index = tuple(reversed(index)) if transpose else index
        with safe_open(self.files[key], framework="numpy") as f:
            arr = f.get_slice(key)[hf_index]
        return arr.T if transpose else arr

    def shape(self, key: str, transpose: bool) -> tuple[int, ...]:
        if key not in self.files:
            raise ValidationError("base_model", f"tensor {key} not found in the checkpoint")
        with safe_open(self.files[key], framework="numpy") as f:
            shape = tuple(f.get_slice(key).get_shape())
        return tuple(reversed(shape)) if transpose else shape


def _param_reader(
    ckpt: SafetensorsIndex,
    path: str,
    hf_key: str,
    transpose: bool,
    shape: tuple[int, ...],
    dtype: np.dtype,
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A `make_array_from_callback` callback for one parameter. A key template with
    placeholders (`{layer}`, `{expert}`) stacks one HF tensor per index of as many leading
    axes: a device's shard reads only the tensors, and the slices of them, it holds."""
    n = len(stacked_axes(hf_key))
    expected = shape[n:]
    first = next(expand_key(hf_key, (range(1),) * n))
    found = ckpt.shape(first, transpose)
    if found != expected:
        raise ValidationError(
            "base_model",
            f"tensor {first} has shape {found} (after layout), expected {expected} "
            f"for {path}: the checkpoint does not match config.json",
        )
    cache: dict[tuple, np.ndarray] = {}

    def read(index: tuple[slice, ...]) -> np.ndarray:
        key = tuple((s.start, s.stop, s.step) for s in index)
        if key not in cache:
            leading = tuple(range(*s.indices(d)) for s, d in zip(index[:n], shape[:n]))
            parts = np.stack(
                [ckpt.read(k, index[n:], transpose) for k in expand_key(hf_key, leading)]
            )  # [tensors, ...] in row-major order of the leading axes
            cache[key] = parts.reshape(*map(len, leading), *parts.shape[1:]).astype(dtype)
        return cache[key]

    return read


def _joined_reader(
    members: list[Callable[[tuple[slice, ...]], np.ndarray]],
) -> Callable[[tuple[slice, ...]], np.ndarray]:
    """A `make_array_from_callback` callback for a joined parameter (`hf_parts`): the slices
    its members' callbacks read, stacked along axis -2."""

    def read(index: tuple[slice, ...]) -> np.ndarray:
        rest = (*index[:-2], index[-1])
        chosen = range(*index[-2].indices(len(members)))
        return np.stack([members[i](rest) for i in chosen], axis=-2)

    return read


def hf_parts(name: str, var: nnx.Variable) -> list[tuple[str, tuple[int, ...]]]:
    """(path, shape) of each linear layer whose HF tensor base parameter `name` holds: the
    parameter itself, or for a joined one (`lora.JoinedLinear`: kernel [in, members, out],
    bias [members, out]; metadata `joins` names the members) each member's
    (`...mlp.gate_up_proj.kernel` -> `...mlp.gate_proj.kernel`, `...mlp.up_proj.kernel`),
    stacked along axis -2 in that order."""
    if not var.has_metadata("joins"):
        return [(name, tuple(var.shape))]
    module, _, leaf = name.rsplit(".", 2)
    shape = (*var.shape[:-2], var.shape[-1])
    return [(f"{module}.{member}.{leaf}", shape) for member in var.get_metadata("joins")]


def base_hf_key(name: str, hf_keys: dict[str, tuple[str, bool]]) -> tuple[str, bool]:
    """(HF key template, transposed) of a base parameter. Layer `i`'s parameters
    (`blocks.{i}.self_attn.q_proj.kernel`) are the `layers.` entries of the family's table
    with `{layer}` filled in."""
    parts = name.split(".")
    layer = parts[1] if parts[0] == "blocks" else None
    table_name = ".".join(["layers", *parts[2:]]) if layer is not None else name
    if table_name not in hf_keys:
        raise ValidationError("base_model", f"no checkpoint key known for {name}")
    hf_key, transpose = hf_keys[table_name]
    return (hf_key if layer is None else hf_key.replace("{layer}", layer)), transpose


def load_model(
    name_or_path: str,
    *,
    lora: LoRASpec | None,
    mesh: Mesh | None = None,
    dtype: jnp.dtype = jnp.float32,
    remat: str = "none",
    attention: str = "einsum",
) -> tuple[Transformer, ModelConfig]:
    """Builds the model for a HF folder/cache name with weights placed in their shardings."""
    model_dir = resolve_model_dir(name_or_path)
    cfg = load_config(model_dir)
    mesh = mesh if mesh is not None else make_mesh()
    ckpt = SafetensorsIndex(model_dir)
    hf_keys = FAMILIES[cfg.family].hf_keys
    abstract = nnx.eval_shape(
        lambda: Transformer(
            cfg, lora=lora, dtype=dtype, remat=remat, attention=attention, rngs=nnx.Rngs(0)
        )
    )
    graphdef, state = nnx.split(abstract)
    np_dtype = np.dtype(jnp.dtype(dtype))

    def materialise(path: tuple, var: nnx.Variable) -> nnx.Variable:
        name = ".".join(str(p) for p in path)
        shape = var.shape
        sharding = named_sharding(mesh, var.get_metadata("logical_axes"), shape)
        if isinstance(var, LoRAParam):
            value = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()
        else:
            readers = [
                _param_reader(ckpt, part, *base_hf_key(part, hf_keys), part_shape, np_dtype)
                for part, part_shape in hf_parts(name, var)
            ]
            joined = var.has_metadata("joins")
            reader = _joined_reader(readers) if joined else readers[0]
            value = jax.make_array_from_callback(shape, sharding, reader)
        return var.replace(value)

    state = nnx.map_state(materialise, state)
    return nnx.merge(graphdef, state), cfg
