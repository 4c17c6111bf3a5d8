"""Checkpoint folders for a run's state, and PEFT adapter folders for export.

A checkpoint folder (what a `weights/` or `sampler_weights/` path names) holds:

    tinker_checkpoint.json   format version, base model, LoRA config, lora_alpha, step,
                             optimizer family ("adamw" or "dimuon"; absent: "adamw")
    state/                   an Orbax composite checkpoint: item `adapter`, and item
                             `optimizer` (`mu` and `nu`: AdamW's moments, or Dimuon's
                             momentum and zeros) when saved with it

Adapter and moment arrays are stored at the run's true rank, not the engine's padded max
rank: files stay small, and a checkpoint loads into an engine of any max rank >= its rank
(the trainer pads on import with `SlotLayout.fit`). Arrays are nested by the dotted parameter
name (`layers.self_attn.q_proj.lora_a` -> adapter/layers/self_attn/q_proj/lora_a).

A save becomes visible at its final path only when complete: everything is written into a
hidden sibling folder (`.<name>.partial-<hex>`) that is renamed into place at the end and
removed on any exception; only a killed process can leave one behind. On `gs://` (see
`storage`), which cannot rename, the save writes into its final prefix directly and the info
file, written last, is what makes it a checkpoint: `read_info` refuses a prefix without one.

On a multi-host runtime every process calls `save_state` and `load_state` with the same
arguments, as Orbax requires (its saves and restores synchronise all processes): the folder
must be on storage that every host sees. Given device arrays (`Trainer.sharded_state`), each
host writes its own shards; process 0 creates, completes and renames the folder. Arrays are
read back whole, as numpy, whatever sharding they were saved from.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from safetensors.numpy import save as safetensors_bytes

from tinker_jax import storage
from tinker_jax.errors import ValidationError
from tinker_jax.lora import TARGET_GROUPS
from tinker_jax.models import FAMILIES
from tinker_jax.models.family import DENSE_HF_KEYS
from tinker_jax.optim import OPTIMIZERS
from tinker_jax.trainer import LoraConfig, SlotState

log = logging.getLogger("tinker_jax.checkpoints")

FORMAT = "tinker-jax-checkpoint"
FORMAT_VERSION = 1
INFO_FILE = "tinker_checkpoint.json"
STATE_DIR = "state"

_LORA_FIELDS = ("rank", "seed", "train_attn", "train_mlp", "train_unembed")
# One Orbax checkpointer for the process (its construction is not free); saves and restores
# are serialised because it is not documented as safe for concurrent use.
_orbax_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint's metadata file says about it."""

    base_model: str
    lora: LoraConfig
    lora_alpha: float
    has_optimizer: bool
    step: int
    optimizer: str = "adamw"  # the run's optimizer family; its optimizer state is this one's


@functools.cache
def _checkpointer() -> ocp.Checkpointer:
    return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _rank_axis(name: str) -> int:
    """lora_a: [..., in, rank] -> -1; lora_b: [..., rank, out] -> -2."""
    return -1 if name.endswith("lora_a") else -2


def _trim(arrays: Mapping[str, np.ndarray | jax.Array], rank: int) -> dict:
    """Every array cut to `rank` along its rank axis. The padding must be zero (the trainer
    never moves it); anything else would be silently lost, so it is an error. Device arrays
    already at `rank` (`Trainer.sharded_state`) stay on the devices: Orbax writes them shard
    by shard, each host its own."""
    out = {}
    for name, value in arrays.items():
        axis = _rank_axis(name)
        if isinstance(value, jax.Array) and value.ndim >= 2 and value.shape[axis] == rank:
            out[name] = value
            continue
        value = np.asarray(value)
        if np.take(value, range(rank, value.shape[axis]), axis=axis).any():
            raise ValueError(f"{name} is non-zero beyond rank {rank}")
        out[name] = np.ascontiguousarray(np.take(value, range(rank), axis=axis))
    return out


