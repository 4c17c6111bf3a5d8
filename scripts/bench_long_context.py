"""Long-context LoRA training on CPU: memory per device and tokens/s against sequence length,
with each sequence split over 1, 2 or 4 devices (`--mesh sequence=N`, "chunked" attention).

    python scripts/bench_long_context.py                       # 1k..16k, sequence=1,2,4
    python scripts/bench_long_context.py --lengths 1024 4096 --shards 1 4

Each (shards, length) case runs in a child process of its own with `shards` CPU devices: one
forward_backward of a single datum (compilation), then `--steps` timed ones. Memory is the
timed steps' peak resident memory above what the process held before them (Linux's VmHWM,
reset through /proc/self/clear_refs), divided by the devices, since on CPU every device lives
in the one process; a fresh process per case keeps the freed buffers of one case from hiding
the next one's. Beside it, the memory plan's training-step estimate per device (`memory.py`),
and the case's wall time (process start, compilation and every step: at 16k tokens on 2 CPU
cores a case takes minutes, so the time is printed to plan a run).
Then the plan's per-device table for Qwen3-8B at 32k and 128k tokens with each sequence over 8
devices, and whether it fits a TPU v5p-16 slice (8 chips of 95 GiB) and 8 H200s
(`--no-presets` to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_models import add_model_args, ensure_model, parse_with_preset

QWEN3_8B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    tie_word_embeddings=False,
    rope_theta=1000000.0,
)
# Where the plan is printed: 8 devices, each sequence over all of them; (name, bytes per device).
PRESET_MESH = {"sequence": 8}
SLICES = [("TPU v5p-16 (8 chips)", 95 * (1 << 30)), ("8x H200", 141 * 10**9)]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.set_defaults(
        hidden=256, layers=4, heads=4, kv_heads=2, head_dim=64, intermediate=512, vocab=8192
    )
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps per case")
    p.add_argument("--no-presets", action="store_true", help="skip the Qwen3-8B plan tables")
    p.add_argument("--child", type=int, nargs=2, help=argparse.SUPPRESS)  # shards, length
    return parse_with_preset(p)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(folder: Path, args: argparse.Namespace) -> None:
    """One case, in a process started with `shards` devices: prints its result as JSON."""
    import jax
    import numpy as np

    from tinker_jax.batching import Datum, RunBatch
    from tinker_jax.lora import LoRASpec
    from tinker_jax.sharding import make_mesh
    from tinker_jax.trainer import LoraConfig, Trainer
    from tinker_jax.weights import load_model

    shards, length = args.child
    mesh = make_mesh({"sequence": shards}, devices=jax.devices()[:shards])
    model, _ = load_model(str(folder), lora=LoRASpec(1, args.rank), mesh=mesh, attention="chunked")
    trainer = Trainer(model, mesh)
    slot = trainer.create_slot(LoraConfig(rank=args.rank, seed=0))
    tokens = np.random.default_rng(0).integers(0, args.vocab, length + 1)
    datum = Datum(tokens[:-1], {"target_tokens": tokens[1:], "weights": np.ones(length)})
    run = [RunBatch(slot, [datum])]
    trainer.forward_backward(run, "cross_entropy")  # compiles
    jax.block_until_ready(trainer.grads)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.forward_backward(run, "cross_entropy")
    jax.block_until_ready(trainer.grads)
    seconds = (time.perf_counter() - start) / args.steps
    peak = (_status_kib("VmHWM") - before) * 1024 / shards
    print(json.dumps({"tokens_per_s": length / seconds, "peak_per_device": peak}))


def run_case(folder: Path, shards: int, length: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={shards}"
    argv = [a for a in sys.argv[1:] if a != "--no-presets"]
    cmd = [sys.executable, __file__, *argv, "--model-dir", str(folder)]
    cmd += ["--child", str(shards), str(length)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"case sequence={shards} length={length}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def planned_step(cfg, args: argparse.Namespace, shards: int, length: int) -> int:
    """The memory plan's training step (working set) per device for this case."""
    from tinker_jax.memory import plan_memory

    plan = plan_memory(
        cfg,
        mesh_shape={"sequence": shards},
        n_devices=shards,
        dtype=args.dtype,
        max_adapters=1,
        max_lora_rank=args.rank,
        sampler_slots=1,
        sampler_rows=1,
        max_seq_len=length,
        train_batch_tokens=length,
        attention="chunked",
    )
    return plan.training_step


def print_presets() -> None:
    """The plan for Qwen3-8B at 32k and 128k tokens on 8 devices, and whether it fits each
    slice (`memory.check_fits`, as `serve` checks it at start-up)."""
    from tinker_jax.errors import ValidationError
    from tinker_jax.memory import check_fits, plan_memory
    from tinker_jax.models.config import config_from_hf

    cfg = config_from_hf(QWEN3_8B)
    for length in (32768, 131072):
        plan = plan_memory(
            cfg,
            mesh_shape=PRESET_MESH,
            n_devices=8,
            dtype="bfloat16",
            max_adapters=8,
            max_lora_rank=32,
            sampler_slots=8,
            sampler_rows=4,
            max_seq_len=length,
            train_batch_tokens=length,
            attention="chunked",
        )
        print(f"\nQwen3-8B at {length // 1024}k tokens:\n{plan.format()}")
        for name, capacity in SLICES:
            try:
                check_fits(plan, capacity)
                print(f"  {name}: fits")
            except ValidationError as e:
                print(f"  {name}: does not fit: {e}")


def main() -> None:
    args = parse_args()
    if args.child:
        child(Path(args.model_dir), args)
        return
    from tinker_jax.memory import format_bytes
    from tinker_jax.models.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir or tmp)
        ensure_model(folder, args, max(args.lengths), fast=True)
        cfg = load_config(folder)
        print(
            f"LoRA rank {args.rank}, hidden {args.hidden} x {args.layers} layers, "
            f"{args.dtype}, chunked attention, one sequence per step, CPU"
        )
        header = (
            f"{'tokens':>7} {'sequence':>8} {'tokens/s':>9} {'peak/device':>12} "
            f"{'plan/device':>12} {'case s':>7}"
        )
        print(header)
        start = time.perf_counter()
        for length in args.lengths:
            for shards in args.shards:
                case_start = time.perf_counter()
                result = run_case(folder, shards, length)
                plan = planned_step(cfg, args, shards, length)
                print(
                    f"{length:>7} {shards:>8} {result['tokens_per_s']:>9.0f} "
                    f"{format_bytes(int(result['peak_per_device'])):>12} "
                    f"{format_bytes(plan):>12} {time.perf_counter() - case_start:>7.0f}",
                    flush=True,
                )
        print(f"all cases: {time.perf_counter() - start:.0f} s")
    if not args.no_presets:
        print_presets()


if __name__ == "__main__":
    main()
