"""The generated protobuf modules are exactly what `scripts/gen_proto.py` makes from `proto/`,
and our copy of Tinker's HTTP wire schema encodes exactly as the official SDK's."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_generated_modules_are_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    written = gen.generate(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in written}
    assert {"tinker_jax/v1/tinker_pb2.py", "tinker_jax/tinker_proto/tinker_public_pb2.py"} <= names
    for path in written:
        checked_in = ROOT / path.relative_to(tmp_path)
        assert checked_in.is_file(), f"{checked_in} is missing: run scripts/gen_proto.py"
        assert checked_in.read_bytes() == path.read_bytes(), (
            f"{checked_in.relative_to(ROOT)} is stale: run scripts/gen_proto.py"
        )


def _shape(file_descriptor) -> dict:
    """What decides the binary encoding: per message, each field's number, type, label,
    presence and oneof (and message / enum types by name); enum values by number."""
    shape = {}
    messages = list(file_descriptor.message_types_by_name.values())
    while messages:
        message = messages.pop()
        messages.extend(message.nested_types)  # map entries
        fields = {}
        for f in message.fields:
            fields[f.name] = (
                f.number,
                f.type,
                f.is_repeated,
                f.has_presence,
                f.containing_oneof.name if f.containing_oneof else None,
                f.message_type.name if f.message_type else None,
                f.enum_type.name if f.enum_type else None,
            )
        shape[message.full_name[len(file_descriptor.package) + 1 :]] = fields
    for name, enum in file_descriptor.enum_types_by_name.items():
        shape[name] = {v.name: v.number for v in enum.values}
    return shape


def test_wire_schema_matches_the_official_sdk():
    sdk = pytest.importorskip("tinker.proto.tinker_public_pb2")
    from tinker_jax.tinker_proto import tinker_public_pb2 as ours

    assert _shape(ours.DESCRIPTOR) == _shape(sdk.DESCRIPTOR)
    # and a message written by one parses identically in the other
    msg = sdk.ForwardBackwardRequest(model_id="s:train:0", seq_id=3, loss_fn="ppo")
    msg.loss_fn_config_v2["clip_low_threshold"].number = 0.8
    datum = msg.data.add()
    datum.model_input.add().encoded_text.tokens = b"\x01\x00\x00\x00"
    datum.loss_fn_inputs["weights"].dense = b"\x00\x00\x80\x3f"
    parsed = ours.ForwardBackwardRequest.FromString(msg.SerializeToString())
    assert parsed.SerializeToString(deterministic=True) == msg.SerializeToString(deterministic=True)