def _nest(arrays: Mapping[str, np.ndarray]) -> dict:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}}."""
    tree: dict = {}
    for name, value in arrays.items():
        *parents, leaf = name.split(".")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `_nest`."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = np.asarray(value)
    return out


def _info_json(info: CheckpointInfo) -> str:
    return json.dumps(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "base_model": info.base_model,
            "lora": {f: getattr(info.lora, f) for f in _LORA_FIELDS},
            "lora_alpha": info.lora_alpha,
            "has_optimizer": info.has_optimizer,
            "step": info.step,
            "optimizer": info.optimizer,
        },
        indent=1,
    )


def _write_info(folder: epath.Path, info: CheckpointInfo) -> None:
    (folder / INFO_FILE).write_text(_info_json(info))


def _atomic_folder(directory: epath.Path, write, *, all_processes: bool = False) -> None:
    """Runs `write(folder)` so that `directory` appears complete or not at all. Locally,
    `folder` is a fresh hidden sibling renamed into place at the end; on object storage it
    is `directory` itself, and `write` must make the info file its last object. On any
    failure the written folder is removed. With `all_processes` (every process of a
    multi-host runtime calls it alike), they agree on the sibling's name and process 0
    alone creates, renames or removes it."""
    if directory.exists():
        raise ValidationError("path", f"{directory} already exists")
    primary = not all_processes or jax.process_index() == 0
    local = storage.is_local(directory)
    folder = directory
    if local:
        token = uuid.uuid4().bytes[:6]
        if all_processes and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            token = bytes(multihost_utils.broadcast_one_to_all(np.frombuffer(token, np.uint8)))
        folder = directory.parent / f".{directory.name}.partial-{token.hex()}"
        if primary:
            directory.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir()
    try:
        write(folder)
        if primary and local:
            try:
                os.rename(folder, directory)
            except OSError as e:  # another save won the name meanwhile
                raise ValidationError("path", f"{directory} already exists") from e
    except BaseException:
        if primary:
            storage.remove_tree(folder)
        raise


def save_state(
    directory: str | os.PathLike,
    state: SlotState,
    *,
    base_model: str,
    lora_alpha: float,
    with_optimizer: bool,
) -> int:
    """Writes `state` as a checkpoint folder at `directory` (which must not exist; its parents
    are created) and returns the folder's size in bytes. The adapter (and, `with_optimizer`,
    the AdamW moments) is trimmed to `state.lora.rank`; the metadata records `state.step`.
    Synchronous: returns once every file is written (no fsync). `directory` is a local path
    or a gs:// location (`storage.resolve`). Multi-host: called by every process alike (see
    the module's doc); the size returned is meaningful on process 0."""
    directory = storage.resolve(directory)
    rank = state.lora.rank
    items = {"adapter": ocp.args.PyTreeSave(_nest(_trim(state.adapter, rank)))}
    if with_optimizer:
        if state.mu is None or state.nu is None:
            raise ValueError("with_optimizer=True but the state holds no optimizer moments")
        moments = {"mu": _nest(_trim(state.mu, rank)), "nu": _nest(_trim(state.nu, rank))}
        items["optimizer"] = ocp.args.PyTreeSave(moments)
    info = CheckpointInfo(
        base_model=base_model,
        lora=state.lora,
        lora_alpha=float(lora_alpha),
        has_optimizer=with_optimizer,
        step=int(state.step),
        optimizer=state.optimizer,
    )

    def write(tmp: epath.Path) -> None:
        # Orbax starts with a barrier of all processes: the sibling exists when it writes.
        with _orbax_lock:
            _checkpointer().save(tmp / STATE_DIR, args=ocp.args.Composite(**items))
        if jax.process_index() == 0:  # last: a folder with a readable info file is complete
            _write_info(tmp, info)

    _atomic_folder(directory, write, all_processes=True)
    return storage.tree_size(directory)


