"""The generated gRPC modules are exactly what `scripts/gen_proto.py` makes from `proto/`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_modules_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = gen.generate(tmp_path)
    assert written
    for path in written:
        checked_in = ROOT / path.relative_to(tmp_path)
        assert checked_in.is_file(), f"{checked_in} is missing: run scripts/gen_proto.py"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{checked_in.relative_to(ROOT)} is stale: run scripts/gen_proto.py")
