"""Where a decode step's time goes: a JAX profiler trace of the sampler, summarised per kernel.

Builds the sampler on a random HF folder (the shapes of scripts/bench_models.py, e.g.
`--preset qwen3-1.7b`), samples once to compile, then traces one `Sampler.sample` of `--batch`
greedy requests and prints, per traced process (host threads, each GPU stream), the busy time,
the number of events per generated token, and the events that take the most time. At batch 1 a
decode step should be bound by reading the weights once; many short kernels per token instead
mean launch overhead dominates.

    python scripts/profile_decode.py --preset qwen3-1.7b --batch 1 --out /tmp/trace

With `--by-op`, XLA also dumps the optimised HLO of every program, and the decode programs'
kernel time is summed per JAX operation each kernel came from (its HLO metadata: a
`dot_general`, a `reduce_sum`, a `dynamic_slice` copying a layer's weights out of the stacked
arrays), with the kernels that take the most time and their shapes.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
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
    p.add_argument(
        "--by-op", action="store_true", help="also sum the decode kernels per JAX operation"
    )
    return parse_with_preset(p)


# `  %name = shape op(...), ..., metadata={op_name="jit(f)/.../dot_general" ...` in a dump.
HLO_INSTRUCTION = re.compile(r'^\s+%?([\w.\-]+) = (\S+) .*?metadata=\{op_name="([^"]+)"', re.M)


def hlo_instructions(dump_dir: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(module, instruction) -> (result shape, the JAX operation it came from), over the
    optimised HLO of every module in an XLA dump (`module_0007.jit_NAME.<backend>...txt`)."""
    found = {}
    for path in dump_dir.glob("*after_optimizations.txt"):
        module = path.name.split(".")[1]
        for m in HLO_INSTRUCTION.finditer(path.read_text()):
            found[(module, m.group(1))] = (m.group(2), m.group(3).rsplit("/", 1)[-1])
    return found


def summarise_by_op(trace_file: Path, dump_dir: Path, tokens: int, top: int) -> None:
    """The decode programs' kernel time per JAX operation, then per kernel, per token."""
    with gzip.open(trace_file, "rt") as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    instructions = hlo_instructions(dump_dir)
    per_op: dict[str, float] = collections.defaultdict(float)
    per_kernel: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for e in events:
        args = e.get("args") or {}
        key = (args.get("hlo_module", ""), args.get("hlo_op", ""))
        # A while loop's or call's event spans the kernels inside it, which have their own.
        container = key[1].startswith(("while", "conditional", "call"))
        decode = key[0].startswith("jit_decode") and key in instructions and not container
        if e.get("ph") == "X" and decode:
            per_op[instructions[key][1]] += e["dur"]
            per_kernel[key].append(e["dur"])
    total = sum(per_op.values())
    print(f"\ndecode kernels by JAX operation: {total / 1e3 / tokens:.3f} ms per token")
    for op, dur in sorted(per_op.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {dur / 1e3 / tokens:9.3f} ms  {dur / max(total, 1):6.1%}  {op}")
    print("decode kernels:")
    ranked = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[:top]
    for (module, name), durs in ranked:
        shape, op = instructions[(module, name)]
        print(
            f"  {sum(durs) / 1e3 / tokens:9.3f} ms  {len(durs) / tokens:6.1f}x  "
            f"{name[:40]:40s} {op:16s} {shape[:50]}"
        )


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
    dump_dir = Path(tempfile.mkdtemp(prefix="hlo-")) if args.by_op else None
    if dump_dir is not None:  # read when JAX starts its backend, below
        # On a GPU, the kernels XLA launches inside a command buffer carry no `hlo_op` in the
        # trace, so the summary by operation finds none of them: launch them one by one.
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump_dir} --xla_dump_hlo_as_text"
            " --xla_gpu_enable_command_buffer="
        )
    import jax
    import jax.numpy as jnp

    if dump_dir is not None:  # a program from the persistent cache is not compiled, so not dumped
        jax.config.update("jax_enable_compilation_cache", False)

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
        # The newest: an --out folder may hold the traces of earlier runs.
        trace_file = max(trace_dir.rglob("perfetto_trace.json.gz"), key=os.path.getmtime)
        print(f"trace: {trace_file} ({trace_file.stat().st_size / 1e6:.1f} MB)")
        summarise(trace_file, args.new_tokens, args.top)
        if dump_dir is not None:
            print(f"HLO dump: {dump_dir}")
            summarise_by_op(trace_file, dump_dir, args.new_tokens, args.top)


if __name__ == "__main__":
    main()
