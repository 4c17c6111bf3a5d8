#!/usr/bin/env python3
"""Create a Cloud TPU VM, install tinker-jax on every worker, serve, stop, delete.

    python scripts/tpu/launch.py create  NAME --zone us-east5-a --accelerator-type v5p-8
    python scripts/tpu/launch.py install NAME --zone us-east5-a --source git+https://github.com/ORG/tinker-jax@main
    python scripts/tpu/launch.py serve   NAME --zone us-east5-a --base-model Qwen/Qwen3-8B \\
        --checkpoint-storage gs://BUCKET/tinker --mesh fsdp=-1 [-- --http-port 8000 ...]
    python scripts/tpu/launch.py stop    NAME --zone us-east5-a
    python scripts/tpu/launch.py delete  NAME --zone us-east5-a
    python scripts/tpu/launch.py restore-database NAME --zone us-east5-a \
        --checkpoint-storage gs://BUCKET/tinker    # a new VM, before its first serve

Every subcommand takes --dry-run (print each gcloud command, run nothing) and --project.
`install`, `serve` and `stop` run on all workers of the slice (`--worker=all`). Every worker
runs the same server program (JAX's multi-controller model): with `tinker-jax serve
--distributed`, `jax.distributed.initialize()` finds the other workers from the TPU VM's
metadata; worker 0 (process 0) is the front end and the only one listening on the network,
and the others execute the engine calls it broadcasts. On a worker, everything lives in
~/tinker-jax (venv, serve.log, serve.pid); the server's database in --storage on worker 0
(default ~/tinker-jax/db), and checkpoints in --checkpoint-storage, which every worker must
see: a gs:// bucket (all workers write their shards of each checkpoint through Orbax). The
server keeps a copy of its database there too; `restore-database` puts it back on worker 0 of
a new VM (after `delete`), so users, keys and checkpoints carry over.

Python (standard library only) rather than bash: the remote commands carry user values through
two shells (local, then ssh), which `shlex.quote` gets right where hand-quoting in bash is
fragile; argparse gives each subcommand its help and validation; and `--dry-run` output is
testable without gcloud or a network.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REMOTE_DIR = "tinker-jax"  # under the worker's home directory
EXTRAS = "server,tpu"
DEFAULT_PORT = 50051
DEFAULT_DATABASE = "~/tinker-jax/db"  # expanded by tinker-jax on worker 0
DEFAULT_PYTHON = "3.12"  # tinker-jax needs >= 3.11; TPU VM images ship 3.10, so uv fetches it
STOP_WAIT_SECONDS = 30

# Runtime (software) version per TPU generation, used when --version is not given. Check
# `gcloud compute tpus tpu-vm versions list --zone ZONE` for what a zone offers.
DEFAULT_RUNTIMES = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
PROJECT_RE = re.compile(r"^([a-z][-a-z0-9.]*:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$")
ACCELERATOR_RE = re.compile(r"^(v[0-9]+[a-z]*)-([0-9]+)$")
VERSION_RE = re.compile(r"^[a-z0-9][-a-z0-9.]*$")
WHEEL_RE = re.compile(r"^[A-Za-z0-9_.+-]+\.whl$")
BUCKET_RE = re.compile(r"^gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?$")
MESH_AXES = ("data", "fsdp", "sequence", "expert", "tensor")  # tinker_jax.sharding's
PYTHON_RE = re.compile(r"^3\.[0-9]+(\.[0-9]+)?$")


class UsageError(Exception):
    """A bad flag value; the message says which flag and what is expected."""


# ---------------------------------------------------------------------------- validation


def check(pattern: re.Pattern, value: str, flag: str, expected: str) -> str:
    if not pattern.match(value):
        raise UsageError(f"{flag}: {value!r} is not {expected}")
    return value


def check_common(args: argparse.Namespace) -> None:
    check(
        NAME_RE,
        args.name,
        "NAME",
        "a TPU name (lower-case letters, digits and '-', starting with a letter, at most 63)",
    )
    check(ZONE_RE, args.zone, "--zone", "a zone such as us-central2-b or europe-west4-a")
    if args.project is not None:
        check(PROJECT_RE, args.project, "--project", "a project ID such as my-project-123")


def runtime_for(accelerator: str, version: str | None) -> str:
    match = ACCELERATOR_RE.match(accelerator)
    if not match:
        raise UsageError(
            f"--accelerator-type: {accelerator!r} is not GENERATION-SIZE, "
            "e.g. v4-32, v5p-8, v5litepod-16, v6e-8"
        )
    if int(match.group(2)) < 1:
        raise UsageError(f"--accelerator-type: {accelerator!r} has no chips")
    if version is not None:
        return check(VERSION_RE, version, "--version", "a TPU runtime version")
    if match.group(1) not in DEFAULT_RUNTIMES:
        raise UsageError(
            f"--version: no default runtime for {match.group(1)!r} (known: "
            f"{', '.join(DEFAULT_RUNTIMES)}); give --version, see "
            "`gcloud compute tpus tpu-vm versions list --zone ZONE`"
        )
    return DEFAULT_RUNTIMES[match.group(1)]


def check_mesh(text: str) -> str:
    for part in text.split(","):
        axis, _, size = part.partition("=")
        if axis not in MESH_AXES or not re.fullmatch(r"-1|[1-9][0-9]*", size):
            raise UsageError(
                f"--mesh: {part!r} is not AXIS=SIZE with AXIS in {', '.join(MESH_AXES)} "
                "and SIZE a positive integer or -1 (e.g. fsdp=-1 or data=2,fsdp=4)"
            )
    return text


def check_storage(text: str) -> str:
    if "://" in text or not text.startswith(("/", "~/")):
        raise UsageError(
            f"--storage: {text!r} must be a folder on worker 0 (absolute, or ~/...): it holds "
            "the database; give gs:// locations to --checkpoint-storage"
        )
    return text


def check_checkpoint_storage(text: str) -> str:
    if text.startswith("gs://"):
        return check(
            BUCKET_RE, text, "--checkpoint-storage", "gs://BUCKET[/PATH] with a valid bucket name"
        )
    if not text.startswith("/"):
        raise UsageError(
            f"--checkpoint-storage: {text!r} must be gs://BUCKET/PATH or an absolute path that "
            "every worker sees"
        )
    return text


# ---------------------------------------------------------------------------- commands


def gcloud_tpu(args: argparse.Namespace, verb: str, *rest: str) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, f"--zone={args.zone}"]
    if args.project is not None:
        cmd.append(f"--project={args.project}")
    return cmd + list(rest)


def on_all_workers(args: argparse.Namespace, script: str) -> list[str]:
    return gcloud_tpu(args, "ssh", "--worker=all", f"--command={script}")


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    runtime = runtime_for(args.accelerator_type, args.version)
    extra = ["--spot"] if args.spot else []
    return [
        gcloud_tpu(
            args,
            "create",
            f"--accelerator-type={args.accelerator_type}",
            f"--version={runtime}",
            *extra,
        )
    ]


def source_requirement(source: str) -> tuple[str, bool, str | None]:
    """(the pip requirement as worker shell text, whether `source` is a local wheel to copy,
    a gs:// wheel to fetch). A wheel (local file or gs:// object) is placed in the worker's
    home directory first."""
    if source.startswith(("git+https://", "git+ssh://")):
        if any(c.isspace() for c in source):
            raise UsageError(f"--source: {source!r} contains whitespace")
        return shlex.quote(f"tinker-jax[{EXTRAS}] @ {source}"), False, None
    name = source.rsplit("/", 1)[-1]
    if not WHEEL_RE.match(name) or not name.startswith("tinker_jax-"):
        raise UsageError(
            f"--source: {source!r} is neither git+https://... nor a tinker_jax-*.whl "
            "(local file, gs:// object or https:// URL)"
        )
    if source.startswith("https://"):
        return shlex.quote(f"tinker-jax[{EXTRAS}] @ {source}"), False, None
    # $HOME expands on the worker; the name matched WHEEL_RE, so it needs no quoting.
    requirement = f'"tinker-jax[{EXTRAS}] @ file://$HOME/{name}"'
    if source.startswith("gs://"):
        check(BUCKET_RE, source, "--source", "gs://BUCKET/PATH/tinker_jax-*.whl")
        return requirement, False, source
    if not Path(source).is_file():
        raise UsageError(f"--source: local wheel {source} does not exist")
    return requirement, True, None


def install_commands(args: argparse.Namespace) -> list[list[str]]:
    check(PYTHON_RE, args.python, "--python", "a Python version such as 3.12")
    requirement, local_wheel, gs_wheel = source_requirement(args.source)
    steps = [
        "set -eu",
        f"mkdir -p ~/{REMOTE_DIR}",
        f"cd ~/{REMOTE_DIR}",
        'export PATH="$HOME/.local/bin:$PATH"',
        "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh",
        f"[ -x venv/bin/python ] || uv venv --python {args.python} venv",
    ]
    if gs_wheel is not None:
        steps.append(f"gcloud storage cp {shlex.quote(gs_wheel)} ~/")
    steps += [
        f"uv pip install --python venv/bin/python --upgrade --reinstall-package tinker-jax "
        f"{requirement}",
        'venv/bin/tinker-jax --help >/dev/null && echo "tinker-jax installed on $(hostname)"',
    ]
    commands = []
    if local_wheel:
        scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", args.source, f"{args.name}:"]
        scp += [f"--zone={args.zone}", "--worker=all"]
        commands.append(scp + ([f"--project={args.project}"] if args.project else []))
    commands.append(on_all_workers(args, "; ".join(steps)))
    return commands


def serve_commands(args: argparse.Namespace) -> list[list[str]]:
    if not args.base_model:
        raise UsageError("--base-model: give at least one (a HF name or a folder on the workers)")
    for model in args.base_model:
        if not model or any(c.isspace() for c in model):
            raise UsageError(f"--base-model: {model!r} is empty or contains whitespace")
    check_storage(args.storage)
    if args.checkpoint_storage is not None:
        check_checkpoint_storage(args.checkpoint_storage)
    if args.mesh is not None:
        check_mesh(args.mesh)
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port: {args.port} is outside [1, 65535]")
    serve = ["serve"]
    for model in args.base_model:
        serve += ["--base-model", model]
    serve += ["--storage", args.storage]
    if args.checkpoint_storage is not None:
        serve += ["--checkpoint-storage", args.checkpoint_storage]
    serve += ["--port", str(args.port)]
    if args.mesh is not None:
        serve += ["--mesh", args.mesh]
    serve += ["--compilation-cache", args.compilation_cache, *args.serve_args]
    # Only process 0 listens (on every interface); --distributed joins the slice's workers.
    program = ["venv/bin/tinker-jax", *serve, "--host", "0.0.0.0"]
    if not args.no_distributed:
        program.append("--distributed")
    running = 'if [ -f serve.pid ] && kill -0 "$(cat serve.pid)" 2>/dev/null; then'
    script = "; ".join(
        [
            f"cd ~/{REMOTE_DIR} || {{ echo 'tinker-jax is not installed: run install'; exit 1; }}",
            f'{running} echo "already serving (pid $(cat serve.pid))"; exit 1; fi',
            f"{{ nohup {shlex.join(program)} > serve.log 2>&1 < /dev/null & }}",
            "echo $! > serve.pid",
            'echo "tinker-jax started on $(hostname) (pid $(cat serve.pid), log '
            f'~/{REMOTE_DIR}/serve.log)"',
        ]
    )
    return [on_all_workers(args, script)]


def restore_database_commands(args: argparse.Namespace) -> list[list[str]]:
    check_storage(args.storage)
    check_checkpoint_storage(args.checkpoint_storage)
    program = [
        "venv/bin/tinker-jax",
        "restore-database",
        "--storage",
        args.storage,
        "--checkpoint-storage",
        args.checkpoint_storage,
    ]
    script = "; ".join(
        [
            f"cd ~/{REMOTE_DIR} || {{ echo 'tinker-jax is not installed: run install'; exit 1; }}",
            shlex.join(program),
        ]
    )
    # The database is worker 0's alone.
    return [gcloud_tpu(args, "ssh", "--worker=0", f"--command={script}")]


def stop_commands(args: argparse.Namespace) -> list[list[str]]:
    script = "; ".join(
        [
            f"cd ~/{REMOTE_DIR} 2>/dev/null && [ -f serve.pid ] || "
            '{ echo "nothing to stop on $(hostname)"; exit 0; }',
            "pid=$(cat serve.pid)",
            'kill "$pid" 2>/dev/null || true',
            f"for _ in $(seq {STOP_WAIT_SECONDS}); do "
            'kill -0 "$pid" 2>/dev/null || break; sleep 1; done',
            'kill -0 "$pid" 2>/dev/null && kill -9 "$pid"',
            "rm -f serve.pid",
            'echo "tinker-jax stopped on $(hostname)"',
        ]
    )
    return [on_all_workers(args, script)]


def delete_commands(args: argparse.Namespace) -> list[list[str]]:
    return [gcloud_tpu(args, "delete", *(["--quiet"] if args.yes else []))]


# ---------------------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="launch.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="TPU VM name")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b")
    common.add_argument("--project", help="GCP project (default: gcloud's configured one)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    sub = top.add_subparsers(dest="command", required=True)

    create = sub.add_parser("create", parents=[common], help="create the TPU VM")
    create.add_argument("--accelerator-type", required=True, help="e.g. v5p-8, v4-32, v6e-8")
    create.add_argument("--version", help="runtime version (default: per TPU generation)")
    create.add_argument("--spot", action="store_true", help="a Spot VM (cheaper, preemptible)")
    create.set_defaults(build=create_commands)

    install = sub.add_parser("install", parents=[common], help="install on all workers")
    install.add_argument(
        "--source",
        required=True,
        help="git+https://HOST/ORG/tinker-jax[@REF], or a tinker_jax-*.whl: a local file, "
        "gs://... or https://...",
    )
    install.add_argument("--python", default=DEFAULT_PYTHON, help="Python version for the venv")
    install.set_defaults(build=install_commands)

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="start the server on all workers (worker 0 is the front end)",
        description="Arguments after `--` are passed to `tinker-jax serve` unchanged.",
    )
    serve.add_argument("--base-model", action="append", help="HF name or worker folder (repeat)")
    serve.add_argument(
        "--storage", default=DEFAULT_DATABASE, help="database folder on worker 0 (%(default)s)"
    )
    serve.add_argument(
        "--checkpoint-storage",
        help="gs://BUCKET/PATH (or a path every worker sees); default STORAGE/checkpoints",
    )
    serve.add_argument("--mesh", help="e.g. fsdp=-1 or data=2,fsdp=-1,tensor=4")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help="gRPC port")
    serve.add_argument("--compilation-cache", default="/tmp/jax_cache")
    serve.add_argument(
        "--no-distributed",
        action="store_true",
        help="skip jax.distributed.initialize() (single-host slices only)",
    )
    serve.set_defaults(build=serve_commands)

    restore = sub.add_parser(
        "restore-database",
        parents=[common],
        help="put the database copy kept in the checkpoint storage back on worker 0",
    )
    restore.add_argument(
        "--storage", default=DEFAULT_DATABASE, help="database folder on worker 0 (%(default)s)"
    )
    restore.add_argument(
        "--checkpoint-storage", required=True, help="the server's gs://BUCKET/PATH"
    )
    restore.set_defaults(build=restore_database_commands)

    stop = sub.add_parser("stop", parents=[common], help="stop the server on all workers")
    stop.set_defaults(build=stop_commands)

    delete = sub.add_parser("delete", parents=[common], help="delete the TPU VM")
    delete.add_argument("--yes", action="store_true", help="do not ask gcloud to confirm")
    delete.set_defaults(build=delete_commands)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.serve_args = passthrough
    if passthrough and args.command != "serve":
        print(
            f"launch.py {args.command}: error: only serve takes arguments after --", file=sys.stderr
        )
        return 2
    try:
        check_common(args)
        commands = args.build(args)
    except UsageError as e:
        print(f"launch.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for cmd in commands:
            print(shlex.join(cmd))
        return 0
    if shutil.which("gcloud") is None:
        print(
            "launch.py: error: gcloud not found on PATH; install the Google Cloud CLI "
            "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`, "
            "or use --dry-run to see the commands",
            file=sys.stderr,
        )
        return 127
    for cmd in commands:
        print(f"+ {shlex.join(cmd)}", file=sys.stderr, flush=True)
        rc = subprocess.run(cmd).returncode
        if rc:
            print(f"launch.py {args.command}: error: gcloud exited with {rc}", file=sys.stderr)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
