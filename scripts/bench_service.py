"""Service overhead and cross-run batching: the engine called in-process against the same
training work sent through the real gRPC server with the client SDK.

    python scripts/bench_service.py                       # CPU defaults (a few minutes)
    python scripts/bench_service.py --only a --steps 8    # just the overhead part
    python scripts/bench_service.py --hidden 2048 --layers 28 ... # on an accelerator
    python scripts/bench_service.py --only c              # first-request latency (c) alone

(a) Overhead. One run, one step = LoRA forward_backward (cross_entropy) + optim_step (AdamW)
    on `--batch` x `--seq` tokens. In-process: `Trainer.forward_backward` then
    `Trainer.optim_step`, called directly (synchronous; forward_backward returns host metrics).
    Service: a `TrainingClient` submits forward_backward and optim_step, then awaits both
    results (the cookbook's pipelining); the next step is submitted once both arrived.
    overhead % = (in-process steps/s / service steps/s - 1) * 100: the extra wall time per
    step, relative to the engine alone. Target: <= 10% (judged on the best repeats). Also
    printed, independent of how fast the engine happened to run: the share of the service's
    wall time spent outside the server trainer's calls (RPCs, polling, queueing, store).
(b) Cross-run batching. `--runs` training runs on one base model, each its own ServiceClient
    (session, channel) and TrainingClient, driven from its own thread with the same pipelined
    loop on `--run-batch` x `--seq` tokens, against one such run alone. Aggregate tokens/s =
    all runs' model_input tokens / wall time from the release of the threads until the last
    one finished its steps. Target: runs-together / one-run >= 6x. The "engine ceiling" is the
    same work in-process with perfect batching (one forward_backward over every run's rows,
    then one optim_step per run, against one run's step): the best ratio any scheduling of
    the service could reach on this machine.
(c) First-request latency, only with `--only c` (it starts six server processes): from the
    server's being ready (listening) to a new user's first forward_backward result (run
    created, `--batch` x `--seq` tokens), first sample result (then optim_step, a sampler of
    the run, `--seq` prompt tokens, 16 sampled) and first compute_logprobs result (of the same
    prompt), each in a fresh process: without precompilation; with `--precompile common`, the
    user arriving once the plan is done (from then on; the plan's own time printed beside);
    with it, the user arriving at once. Each with a cold persistent compilation cache (a new
    folder), then warm (a restart on it).

Measurement conventions:
- Server and clients live in this one process (loopback gRPC, port 0, mesh 1x1x1): client
  work competes with the server for the GIL and the cores and counts as overhead.
- The in-process trainer has as many adapter slots as the server (`--max-adapters`), since
  the cost of optim_step and of the gradient accumulator may grow with the slot count.
- Warm-up steps are not timed; they compile every shape (for (b), one request per batch
  bucket that an engine call of 1..runs runs can fill). The server trainer's trace counts
  are compared before and after each timed window, and a window that compiled is flagged.
- Every measurement is repeated `--repeats` times; the two sides of a comparison alternate
  (A B, B A, ...) so that load from other processes falls on both alike. Printed: the median
  and [min-max] over repeats; ratios from medians, and from the best repeat of each side
  (on a shared machine the best is the more robust estimate).
- Engine trace: the server trainer's forward_backward and optim_step (and the worker's tick)
  are wrapped on the instance, without changing the source, to count runs per engine call
  and the engine thread's busy time in each timed window.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from bench_models import hf_config

# (c)'s server processes: precompilation, and when the user arrives.
PROBES = ("none", "common-after-plan", "common-at-ready")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--tied", action="store_true", help="tie the lm head to the embedding")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (also the server's max)")
    p.add_argument("--seq", type=int, default=256, help="model_input tokens of every datum")
    p.add_argument("--batch", type=int, default=8, help="(a) datums per forward_backward")
    p.add_argument("--runs", type=int, default=8, help="(b) concurrent training runs")
    p.add_argument("--run-batch", type=int, default=1, help="(b) datums per run and step")
    p.add_argument("--steps", type=int, default=2, help="(a) timed steps per repeat and side")
    p.add_argument("--steps-b", type=int, default=3, help="(b) timed steps per run and repeat")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-adapters", type=int, default=None, help="default: runs + 1")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument(
        "--only", choices=["a", "b", "c"], default=None, help="run one part (default: a and b)"
    )
    p.add_argument("--probe", choices=PROBES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--no-ceiling", action="store_true", help="(b) skip the engine ceiling")
    p.add_argument("--model-dir", default=None, help="reuse/create the HF folder here")
    p.add_argument("--compilation-cache", default=None, help="JAX cache (default: a temp dir)")
    args = p.parse_args()
    if args.max_adapters is None:
        args.max_adapters = args.runs + 1
    if args.max_adapters < args.runs + 1:
        p.error("--max-adapters must be >= runs + 1 (the single run keeps its slot)")
    return args


# ---------------------------------------------------------------------------- model, data


def write_model(folder: Path, args: argparse.Namespace) -> None:
    """A random Qwen3-shaped model (scripts/bench_models.py's config), saved in `args.dtype`
    with `save_pretrained`."""
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(argparse.Namespace(**vars(args), family="qwen3"), args.seq)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(folder)


def token_rows(seed: int, rows: int, args: argparse.Namespace) -> np.ndarray:
    """[rows, seq + 1] random ids: model_input is [:, :-1], target_tokens [:, 1:]."""
    return np.random.default_rng(seed).integers(0, args.vocab, (rows, args.seq + 1))


def engine_datums(rows: np.ndarray) -> list:
    from tinker_jax.batching import Datum

    weights = np.ones(rows.shape[1] - 1, np.float32)
    return [Datum(r[:-1], {"target_tokens": r[1:], "weights": weights}) for r in rows]


def client_datums(rows: np.ndarray) -> list:
    from tinker_jax import types

    weights = np.ones(rows.shape[1] - 1, np.float32)
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(r[:-1].tolist()),
            loss_fn_inputs={"target_tokens": r[1:], "weights": weights},
        )
        for r in rows
    ]


# ---------------------------------------------------------------------------- statistics


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):9.2f}  [{min(values):.2f}-{max(values):.2f}]"


def ratio_text(top: list[float], bottom: list[float]) -> tuple[float, float, str]:
    """(median ratio, best ratio, text) of two per-repeat throughput lists."""
    med = statistics.median(top) / statistics.median(bottom)
    best = max(top) / max(bottom)
    return med, best, f"{med:.2f}x on medians, {best:.2f}x on best repeats"


def verdict(ok: bool) -> str:
    return "MET" if ok else "NOT MET"


# ---------------------------------------------------------------------------- engine trace


class EngineTrace:
    """Counts and times the server engine's calls inside a window (instance wrappers)."""

    def __init__(self, worker):
        from tinker_jax.service import engine_calls as calls

        self.trainer = worker.engine.trainer
        self.lock = threading.Lock()
        self.fb: list[tuple[int, int, float]] = []  # (runs, rows, seconds) per engine call
        self.optim: list[float] = []
        self.ticks: list[float] = []
        call = worker.engine.call
        tick = worker._execute_ready

        def traced_call(engine_call):
            start = time.perf_counter()
            out = call(engine_call)
            seconds = time.perf_counter() - start
            if isinstance(engine_call, calls.ForwardBackward) and not engine_call.forward_only:
                rows = sum(len(r.datums) for r in engine_call.runs)
                self._add(self.fb, (len(engine_call.runs), rows, seconds))
            elif isinstance(engine_call, calls.OptimStep):
                self._add(self.optim, seconds)
            return out

        def traced_tick(ready):
            start = time.perf_counter()
            tick(ready)
            if ready:
                self._add(self.ticks, time.perf_counter() - start)

        worker.engine.call = traced_call
        worker._execute_ready = traced_tick

    def _add(self, target: list, value) -> None:
        with self.lock:
            target.append(value)

    def reset(self) -> dict[str, int]:
        with self.lock:
            self.fb, self.optim, self.ticks = [], [], []
        return dict(self.trainer.trace_counts)

    def report(self, wall: float, traces_before: dict[str, int]) -> dict:
        with self.lock:
            fb, optim, ticks = list(self.fb), list(self.optim), list(self.ticks)
        compiled = {
            k: v - traces_before.get(k, 0)
            for k, v in self.trainer.trace_counts.items()
            if v != traces_before.get(k, 0)
        }
        fb_s, optim_s, tick_s = sum(t for *_, t in fb), sum(optim), sum(ticks)
        return {
            "fb_calls": len(fb),
            "runs_per_call": collections.Counter(r for r, _, _ in fb),
            "rows_per_call": statistics.mean(r for _, r, _ in fb) if fb else 0.0,
            "fb_s": fb_s,
            "optim_calls": len(optim),
            "optim_s": optim_s,
            "optim_mean_s": optim_s / len(optim) if optim else 0.0,
            "tick_s": tick_s,
            "busy": min(tick_s / wall, 1.0),  # a tick may straddle the window start
            "compute": (fb_s + optim_s) / wall,
            "compiled": compiled,
        }


def trace_line(rep: dict, wall: float) -> str:
    hist = " ".join(f"{k}:{v}" for k, v in sorted(rep["runs_per_call"].items()))
    line = (
        f"engine: {rep['fb_calls']} fb calls (runs/call {hist}; {rep['rows_per_call']:.1f} rows),"
        f" fb {rep['fb_s']:.2f}s + {rep['optim_calls']} optim {rep['optim_s']:.2f}s"
        f" ({1e3 * rep['optim_mean_s']:.0f} ms each) of {wall:.2f}s wall;"
        f" engine thread busy {100 * rep['busy']:.0f}%"
        f" (trainer compute {100 * rep['compute']:.0f}%)"
    )
    if rep["compiled"]:
        line += f"  COMPILED IN WINDOW: {rep['compiled']}"
    return line


# ---------------------------------------------------------------------------- loops


def client_steps(tc, data, steps: int, adam) -> float:
    """`steps` pipelined steps; returns the last loss:sum."""
    loss = float("nan")
    for _ in range(steps):
        fwd = tc.forward_backward(data, "cross_entropy")
        opt = tc.optim_step(adam)
        loss = fwd.result(timeout=600).metrics["loss:sum"]
        opt.result(timeout=600)
    return loss


def main() -> None:
    args = parse_args()
    import jax

    started = time.perf_counter()
    print("config:", json.dumps(vars(args)))
    device = jax.devices()[0]
    print(
        f"device: {jax.default_backend()} {device.device_kind} x{len(jax.devices())}; "
        f"{os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}"
    )
    if args.probe is not None:
        print("PROBE " + json.dumps(first_request_probe(args)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix="bench-service-"))
    try:
        results = part_c(args, work) if args.only == "c" else run_parts(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        "\ntargets: "
        + ", ".join(f"({k}) {verdict(v)}" for k, v in results.items())
        + f"; total {time.perf_counter() - started:.0f}s, load average {os.getloadavg()[0]:.1f}"
    )


def run_parts(args: argparse.Namespace, work: Path) -> dict[str, bool]:
    """Builds the model folder, the server and the in-process trainer; runs (a) and (b)."""
    import jax

    from tinker_jax import ServiceClient
    from tinker_jax import types as client_types
    from tinker_jax.batching import RunBatch
    from tinker_jax.lora import LoRASpec
    from tinker_jax.optim import AdamParams
    from tinker_jax.service.config import ServerConfig
    from tinker_jax.service.server import Server
    from tinker_jax.sharding import make_mesh
    from tinker_jax.trainer import LoraConfig, Trainer
    from tinker_jax.weights import load_model

    started = time.perf_counter()
    # The in-process trainer and the server's compile the same programs: a persistent cache
    # lets the second compile of each be a cache hit (warm-up only, never timed).
    jax.config.update("jax_compilation_cache_dir", str(args.compilation_cache or work / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    folder = Path(args.model_dir) if args.model_dir else work / "model"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").is_file():
        write_model(folder, args)
    mesh_shape = {"data": 1, "fsdp": 1, "tensor": 1}
    server = Server(
        ServerConfig.from_dict(
            {
                "base_models": [str(folder)],
                "storage": work / "storage",
                "port": 0,
                "mesh": mesh_shape,
                "max_adapters": args.max_adapters,
                "max_lora_rank": args.rank,
                "sampler_slots": 1,
                "sampler_rows": 1,
                "max_seq_len": args.seq + 16,
                "dtype": args.dtype,
            }
        )
    )
    _, api_key = server.store.create_user("bench")
    address = f"127.0.0.1:{server.port}"
    trace = EngineTrace(server.workers[str(folder)])
    mesh = make_mesh(mesh_shape)
    model, _ = load_model(
        str(folder),
        lora=LoRASpec(args.max_adapters, args.rank),
        mesh=mesh,
        dtype=jax.numpy.dtype(args.dtype),
    )
    trainer = Trainer(model, mesh)
    adam = AdamParams(learning_rate=args.lr)
    client_adam = client_types.AdamParams(learning_rate=args.lr)
    print(f"server on {address}, model {folder} ({time.perf_counter() - started:.0f}s)")
    clients = []
    results: dict[str, bool] = {}

    def new_client() -> ServiceClient:
        clients.append(ServiceClient(base_url=address, api_key=api_key))
        return clients[-1]

    try:
        if args.only in (None, "a"):
            # Its own session: closing it frees the run's adapter slot for part (b).
            with ServiceClient(base_url=address, api_key=api_key) as client_a:
                results["a"] = part_a(
                    args, trainer, adam, client_a, client_adam, str(folder), trace, RunBatch
                )
        main_client = new_client()
        if args.only in (None, "b"):
            results["b"] = part_b(
                args,
                trainer,
                adam,
                main_client,
                client_adam,
                str(folder),
                trace,
                RunBatch,
                LoraConfig,
                new_client,
            )
    finally:
        for client in clients:
            client.close()
        server.stop()
    return results


def part_c(args: argparse.Namespace, work: Path) -> dict[str, bool]:
    """(c): each probe in a process of its own, cold then warm cache; prints the table."""
    import subprocess
    import sys

    folder = Path(args.model_dir) if args.model_dir else work / "model"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "config.json").is_file():
        write_model(folder, args)
    print(
        f"\n(c) first-request latency: {args.batch} x {args.seq} tokens, a {args.seq}-token prompt"
    )
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "intermediate", "vocab")
        or k in ("dtype", "rank", "seq", "batch", "max_adapters", "lr")
    ]
    results: dict[str, dict[str, dict]] = {}
    for probe in PROBES:
        cache = work / f"xla-{probe}"
        for state in ("cold", "warm"):
            done = subprocess.run(
                [sys.executable, __file__, *flags, "--probe", probe, "--model-dir", str(folder)]
                + ["--compilation-cache", str(cache)],
                capture_output=True,
                text=True,
                timeout=3600,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
            if done.returncode or not lines:
                raise RuntimeError(
                    f"probe {probe} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
                )
            results.setdefault(state, {})[probe] = json.loads(lines[-1][len("PROBE ") :])
    heads = ("no precompile", "precompiled, user after plan", "precompiled, user at ready")
    print(f"    {'seconds from ready':<26}" + "".join(f"{h:>32}" for h in heads))
    for state in ("cold", "warm"):
        row = results[state]
        for what in ("forward_backward", "sample", "compute_logprobs"):
            cells = [f"{row[p][what]:.2f}" for p in PROBES]
            cells[1] += f" (+ plan {row[PROBES[1]]['plan_s']:.1f})"
            print(f"    {state + ' cache, first ' + what:<26}" + "".join(f"{c:>32}" for c in cells))
        plan = row[PROBES[1]]
        print(
            f"    {state} cache: plan of {plan['planned']} programs, {plan['compiled']} XLA "
            f"compilations + {plan['cached']} from the cache; the user's first steps then compiled "
            + ", ".join(f"{row[p]['user_compilations']} ({p})" for p in PROBES)
        )
    return {}


def first_request_probe(args: argparse.Namespace) -> dict:
    """One (c) measurement in this process: a server, then a new user's first steps."""
    import jax

    from tinker_jax import ServiceClient
    from tinker_jax import types as client_types
    from tinker_jax.service.config import ServerConfig
    from tinker_jax.service.metrics import compilations
    from tinker_jax.service.server import Server

    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    level = "none" if args.probe == "none" else "common"
    work = Path(tempfile.mkdtemp(prefix="bench-probe-"))
    server = Server(
        ServerConfig.from_dict(
            {
                "base_models": [args.model_dir],
                "storage": work / "storage",
                "port": 0,
                "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
                "max_adapters": args.max_adapters,
                "max_lora_rank": args.rank,
                "sampler_slots": 1,
                "sampler_rows": 1,
                "max_seq_len": args.seq + 32,
                "dtype": args.dtype,
                "precompile": level,
            }
        )
    )
    out: dict = {"plan_s": 0.0, "planned": 0, "compiled": 0, "cached": 0}
    try:
        ready = time.perf_counter()
        if args.probe == "common-after-plan":
            (precompiler,) = server.precompilers.values()
            precompiler.done.wait()
            out.update(
                plan_s=precompiler.seconds,
                planned=len(precompiler.keys),
                compiled=precompiler.compiled,
                cached=precompiler.cached,
            )
            ready = time.perf_counter()
        before = sum(compilations().values())
        _, api_key = server.store.create_user("bench")
        with ServiceClient(base_url=f"127.0.0.1:{server.port}", api_key=api_key) as client:
            tc = client.create_lora_training_client(args.model_dir, rank=args.rank, seed=0)
            data = client_datums(token_rows(0, args.batch, args))
            tc.forward_backward(data, "cross_entropy").result(timeout=3600)
            out["forward_backward"] = time.perf_counter() - ready
            tc.optim_step(client_types.AdamParams(learning_rate=args.lr)).result(timeout=3600)
            sampler = tc.save_weights_and_get_sampling_client()
            prompt = client_types.ModelInput.from_ints(token_rows(1, 1, args)[0, :-1].tolist())
            params = client_types.SamplingParams(max_tokens=16, seed=0)
            sampler.sample(prompt, num_samples=1, sampling_params=params).result(timeout=3600)
            out["sample"] = time.perf_counter() - ready
            sampler.compute_logprobs(prompt).result(timeout=3600)
            out["compute_logprobs"] = time.perf_counter() - ready
        out["user_compilations"] = sum(compilations().values()) - before
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return out


def part_a(args, trainer, adam, client, client_adam, base_model, trace, RunBatch) -> bool:
    from tinker_jax.trainer import LoraConfig

    tokens = args.batch * args.seq
    print(f"\n(a) overhead: 1 run, {args.batch} x {args.seq} = {tokens} tokens per step")
    rows = token_rows(0, args.batch, args)
    data, cdata = engine_datums(rows), client_datums(rows)
    slot = trainer.create_slot(LoraConfig(rank=args.rank, seed=0))
    tc = client.create_lora_training_client(base_model, rank=args.rank, seed=0)
    losses = {"in-process": 0.0, "service": 0.0}

    def inproc(steps: int) -> None:
        for _ in range(steps):
            (out,) = trainer.forward_backward([RunBatch(slot, data)], "cross_entropy")
            trainer.optim_step(slot, adam)
            losses["in-process"] = out.metrics["loss:sum"]

    def service(steps: int) -> None:
        losses["service"] = client_steps(tc, cdata, steps, client_adam)

    start = time.perf_counter()
    inproc(args.warmup)
    mid = time.perf_counter()
    service(args.warmup)
    print(
        f"    warm-up ({args.warmup} steps, compiling): in-process {mid - start:.1f}s, "
        f"service {time.perf_counter() - mid:.1f}s"
    )
    rates: dict[str, list[float]] = {"in-process": [], "service": []}
    traces, outside = [], []
    for rep in range(args.repeats):
        order = ["in-process", "service"] if rep % 2 == 0 else ["service", "in-process"]
        for side in order:
            before = trace.reset()
            start = time.perf_counter()
            (inproc if side == "in-process" else service)(args.steps)
            wall = time.perf_counter() - start
            rates[side].append(args.steps / wall)
            if side == "service":
                rep = trace.report(wall, before)
                traces.append(trace_line(rep, wall))
                outside.append(100 * (1 - rep["compute"]))
    for side in ("in-process", "service"):
        steps = rates[side]
        print(
            f"    {side:<11} steps/s {summary(steps)}   tokens/s "
            f"{statistics.median(steps) * tokens:8.1f}   (per repeat: "
            + " ".join(f"{s:.3f}" for s in steps)
            + ")"
        )
    for line in traces:
        print(f"    service {line}")
    med, best, _ = ratio_text(rates["in-process"], rates["service"])
    overhead_med, overhead_best = 100 * (med - 1), 100 * (best - 1)
    print(
        f"    final loss:sum in-process {losses['in-process']:.4f} vs service "
        f"{losses['service']:.4f} (same seed, data and steps: should agree)"
    )
    print(
        f"    service wall time outside trainer calls: {statistics.median(outside):.1f}% "
        f"[{min(outside):.1f}-{max(outside):.1f}] (the service's own cost, independent of "
        "how fast the engine ran in that window)"
    )
    ok = overhead_best <= 10.0
    print(
        f"    overhead {overhead_med:+.1f}% on medians, {overhead_best:+.1f}% on best repeats; "
        f"target <= 10% (best repeats): {verdict(ok)}"
    )
    return ok


def part_b(
    args, trainer, adam, main_client, client_adam, base_model, trace, RunBatch, LoraConfig, new
) -> bool:
    from tinker_jax.buckets import batch_bucket

    per_step = args.run_batch * args.seq
    print(
        f"\n(b) cross-run batching: {args.runs} runs x {args.run_batch} x {args.seq} tokens "
        f"per step, against 1 run alone; {args.steps_b} timed steps per run and repeat"
    )
    single = main_client.create_lora_training_client(base_model, rank=args.rank, seed=100)
    single_data = client_datums(token_rows(100, args.run_batch, args))
    tcs = [
        new().create_lora_training_client(base_model, rank=args.rank, seed=101 + i)
        for i in range(args.runs)
    ]
    run_data = [client_datums(token_rows(101 + i, args.run_batch, args)) for i in range(args.runs)]
    pool = concurrent.futures.ThreadPoolExecutor(args.runs, thread_name_prefix="bench-run")

    def together(steps: int) -> None:
        futures = [
            pool.submit(client_steps, tc, data, steps, client_adam)
            for tc, data in zip(tcs, run_data)
        ]
        for f in futures:
            f.result()

    start = time.perf_counter()
    # Compile every batch bucket an engine call of 1..runs runs can take, deterministically:
    # one request of that many rows from the single run (rows, not runs, set the shape).
    buckets = sorted({batch_bucket(k * args.run_batch) for k in range(1, args.runs + 1)})
    for rows in buckets:
        data = (single_data * rows)[:rows]
        client_steps(single, data, 1, client_adam)
    client_steps(single, single_data, args.warmup, client_adam)
    before = trace.reset()
    together(args.warmup)
    if trace.trainer.trace_counts != before:
        print("    note: the concurrent warm-up still compiled something")
    print(f"    warm-up (buckets {buckets} rows, compiling): {time.perf_counter() - start:.1f}s")

    rates: dict[str, list[float]] = {"1 run": [], f"{args.runs} runs": []}
    lines = {k: [] for k in rates}
    for rep in range(args.repeats):
        order = list(rates) if rep % 2 == 0 else list(rates)[::-1]
        for side in order:
            before = trace.reset()
            start = time.perf_counter()
            if side == "1 run":
                client_steps(single, single_data, args.steps_b, client_adam)
                tokens = per_step * args.steps_b
            else:
                together(args.steps_b)
                tokens = per_step * args.steps_b * args.runs
            wall = time.perf_counter() - start
            rates[side].append(tokens / wall)
            lines[side].append(trace_line(trace.report(wall, before), wall))
    pool.shutdown()
    for side, values in rates.items():
        print(
            f"    {side:<8} tokens/s {summary(values)}   (per repeat: "
            + " ".join(f"{v:.1f}" for v in values)
            + ")"
        )
    for side in rates:
        for line in lines[side]:
            print(f"    {side:<8} {line}")
    med, best, text = ratio_text(rates[f"{args.runs} runs"], rates["1 run"])
    ok = best >= 6.0
    print(f"    ratio {args.runs} runs / 1 run: {text}; target >= 6x (best): {verdict(ok)}")
    if not args.no_ceiling:
        ceiling(args, trainer, adam, RunBatch, LoraConfig, best)
    return ok


def ceiling(args, trainer, adam, RunBatch, LoraConfig, service_best: float) -> None:
    """The in-process engine with perfect batching: the best ratio (b) can reach here.

    One step of n runs = one forward_backward over all their rows + n optim_steps; each part
    is timed separately and the best of `--repeats` is kept (robust to outside load)."""
    free = [s for s in range(trainer.num_slots) if s not in trainer.slots]
    slots = [
        trainer.create_slot(LoraConfig(rank=args.rank, seed=200 + i))
        for i in range(min(args.runs, len(free)))
    ]
    batches = [
        RunBatch(s, engine_datums(token_rows(200 + i, args.run_batch, args)))
        for i, s in enumerate(slots)
    ]
    n = len(batches)
    fb_s: dict[int, list[float]] = {1: [], n: []}
    optim_s: dict[int, list[float]] = {1: [], n: []}
    for rep in range(1 + args.repeats):  # the first round compiles, untimed
        for runs in (batches[:1], batches) if rep % 2 == 0 else (batches, batches[:1]):
            start = time.perf_counter()
            trainer.forward_backward(runs, "cross_entropy")
            mid = time.perf_counter()
            for run in runs:
                trainer.optim_step(run.slot, adam)
            if rep:
                fb_s[len(runs)].append(mid - start)
                optim_s[len(runs)].append((time.perf_counter() - mid) / len(runs))
    per_run = args.run_batch * args.seq
    one = per_run / (min(fb_s[1]) + min(optim_s[1]))
    many = n * per_run / (min(fb_s[n]) + n * min(optim_s[n]))
    no_optim = n * min(fb_s[1]) / min(fb_s[n])
    print(
        f"    engine ceiling (in-process, best of {args.repeats}): 1 run fb "
        f"{1e3 * min(fb_s[1]):.0f} ms + optim {1e3 * min(optim_s[1]):.0f} ms = {one:.1f} tokens/s;"
        f" {n} runs fb {1e3 * min(fb_s[n]):.0f} ms + {n} x optim {1e3 * min(optim_s[n]):.0f} ms"
        f" = {many:.1f} tokens/s; ratio {many / one:.2f}x ({no_optim:.2f}x for the fb calls"
        f" alone); service reached {service_best / (many / one):.0%} of it"
    )


if __name__ == "__main__":
    main()
