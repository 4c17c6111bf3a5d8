"""The cookbook's RL loop asynchronous against synchronous on one server: wall time per
training step and sampled sequences per second, side by side (issue #17).

    python scripts/bench_rl.py                          # CPU defaults, a few minutes
    python scripts/bench_rl.py --steps 3 --repeats 1    # a quick look

Both sides are tinker-cookbook 0.6.1's `tinker_cookbook.rl.train.main`, unmodified, through
the official SDK over HTTP, against a server in this process on the built-in tiny model
(`tinker_jax.tiny_model`) with the tests' in-memory task (`tests/cookbook_env.py`: one-turn
prompts, a reward from the sampled token ids; nothing is downloaded), both with the
cookbook's async default loss, `stable_reinforce`:
- sync: sample a batch of groups with the current weights, train on it, repeat;
- async: `AsyncConfig(max_steps_off_policy=K)`: rollouts keep running while the trainer
  steps, on weights at most K steps older than the trainer's.

Measured on each run, after an untimed run of each kind has compiled every program, over the
loop's time: from its first sampling request to the end of `main` (the cookbook's start-up,
making the training client and the tokenizer, excluded; the final checkpoint included):
- seconds per training step: the loop's time over its training steps;
- sampled sequences per second: every sequence the loop sampled (async sampling may run
  ahead of the last step, and that work is counted too) over the loop's time.
Repeats alternate the two sides (sync async, async sync, ...) so that load from other
processes falls on both alike; printed as median [min-max] and the ratio of medians.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import bench_models  # noqa: F401 - the engine's XLA flags, before JAX starts

sys.path.append(str(Path(__file__).resolve().parents[1]))  # tests/cookbook_env.py


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="training steps per run")
    p.add_argument("--groups", type=int, default=4, help="groups per training step")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per reply")
    p.add_argument("--off-policy", type=int, default=2, help="async max_steps_off_policy")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps: at least 1")
    return args


class LoopProbe:
    """Counts what one cookbook run does through the SDK, by wrapping the SDK's own methods
    for the run (the calls go through unchanged): when the first sampling request was made,
    how many training steps were submitted, and how many sequences the loop asked its
    sampling clients for (a run that completes got every one)."""

    def __init__(self):
        self.first_sample: float | None = None
        self.steps = 0
        self.sequences = 0

    @contextlib.contextmanager
    def attached(self):
        import tinker

        training, sampling = tinker.TrainingClient, tinker.SamplingClient
        optim_step, sample = training.optim_step, sampling.sample

        def counted_optim_step(client, *args, **kwargs):
            self.steps += 1
            return optim_step(client, *args, **kwargs)

        def counted_sample(client, *args, **kwargs):
            if self.first_sample is None:
                self.first_sample = time.perf_counter()
            self.sequences += kwargs["num_samples"] if "num_samples" in kwargs else args[1]
            return sample(client, *args, **kwargs)

        training.optim_step = counted_optim_step
        sampling.sample = counted_sample
        try:
            yield self
        finally:
            training.optim_step = optim_step
            sampling.sample = sample


def run_loop(args, model: str, url: str, log_path: Path, off_policy: int | None) -> dict:
    """One cookbook RL run (sync when `off_policy` is None); its step time and sampling rate."""
    from tinker_cookbook.rl import train

    from tests.cookbook_env import RENDERER, EvenTokenDatasetBuilder

    builder = EvenTokenDatasetBuilder(
        model_name=model,
        batch_size=args.groups,
        group_size=args.group_size,
        num_batches=args.steps + off_policy + 1 if off_policy else args.steps + 1,
    )
    config = train.Config(
        learning_rate=1e-3,
        dataset_builder=builder,
        model_name=model,
        recipe_name="bench_rl",
        max_tokens=args.max_tokens,
        log_path=str(log_path),
        eval_every=0,
        save_every=0,
        renderer_name=RENDERER,
        lora_rank=8,
        base_url=url,
        max_steps=args.steps,
        num_groups_to_log=0,
        loss_fn="stable_reinforce",
        async_config=None
        if off_policy is None
        else train.AsyncConfig(max_steps_off_policy=off_policy, groups_per_batch=args.groups),
    )
    probe, chatter = LoopProbe(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:  # the cookbook's console output and the root logger it takes over go to `chatter`
        with probe.attached(), contextlib.redirect_stdout(chatter):
            with contextlib.redirect_stderr(chatter):
                asyncio.run(train.main(config))
    except BaseException:
        print(chatter.getvalue()[-5000:], file=sys.stderr)
        raise
    finally:
        root.handlers[:], root.level = handlers, level
    loop = time.perf_counter() - probe.first_sample
    assert probe.steps == args.steps, f"{probe.steps} training steps, expected {args.steps}"
    return {"step_s": loop / probe.steps, "samples_per_s": probe.sequences / loop}


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    args = parse_args()
    import tinker
    from tinker_cookbook.rl import train

    from tinker_jax.service.config import ServerConfig
    from tinker_jax.service.server import Server
    from tinker_jax.tiny_model import write_tiny_model

    # Warnings only, here and after each run (which hands the root logger back like this).
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("tinker_cookbook").setLevel(logging.WARNING)  # its per-step tables
    work = Path(tempfile.mkdtemp(prefix="bench-rl-"))
    rows = args.groups * args.group_size * (args.off_policy + 1)
    server = Server(
        ServerConfig.from_dict(
            {
                "base_models": [str(write_tiny_model(work / "tiny-qwen3"))],
                "storage": work / "storage",
                "port": 0,
                "http_port": 0,
                "max_adapters": 4,
                "max_lora_rank": 8,
                "sampler_slots": 2 * (args.off_policy + 2),
                "sampler_rows": max(8, rows),
                "max_seq_len": 256,
                "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
            }
        )
    )
    model = server.config.base_models[0]
    _, key = server.store.create_user("bench")
    url = f"http://127.0.0.1:{server.http_port}"
    os.environ.update(TINKER_API_KEY=key, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    train.fetch_model_pricing = lambda model_name, **kwargs: None  # no network
    print(
        f"cookbook rl.train on {model}: {args.steps} steps of {args.groups} groups x "
        f"{args.group_size}, {args.max_tokens} tokens per reply, stable_reinforce; "
        f"tinker SDK {tinker.__version__}; {os.cpu_count()} CPUs"
    )
    sides = {"sync": None, f"async (off-policy {args.off_policy})": args.off_policy}
    results: dict[str, list[dict]] = {name: [] for name in sides}
    try:
        for off_policy in sides.values():  # compiles every program; not timed
            run_loop(args, model, url, work / f"warm-{off_policy}", off_policy)
        for repeat in range(args.repeats):
            order = list(sides.items())
            for name, off_policy in order if repeat % 2 == 0 else order[::-1]:
                log_path = work / f"run-{repeat}-{off_policy}"
                results[name].append(run_loop(args, model, url, log_path, off_policy))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    for name, runs in results.items():
        print(
            f"{name:>22}: {summary([r['step_s'] for r in runs])} s per training step, "
            f"{summary([r['samples_per_s'] for r in runs])} sampled sequences/s"
        )
    sync, async_ = (results[name] for name in sides)
    step = statistics.median(r["step_s"] for r in sync) / statistics.median(
        r["step_s"] for r in async_
    )
    rate = statistics.median(r["samples_per_s"] for r in async_) / statistics.median(
        r["samples_per_s"] for r in sync
    )
    print(f"ratio async/sync: {step:.2f}x training steps per second, {rate:.2f}x samples/s")


if __name__ == "__main__":
    main()
