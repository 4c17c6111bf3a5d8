"""Where a decode step's time goes: a JAX profiler trace of the sampler, summarised per kernel.

Builds the sampler on a random HF folder (the shapes of scripts/bench_models.py, e.g.
`--preset qwen3-1.7b`), samples once to compile, then traces one `Sampler.sample` of `--batch`
greedy requests and prints, per traced process (host threads, each GPU stream), the busy time,
the number of events per generated token, and the events that take the most time. At batch 1 a
decode step should be bound by reading the weights once; many short kernels per token instead
mean launch overhead dominates.

    python scripts/profile_decode.py --preset qwen3-1.7b --batch 1 --out /tmp/trace
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_models import add_model_args, ensure_model, parse_with_preset


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps-per-call", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--top", type=int, default=20, help="events listed per process")
    p.add_argument("--out", default=None, help="keep the trace folder here")
    return parse_with_preset(p)


def summarise(trace_file: Path, tokens: int, top: int) -> None:
    """Per process of a Perfetto JSON trace: busy time, events per token, top events."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    by_pid: dict[int, list[dict]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            by_pid[e["pid"]].append(e)
    for pid, evs in sorted(by_pid.items(), key=lambda kv: -sum(e["dur"] for e in kv[1])):
        total = sum(e["dur"] for e in evs)
        print(
            f"\n{names.get(pid, pid)}: {len(evs)} events, {total / 1e3:.1f} ms summed, "
            f"{len(evs) / tokens:.1f} events and {total / 1e3 / tokens:.3f} ms per token"
        )
        per_name: dict[str, list[float]] = collections.defaultdict(list)
        for e in evs:
            per_name[e["name"]].append(e["dur"])
        ranked = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[:top]
        for name, durs in ranked:
            print(
                f"  {sum(durs) / 1e3:9.3f} ms  {len(durs):6d}x  "
                f"{np.mean(durs):8.1f} us avg  {name[:110]}"
            )


def main() -> None:
    args = parse_args()
    import jax
    import jax.numpy as jnp

    from tinker_jax.lora import LoRASpec
    from tinker_jax.sampler import Sampler, SampleRequest
    from tinker_jax.sampling import SamplingParams
    from tinker_jax.sharding import make_mesh
    from tinker_jax.weights import load_model

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir or Path(tmp) / "model")
        ensure_model(folder, args, args.prompt_len + args.new_tokens, fast=True)
        mesh = make_mesh()
        model, _ = load_model(
            str(folder),
            lora=LoRASpec(slots=1, max_rank=args.rank),
            mesh=mesh,
            dtype=jnp.dtype(args.dtype),
        )
        sampler = Sampler.sharing_base(
            model,
            mesh,
            slots=2,
            rows=args.batch,
            max_len=args.prompt_len + args.new_tokens,
            steps_per_call=args.steps_per_call,
        )
        rng = np.random.default_rng(0)
        prompts = rng.integers(2, args.vocab, (args.batch, args.prompt_len))
        params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, stop=[])
        requests = [SampleRequest(p, 1, params) for p in prompts]
        sampler.sample(requests)  # compile
        start = time.perf_counter()
        sampler.sample(requests)
        wall = time.perf_counter() - start
        tokens = args.batch * args.new_tokens
        print(
            f"{jax.devices()[0].device_kind}: untraced sample {wall * 1e3:.1f} ms for "
            f"{tokens} tokens = {wall * 1e3 / args.new_tokens:.3f} ms per decode step"
        )
        trace_dir = Path(args.out or Path(tmp) / "trace")
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            sampler.sample(requests)
        (trace_file,) = trace_dir.rglob("perfetto_trace.json.gz")
        print(f"trace: {trace_file} ({trace_file.stat().st_size / 1e6:.1f} MB)")
        summarise(trace_file, args.new_tokens, args.top)


if __name__ == "__main__":
    main()
