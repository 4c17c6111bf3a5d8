"""Regenerates the Python modules of the gRPC contract and of Tinker's HTTP wire schema from
`proto/`.

    python scripts/gen_proto.py            # writes tinker_jax/{v1,tinker_proto}/*_pb2*.py
    python scripts/gen_proto.py --out DIR  # writes elsewhere (the freshness test compares)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (source under proto/, whether it defines a gRPC service and so needs *_pb2_grpc.py)
PROTOS = [
    ("tinker_jax/v1/tinker.proto", True),
    ("tinker_jax/tinker_proto/tinker_public.proto", False),
]


def generate(out: Path) -> list[Path]:
    """Runs protoc (grpcio-tools) over every schema file; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    out.mkdir(parents=True, exist_ok=True)
    for proto, has_service in PROTOS:
        args = [
            "protoc",
            f"-I{ROOT / 'proto'}",
            f"-I{include}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            str(ROOT / "proto" / proto),
        ]
        if has_service:
            args.insert(-1, f"--grpc_python_out={out}")
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    return sorted(p for p in out.rglob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT)
    args = parser.parse_args()
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
