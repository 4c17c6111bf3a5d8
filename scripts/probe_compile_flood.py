"""A tenant that sends a new shape with every call, against a server's memory-map limit.

Starts an in-process CPU server on the built-in tiny model (no precompile plan), then, as one
user, calls forward, sample and compute_logprobs at a new length each step (7 tokens longer
each time, up to `--max-length`), so that nearly every call compiles programs. After each step
it prints the memory maps the process holds against `vm.max_map_count` and how many programs
the guard has dropped (`service/memory_maps.py`); the last line is `survived` if the server
served every call.

XLA's CPU compiler keeps a few maps per kernel for as long as a program lives, so under the
default limit (65530) this takes long to reach it. To see the guard act within minutes, lower
the limit for the run and restore it afterwards (it is system-wide):

    sysctl -w vm.max_map_count=12000
    python scripts/probe_compile_flood.py              # drops programs, survives
    python scripts/probe_compile_flood.py --no-guard   # the process dies once mmap fails
    sysctl -w vm.max_map_count=65530

`--hold-maps N` holds N more maps for the whole run (one-page anonymous mappings), as threads,
libraries and open files do: past 60% of the limit, the programs alone cannot bring the
process under it, and the guard must not drop them again at every compile.
"""

from __future__ import annotations

import argparse
import logging
import mmap
import tempfile
import time
from pathlib import Path

from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.service import memory_maps
from tinker_jax.service.config import ServerConfig
from tinker_jax.service.server import Server
from tinker_jax.tiny_model import write_tiny_model

TIMEOUT = 600.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-length", type=int, default=500, help="longest prompt / datum")
    p.add_argument("--no-guard", action="store_true", help="never drop programs (to see the crash)")
    p.add_argument("--hold-maps", type=int, default=0, help="maps held besides the programs'")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if args.no_guard:
        memory_maps.HIGH_SHARE = float("inf")
    held_maps = [mmap.mmap(-1, mmap.PAGESIZE) for _ in range(args.hold_maps)]
    work = Path(tempfile.mkdtemp(prefix="compile-flood-"))
    model = str(write_tiny_model(work / "tiny-qwen3"))
    server = Server(
        ServerConfig(
            base_models=(model,),
            storage=work / "storage",
            port=0,
            max_adapters=2,
            max_lora_rank=4,
            sampler_slots=2,
            sampler_rows=4,
            max_seq_len=args.max_length + 16,
            mesh={"data": 1, "fsdp": 1, "tensor": 1},
        )
    )
    try:
        key = server.store.create_user("flood")[1]
        client = ServiceClient(base_url=f"127.0.0.1:{server.port}", api_key=key)
        training = client.create_lora_training_client(model, rank=4, seed=1)
        sampler = training.save_weights_and_get_sampling_client()
        start = time.perf_counter()
        for step, length in enumerate(range(10, args.max_length + 1, 7), 1):
            tokens = [5 + k % 50 for k in range(length)]
            datum = T.Datum(
                model_input=T.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (length - 1)},
            )
            training.forward([datum] * (1 + step % 5), "cross_entropy").result(TIMEOUT)
            prompt = T.ModelInput.from_ints(tokens)
            params = T.SamplingParams(max_tokens=1 + step % 9)
            sampler.sample(prompt, 1 + step % 4, params).result(TIMEOUT)
            sampler.compute_logprobs(prompt).result(TIMEOUT)
            held, limit = memory_maps.map_usage() or (0, 0)
            print(
                f"{time.perf_counter() - start:6.0f} s  step {step:3d}  length {length:4d}  "
                f"maps {held}/{limit}  programs dropped {memory_maps.GUARD.dropped}",
                flush=True,
            )
    finally:
        server.stop()
    print(f"survived, holding {len(held_maps)} maps besides the programs'")


if __name__ == "__main__":
    main()