def read_info(
    directory: str | os.PathLike, *, name: str = "the folder", field: str = "path"
) -> CheckpointInfo:
    """The checkpoint's metadata; ValidationError(`field`) when it is missing or unreadable.

    Errors call the checkpoint `name` (the service passes its tinker:// path) and never
    hold `directory`: they reach clients, who must not learn where the server stores files.
    The location of a damaged one is logged, for the operator."""
    directory = storage.resolve(directory)
    path = directory / INFO_FILE
    if not path.is_file():
        if directory.is_dir():
            raise ValidationError(field, f"{name} is not a checkpoint (it has no metadata file)")
        raise ValidationError(field, f"{name} does not exist in checkpoint storage")
    try:
        meta = json.loads(path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"unknown format {meta.get('format')!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"unsupported version {meta.get('version')!r}")
        lora = LoraConfig(**{f: meta["lora"][f] for f in _LORA_FIELDS})
        if not isinstance(lora.rank, int) or isinstance(lora.rank, bool) or lora.rank < 1:
            raise ValueError(f"bad rank {lora.rank!r}")
        optimizer = meta.get("optimizer", "adamw")  # checkpoints from before Dimuon: AdamW
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}")
        return CheckpointInfo(
            base_model=str(meta["base_model"]),
            lora=lora,
            lora_alpha=float(meta["lora_alpha"]),
            has_optimizer=bool(meta["has_optimizer"]),
            step=int(meta["step"]),
            optimizer=optimizer,
        )
    except OSError as e:  # its text names the file
        log.warning("cannot read %s: %s", path, e)
        reason = e.strerror or type(e).__name__
        raise ValidationError(field, f"{name}: unreadable checkpoint metadata ({reason})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("corrupt checkpoint metadata in %s: %s", path, e)
        raise ValidationError(field, f"{name}: corrupt checkpoint metadata ({e})") from None


def load_state(
    directory: str | os.PathLike, *, with_optimizer: bool
) -> tuple[SlotState, CheckpointInfo]:
    """Reads a checkpoint written by `save_state`. Arrays come back at the checkpoint's true
    rank (the trainer's `import_slot` pads them to its max rank). Without `with_optimizer`
    the moments are not read and the state has mu = nu = None, step 0.

    Raises ValidationError("path") when the folder is missing or corrupt, or when the
    optimizer is asked for and the checkpoint was saved without it; like `read_info`'s, its
    messages never hold `directory`."""
    directory = storage.resolve(directory)
    info = read_info(directory)
    if with_optimizer and not info.has_optimizer:
        raise ValidationError("path", "the checkpoint was saved without optimizer state")
    try:
        with _orbax_lock:
            # Every array comes back whole, as numpy, whatever sharding it was saved from.
            items = {}
            for item in ("adapter", "optimizer") if with_optimizer else ("adapter",):
                saved = ocp.PyTreeCheckpointHandler().metadata(directory / STATE_DIR / item)
                numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved.tree)
                items[item] = ocp.args.PyTreeRestore(restore_args=numpy)
            restored = _checkpointer().restore(
                directory / STATE_DIR, args=ocp.args.Composite(**items)
            )
        adapter = _flatten(restored["adapter"])
        mu = nu = None
        if with_optimizer:
            mu = _flatten(restored["optimizer"]["mu"])
            nu = _flatten(restored["optimizer"]["nu"])
    except Exception as e:  # Orbax/tensorstore raise many types for damaged files
        log.warning("cannot read the checkpoint arrays in %s: %s", directory, e)
        raise ValidationError(
            "path", f"cannot read checkpoint arrays ({type(e).__name__}; damaged files?)"
        ) from None
    for arrays in (adapter, mu, nu):
        for name, value in (arrays or {}).items():
            if value.ndim < 2 or value.shape[_rank_axis(name)] != info.lora.rank:
                raise ValidationError(
                    "path",
                    f"the checkpoint's {name} has shape {value.shape}, "
                    f"not rank {info.lora.rank} as its metadata says",
                )
    if mu is not None and not (mu.keys() == nu.keys() == adapter.keys()):
        raise ValidationError("path", "the checkpoint's optimizer arrays do not match its adapter")
    step = info.step if with_optimizer else 0
    return SlotState(info.lora, adapter, mu, nu, step, info.optimizer), info


