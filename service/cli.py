"""The `tinker-jax` command: serve, manage API keys, run the demo."""

from __future__ import annotations

import argparse
import datetime
import logging
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tinker_jax.service.store import KeyRecord, Store

from tinker_jax.errors import ValidationError
from tinker_jax.service.logs import FORMATS, formatter, request_log
from tinker_jax.xla_flags import apply_xla_flags


def _serve(args: argparse.Namespace) -> int:
    from tinker_jax import distributed
    from tinker_jax.service.config import ServerConfig, parse_mesh
    from tinker_jax.service.server import Server, follow_host0

    values = ServerConfig.from_toml(args.config) if args.config else {}
    flags = {
        "base_models": args.base_model,
        "storage": args.storage,
        "checkpoint_storage": args.checkpoint_storage,
        "host": args.host,
        "port": args.port,
        "http_port": args.http_port,
        "http_max_body_bytes": args.http_max_body_bytes,
        "metrics_without_key": args.metrics_without_key or None,
        "max_lora_rank": args.max_lora_rank,
        "max_adapters": args.max_adapters,
        "dtype": args.dtype,
        "attention": args.attention,
        "prefix_cache_share": args.prefix_cache_share,
        "max_seq_len": args.max_seq_len,
        "prefill_chunk": args.prefill_chunk,
        "mesh": parse_mesh(args.mesh) if args.mesh else None,
        "precompile": args.precompile,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    values.setdefault("precompile", "common")  # serving compiles ahead unless told not to
    if "storage" not in values:
        raise ValidationError("storage", "give --storage DIR (or storage in the config file)")
    if args.compilation_cache:
        import jax

        jax.config.update("jax_compilation_cache_dir", str(args.compilation_cache))
    try:
        distributed.initialize(
            args.coordinator, args.num_processes, args.process_id, auto=args.distributed
        )
    except ValueError as e:
        raise ValidationError("coordinator", str(e)) from None
    config = ServerConfig.from_dict(values)
    if distributed.process_index() > 0:
        follow_host0(config)  # returns when process 0 stops
        return 0
    server = Server(config)
    print(
        f"tinker-jax listening on {server.config.host}:{server.port}", file=sys.stderr, flush=True
    )
    if server.http_port is not None:
        print(
            f"tinker-jax HTTP listening on {server.config.host}:{server.http_port}",
            file=sys.stderr,
            flush=True,
        )
    signal.signal(signal.SIGTERM, lambda *_: server._stopped.set())
    try:
        server.wait()
    except KeyboardInterrupt:
        pass
    server.stop()
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from tinker_jax.service.store import Store

    store = Store(Path(args.storage).expanduser().resolve())
    _, key = store.create_user(args.name, admin=args.admin)
    store.close()
    print(key)
    return 0


def _existing_store(storage: str) -> Store:
    """The store in `storage`, which must hold a database already: listing or revoking keys in
    a mistyped folder must fail, not create an empty database there."""
    from tinker_jax.service.store import DB_NAME, Store

    folder = Path(storage).expanduser().resolve()
    if not (folder / DB_NAME).is_file():
        raise ValidationError("storage", f"{folder} holds no tinker-jax database ({DB_NAME})")
    return Store(folder)


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_line(key: KeyRecord, name_width: int = 0) -> str:
    """One key as `keys list` and `keys revoke` print it: user, key id, created, state."""
    state = "active" if key.revoked is None else f"revoked {_utc(key.revoked)}"
    admin = "  admin" if key.admin else ""
    line = f"{key.user_name:<{name_width}}  {key.key_id}  created {_utc(key.created)}  {state}"
    return line + admin


def _keys_list(args: argparse.Namespace) -> int:
    """Prints every API key (never the key: a prefix that tells keys apart), one a line."""
    store = _existing_store(args.storage)
    keys = store.list_keys()
    store.close()
    width = max((len(k.user_name) for k in keys), default=0)
    for key in keys:
        print(_key_line(key, width))
    if not keys:
        print(f"no API keys in {args.storage}", file=sys.stderr)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    """Revokes a user's keys or one key (by prefix); a running server refuses them from its
    next call on. Nothing matched, or an ambiguous prefix, is an error (exit status 2)."""
    store = _existing_store(args.storage)
    try:
        revoked, before = store.revoke_keys(args.name_or_prefix)
    finally:
        store.close()
    for key in revoked:
        print(f"revoked {_key_line(key)}")
    for key in before:
        print(f"already revoked {_key_line(key)}")
    return 0


def _export_peft(args: argparse.Namespace) -> int:
    """Writes a checkpoint's adapter as a PEFT folder (loads in PEFT and vLLM)."""
    from tinker_jax import checkpoints
    from tinker_jax.service.paths import TinkerPath
    from tinker_jax.service.store import Store

    store = Store(Path(args.storage).expanduser().resolve())
    record = store.get_checkpoint(str(TinkerPath.parse(args.path)))
    store.close()
    if record is None:
        raise ValidationError("path", f"checkpoint {args.path} not found in {args.storage}")
    state, info = checkpoints.load_state(record.location, with_optimizer=False)
    checkpoints.export_peft(args.out, state, base_model=info.base_model, lora_alpha=info.lora_alpha)
    print(args.out)
    return 0


def _export_merged(args: argparse.Namespace) -> int:
    """Writes the checkpoint's base model with its adapter merged in, as a HF folder."""
    from tinker_jax import checkpoints
    from tinker_jax.merge import export_merged
    from tinker_jax.service.paths import TinkerPath
    from tinker_jax.service.store import Store
    from tinker_jax.weights import resolve_model_dir

    store = Store(Path(args.storage).expanduser().resolve())
    record = store.get_checkpoint(str(TinkerPath.parse(args.checkpoint, "checkpoint")))
    store.close()
    if record is None:
        raise ValidationError("checkpoint", f"{args.checkpoint} not found in {args.storage}")
    state, info = checkpoints.load_state(record.location, with_optimizer=False)
    out = export_merged(
        args.out_dir,
        state,
        base_model_dir=resolve_model_dir(info.base_model),
        lora_alpha=info.lora_alpha,
    )
    print(out)
    return 0


def _import_peft(args: argparse.Namespace) -> int:
    """Stores a PEFT adapter folder made elsewhere as a user's `weights/` checkpoint of a new
    (finished) run, which create_training_client_from_state and create_sampling_client load."""
    from tinker_jax import storage
    from tinker_jax.service.config import ServerConfig
    from tinker_jax.service.core import import_adapter

    store = _existing_store(args.storage)
    try:
        user = store.user_id(args.user)
        if user is None:
            raise ValidationError("user", f"no user named {args.user!r} (tinker-jax keys list)")
        config = ServerConfig(
            base_models=(args.base_model,),
            storage=Path(args.storage).expanduser().resolve(),
            checkpoint_storage=args.checkpoint_storage,
        )
        path = import_adapter(
            store,
            storage.resolve(config.checkpoint_location, "checkpoint_storage"),
            user,
            args.adapter_dir,
            base_model=args.base_model,
            name=args.name or Path(args.adapter_dir).resolve().name,
            max_rank=args.max_lora_rank,
            lora_alpha=args.lora_alpha,
        )
    finally:
        store.close()
    print(path)
    return 0


def _restore_database(args: argparse.Namespace) -> int:
    """Puts the database copy that a server keeps beside its checkpoints back as the
    database of --storage (a new disk after the old one was lost)."""
    from tinker_jax.service.checkpoint_storage import restore

    folder = Path(args.storage).expanduser().resolve()
    store, listed, dropped = restore(folder, args.checkpoint_storage)
    print(
        f"restored database {store.database_id} into {folder}; since the copy was taken, "
        f"{listed} checkpoints were saved (now listed) and {dropped} deleted (now unlisted)"
    )
    store.close()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from tinker_jax.service.demo import run_demo

    if args.log_level != "debug":  # its reader watches a progress bar, not a request log
        request_log.setLevel(logging.WARNING)
    return run_demo(steps=args.steps)


def main(argv: list[str] | None = None) -> int:
    apply_xla_flags()  # before any subcommand imports JAX
    parser = argparse.ArgumentParser(prog="tinker-jax", description=__doc__)
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        default="info",
        help="our own log lines at this level; 'debug' also shows the libraries' (JAX, Orbax)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--base-model", action="append", help="HF name or folder (repeatable)")
    serve.add_argument("--storage", help="local folder for the database (and checkpoints)")
    serve.add_argument(
        "--checkpoint-storage",
        help="where checkpoints go instead of STORAGE/checkpoints: a folder or gs://BUCKET/PATH",
    )
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None, help="gRPC port (0: a free one)")
    serve.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="also serve Tinker's HTTP protocol (the official SDK) here (0: a free port)",
    )
    serve.add_argument(
        "--http-max-body-bytes", type=int, default=None, help="largest HTTP request body"
    )
    serve.add_argument(
        "--metrics-without-key",
        action="store_true",
        help="serve GET /metrics without an API key (a Prometheus on a trusted network)",
    )
    serve.add_argument(
        "--log-format",
        choices=FORMATS,
        default="text",
        help="text lines for people, or one JSON object per line for machines",
    )
    serve.add_argument(
        "--mesh",
        default=None,
        help="mesh axis sizes, e.g. data=1,fsdp=-1,tensor=1; sequence=N splits each training "
        "sequence over N devices (long context)",
    )
    serve.add_argument("--max-lora-rank", type=int, default=None)
    serve.add_argument("--max-adapters", type=int, default=None)
    serve.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    serve.add_argument(
        "--attention",
        choices=["auto", "einsum", "chunked", "pallas", "xla", "cudnn"],
        default=None,
        help="self-attention kernel (auto: with a sequence mesh axis pallas on a TPU, else "
        "chunked; without one cuDNN on a GPU in bfloat16, xla on CPU, else einsum; chunked: "
        "flash-style, memory linear in the sequence length; pallas: the same as a Pallas TPU "
        "kernel, interpreted (slow) on CPU)",
    )
    serve.add_argument(
        "--prefix-cache-share",
        type=float,
        default=None,
        help="KV prefix cache size, as a share of the KV cache (default 0.25; 0: off)",
    )
    serve.add_argument(
        "--precompile",
        choices=["none", "common", "all"],
        default=None,
        help="compile the engine's programs in the background from start-up, most likely "
        "first (default common: the default loss, one or several runs per step, a run's "
        "step of the cookbook's RL losses, sampling from one or several adapters, one "
        "request's prompt logprobs; all: every loss, shape and mix)",
    )
    serve.add_argument(
        "--max-seq-len",
        type=int,
        default=None,
        help="longest sequence (prompt + sampled tokens) and KV cache length, at most the "
        "model's context (default 4096); refused at start-up when the memory plan does not fit",
    )
    serve.add_argument(
        "--prefill-chunk",
        type=int,
        default=None,
        help="prompt positions one prefill computes at most, a power of two (default 2048): "
        "longer prompts prefill in chunks, their activations bounded by one chunk",
    )
    serve.add_argument("--config", type=Path, help="TOML file with the same settings")
    serve.add_argument("--compilation-cache", type=Path, help="JAX persistent cache folder")
    serve.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: join the other hosts as jax.distributed detects them (Cloud TPU, "
        "SLURM, Open MPI); process 0 serves clients, the others follow it",
    )
    serve.add_argument(
        "--coordinator", help="multi-host: HOST:PORT of process 0's coordination service"
    )
    serve.add_argument("--num-processes", type=int, help="multi-host: how many processes")
    serve.add_argument("--process-id", type=int, help="multi-host: this process, 0 serves")
    serve.set_defaults(func=_serve)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a user and print its new API key")
    create.add_argument("name")
    create.add_argument("--storage", required=True)
    create.add_argument(
        "--admin",
        action="store_true",
        help="an administrator's key: the web console shows it the server's load",
    )
    create.set_defaults(func=_keys_create)
    listing = keys_sub.add_parser(
        "list", help="list every API key: user, key prefix, created, revoked or active"
    )
    listing.add_argument("--storage", required=True)
    listing.set_defaults(func=_keys_list)
    revoke = keys_sub.add_parser(
        "revoke", help="revoke all keys of a user, or the one key a prefix (from list) names"
    )
    revoke.add_argument("name_or_prefix", help="a user name, or a key prefix (8+ characters)")
    revoke.add_argument("--storage", required=True)
    revoke.set_defaults(func=_keys_revoke)

    export = sub.add_parser("export-peft", help="write a checkpoint as a PEFT adapter folder")
    export.add_argument("path", help="tinker://<run>/weights/<name> or .../sampler_weights/...")
    export.add_argument("--storage", required=True)
    export.add_argument("--out", required=True, help="a new folder or gs://BUCKET/PATH")
    export.set_defaults(func=_export_peft)

    merged = sub.add_parser(
        "export-merged",
        help="write a checkpoint's base model with its adapter merged in, as a HF folder",
    )
    merged.add_argument(
        "checkpoint", help="tinker://<run>/weights/<name> or .../sampler_weights/..."
    )
    merged.add_argument("out_dir", help="a new folder")
    merged.add_argument("--storage", required=True)
    merged.set_defaults(func=_export_merged)

    imported = sub.add_parser(
        "import-peft",
        help="store a PEFT adapter folder as a user's tinker://<run>/weights/<name> checkpoint",
    )
    imported.add_argument("adapter_dir", help="adapter_config.json + adapter_model.safetensors")
    imported.add_argument("--user", required=True, help="the owner's name (tinker-jax keys list)")
    imported.add_argument("--base-model", required=True, help="as the server serves it")
    imported.add_argument("--name", help="the checkpoint's name (default: the folder's)")
    imported.add_argument("--storage", required=True)
    imported.add_argument("--checkpoint-storage", help="the server's, if not <storage>/checkpoints")
    imported.add_argument("--max-lora-rank", type=int, default=32, help="the server's")
    imported.add_argument("--lora-alpha", type=float, default=32.0, help="the server's")
    imported.set_defaults(func=_import_peft)

    restore = sub.add_parser(
        "restore-database",
        help="restore the database from the copy a server keeps in its checkpoint storage",
    )
    restore.add_argument("--storage", required=True, help="a folder without a database")
    restore.add_argument(
        "--checkpoint-storage", required=True, help="the server's checkpoint storage (gs:// too)"
    )
    restore.set_defaults(func=_restore_database)

    demo = sub.add_parser(
        "demo",
        help="serve the built-in tiny model and train on it (one line per request only with "
        "--log-level debug)",
    )
    demo.add_argument("--steps", type=int, default=20)
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    _configure_logging(args.log_level, getattr(args, "log_format", "text"))
    try:
        return args.func(args)
    except ValidationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _configure_logging(level: str, log_format: str = "text") -> None:
    """Our own lines (start-up, listening, memory plan, errors, one per checkpoint, one per
    request) at `level`, as `log_format` (`logs.FORMATS`); the libraries' chatter (Orbax's
    many lines per checkpoint, JAX's backend probing) only with "debug", and their warnings
    always."""
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a host (pytest) may have its own
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(formatter(log_format))
        root.addHandler(handler)
    logging.getLogger().setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    logging.getLogger("tinker_jax").setLevel(level.upper())
    request_log.setLevel(logging.NOTSET)  # as "tinker_jax", unless a command says otherwise


if __name__ == "__main__":
    sys.exit(main())
