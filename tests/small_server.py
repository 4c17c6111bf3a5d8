"""The configuration of a small in-process server (`service.server.Server`) for tests that need
a server of their own: one tiny model, one device, 16 positions, one sampler row, two adapter
slots of rank 4, so that it builds few programs."""

from __future__ import annotations

from pathlib import Path

from tinker_jax.service.config import ServerConfig


def small_server_config(model: Path, storage: Path, precompile: str = "none") -> ServerConfig:
    """A `ServerConfig` on `model` (a HF folder) keeping its files in `storage`, listening on
    a free port, with the start-up precompile plan `precompile`."""
    return ServerConfig(
        base_models=(str(model),),
        storage=storage,
        port=0,
        max_adapters=2,
        max_lora_rank=4,
        sampler_slots=2,
        sampler_rows=1,
        max_seq_len=16,
        mesh={"data": 1, "fsdp": 1, "tensor": 1},
        precompile=precompile,
    )