def _peft_module(name: str, hf_keys: Mapping[str, tuple[str, bool]]) -> str:
    """Our adapter array name -> the HF module path template it adapts
    (`layers.mlp.up_proj.lora_b` -> `model.layers.{layer}.mlp.up_proj`)."""
    kernel = name.rsplit(".", 1)[0] + ".kernel"
    if kernel not in hf_keys:
        raise ValueError(f"no HF module known for adapter array {name}")
    return hf_keys[kernel][0].removesuffix(".weight")


def export_peft(
    directory: str | os.PathLike,
    state: SlotState,
    *,
    base_model: str,
    lora_alpha: float,
    hf_keys: Mapping[str, tuple[str, bool]] = DENSE_HF_KEYS,
    seal: Callable[[str, bytes], tuple[str, bytes]] | None = None,
) -> None:
    """Writes a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors)
    that `peft.PeftModel.from_pretrained` loads onto the HF base model; written atomically
    like a checkpoint, and `directory` must not exist. `seal(name, content)` gives each file's
    stored name and content instead (an encryption), so the plain files are never written.

    Only the modules the run trains are included (`train_attn`, `train_mlp`,
    `train_unembed` -> `target_modules`), at the true rank, fp32, in PEFT's key layout:
    `base_model.model.<module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r].
    `hf_keys` maps our parameter paths to HF keys (the model family's table)."""
    directory = storage.resolve(directory)
    lora = state.lora
    groups = dict(zip(TARGET_GROUPS, lora.flags().astype(bool)))
    enabled = {m for g, mods in TARGET_GROUPS.items() if groups[g] for m in mods}
    tensors: dict[str, np.ndarray] = {}
    targets: set[str] = set()
    for name, value in _trim(state.adapter, lora.rank).items():
        module = _peft_module(name, hf_keys)
        short = module.rsplit(".", 1)[-1]
        if short not in enabled:
            continue
        if "{expert}" in module:
            raise ValidationError(
                "train_mlp",
                "PEFT export of MoE expert adapters is not supported yet "
                "(shared-outer expert LoRA has no PEFT layout); train_mlp=False runs export",
            )
        targets.add(short)
        kind = "lora_A" if name.endswith("lora_a") else "lora_B"
        per_layer = enumerate(value) if "{layer}" in module else [(None, value)]
        for layer, v in per_layer:  # ours: A [in, r], B [r, out]; torch Linear: [out, in]
            key = f"base_model.model.{module.format(layer=layer)}.{kind}.weight"
            tensors[key] = np.ascontiguousarray(v.T)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.rank,
        "lora_alpha": float(lora_alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted(targets),
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }

    def write(folder: epath.Path) -> None:
        contents = {
            "adapter_model.safetensors": safetensors_bytes(tensors, metadata={"format": "pt"}),
            "adapter_config.json": json.dumps(config, indent=2).encode(),
        }
        for name, data in contents.items():
            if seal is not None:
                name, data = seal(name, data)
            (folder / name).write_bytes(data)

    _atomic_folder(directory, write)


def import_peft(
    directory: str | os.PathLike,
    *,
    base_model_dir: os.PathLike,
    base_model: str,
    max_rank: int,
    lora_alpha: float,
) -> SlotState:
    """A PEFT LoRA adapter folder (`adapter_config.json` + `adapter_model.safetensors`, as
    `export_peft` writes and PEFT saves) as a run's state on the base model of
    `base_model_dir`: ours A [layers, in, r] and B [layers, r, out] from PEFT's
    `lora_A.weight` [r, in] and `lora_B.weight` [out, r], B scaled by the adapter's
    `lora_alpha` over the server's (`lora_alpha`), so the run computes what PEFT computes.

    The run trains the groups the adapter targets (train_attn / train_mlp / train_unembed);
    modules of a targeted group that the adapter leaves out start at zero. Raises
    ValidationError naming the field when the adapter does not fit: its rank above
    `max_rank`, target modules the base model has no LoRA layer for, tensors whose shapes
    differ from the base model's, another base model, or PEFT options we do not compute
    (DoRA, rsLoRA, biases, fan_in_fan_out, modules_to_save)."""
    from flax import nnx
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from tinker_jax.lora import LoRAParam, LoRASpec, SlotLayout
    from tinker_jax.models.config import load_config
    from tinker_jax.models.decoder import Transformer

    folder = Path(directory)
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(folder / "adapter_model.safetensors")
    except (OSError, ValueError, SafetensorError) as e:
        raise ValidationError("adapter_dir", f"not a PEFT adapter folder ({e})") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise ValidationError("peft_type", f"{config.get('peft_type')!r} is not LORA")
    for option in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if config.get(option):
            raise ValidationError(option, "is not supported (plain LoRA only)")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ValidationError("modules_to_save", "biases and saved modules are not supported")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValidationError("rank_pattern", "per-module ranks or alphas are not supported")
    rank = config.get("r")
    if not isinstance(rank, int) or not 1 <= rank <= max_rank:
        raise ValidationError("r", f"rank {rank!r} is outside [1, {max_rank}] (max_lora_rank)")
    theirs = Path(str(config.get("base_model_name_or_path") or base_model)).name
    if theirs != Path(base_model).name:
        raise ValidationError(
            "base_model", f"the adapter was trained on {theirs}, not on {Path(base_model).name}"
        )
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        raise ValidationError("target_modules", f"{targets!r} must be a list of module names")
    ours = {m for modules in TARGET_GROUPS.values() for m in modules}
    if set(targets) - ours:
        raise ValidationError(
            "target_modules",
            f"{sorted(set(targets) - ours)} have no LoRA layer here; allowed: {sorted(ours)}",
        )
    cfg = load_config(Path(base_model_dir))
    hf_keys = FAMILIES[cfg.family].hf_keys
    abstract = nnx.eval_shape(lambda: Transformer(cfg, lora=LoRASpec(1, rank), rngs=nnx.Rngs(0)))
    lora_state = nnx.split(abstract, LoRAParam, ...)[1]
    layout = SlotLayout(lora_state)
    scale_b = float(config.get("lora_alpha", lora_alpha)) / lora_alpha
    adapter: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for leaf, shape in zip(layout.leaves, layout.slot_shapes(lora_state)):
        module = _peft_module(leaf.name, hf_keys)
        short = module.rsplit(".", 1)[-1]
        if short not in targets:
            adapter[leaf.name] = np.zeros(shape, np.float32)
            continue
        if "{expert}" in module:
            raise ValidationError(
                "target_modules", "adapters of MoE experts have no PEFT layout; leave out the MLP"
            )
        kind = "lora_A" if leaf.is_a else "lora_B"
        layers = range(shape[0]) if "{layer}" in module else [None]
        parts = []
        for layer in layers:
            key = f"base_model.model.{module.format(layer=layer)}.{kind}.weight"
            if key not in tensors:
                raise ValidationError("adapter_model", f"tensor {key} is missing")
            parts.append(np.asarray(tensors[key], np.float32).T)  # torch [out, in] -> ours
            used.add(key)
        value = np.stack(parts) if "{layer}" in module else parts[0]
        if value.shape != tuple(shape):
            raise ValidationError(
                "adapter_model",
                f"{leaf.name} has shape {value.shape}, the base model's is {tuple(shape)}",
            )
        adapter[leaf.name] = value if leaf.is_a else value * scale_b
    if set(tensors) - used:
        extra = sorted(set(tensors) - used)
        raise ValidationError("adapter_model", f"tensors of no target module: {extra[:3]}")
    flags = {g: any(m in targets for m in modules) for g, modules in TARGET_GROUPS.items()}
    lora = LoraConfig(rank, None, flags["attn"], flags["mlp"], flags["unembed"])
    return SlotState(lora, adapter)
