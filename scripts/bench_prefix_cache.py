"""The KV prefix cache: the same sampling workloads with and without it, side by side.

Two workloads, each run by a sampler without the cache and by one with it (same model, same
rows, built in the same process):

* multi-turn: `--conversations` agent-style conversations of `--turns` turns from one
  sampling client. Every conversation starts with the same `--system-len`-token system
  prompt and a `--user-len`-token user message; each later turn's prompt is the last one
  plus the model's reply (`--reply-len` greedy tokens) plus a new user message. A turn
  submits every conversation's prompt at once and runs them to the end.
* rl-group: `--groups` groups of `--group-size` requests (one sample each, temperature 1,
  a seed per request, as an RL loop sends one request per rollout), each group sharing one
  `--group-prompt-len`-token prompt, all submitted at once.

Each side runs each workload once untimed (compilation) in a namespace of its own, then
timed with new random tokens of the same lengths (so the timed run finds nothing of the
untimed one in the cache). Reported per side:

* prefill tokens: prompt tokens the prefill computed (the cache serves the rest);
* tokens/s: generated tokens over the wall time of the workload, end to end;
* time to first token: from a turn's (or the group's) submission to the return of the
  sampler's first `step` call, which prefills every admitted prompt and samples its first
  token, then runs one decode call of up to `--steps-per-call` steps; the mean over turns.

The multi-turn workload also checks exactness: the greedy replies with the cache equal those
without it, and their logprobs agree within 1e-5 (fp32).

    python scripts/bench_prefix_cache.py             # CPU: ratios and the targets
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_models import add_model_args, ensure_model, parse_with_preset

TARGETS = {"prefill tokens": 3.0, "tokens/s": 1.5}  # multi-turn, cache on vs off, on CPU


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=384)
    p.add_argument("--user-len", type=int, default=48)
    p.add_argument("--reply-len", type=int, default=16)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--group-prompt-len", type=int, default=384)
    p.add_argument("--group-reply-len", type=int, default=16)
    p.add_argument("--steps-per-call", type=int, default=8, help="Sampler steps_per_call")
    p.add_argument("--share", type=float, default=0.5, help="prefix_cache_share of the cache")
    p.add_argument("--block", type=int, default=16, help="prefix cache block size")
    return parse_with_preset(p)


class Side:
    """One sampler (with or without the cache) and what it counted over a workload."""

    def __init__(self, model, mesh, args: argparse.Namespace, rows: int, max_len: int, share):
        from tinker_jax.sampler import Sampler

        self.sampler = Sampler.sharing_base(
            model,
            mesh,
            slots=1,
            rows=rows,
            max_len=max_len,
            steps_per_call=args.steps_per_call,
            prefix_cache_share=share,
            prefix_block=args.block,
        )

    def run(self, requests) -> tuple[list, float]:
        """Submits `requests` at once and steps until all finish: (results, seconds to the
        first step's return)."""
        start = time.perf_counter()
        ids = [self.sampler.submit(r) for r in requests]
        done = self.sampler.step()
        first = time.perf_counter() - start
        while not all(i in done for i in ids):
            done.update(self.sampler.step())
        return [done[i] for i in ids], first


def multi_turn(side: Side, args: argparse.Namespace, seed: int) -> tuple[dict, list]:
    """The multi-turn workload on `side` (random tokens from `seed`, its own namespace)."""
    from tinker_jax.sampler import SampleRequest
    from tinker_jax.sampling import SamplingParams

    rng = np.random.default_rng(seed)
    system = list(rng.integers(2, args.vocab, args.system_len))
    convos = [
        system + list(rng.integers(2, args.vocab, args.user_len)) for _ in range(args.conversations)
    ]
    params = SamplingParams(max_tokens=args.reply_len, temperature=0.0, stop=[])

    def work():
        replies, firsts, generated = [], [], 0
        for _ in range(args.turns):
            requests = [SampleRequest(c, params=params, cache_namespace=seed) for c in convos]
            results, first = side.run(requests)
            firsts.append(first)
            for convo, result in zip(convos, results):
                reply = result.sequences[0]
                replies.append((reply.tokens, reply.logprobs))
                generated += len(reply.tokens)
                convo += reply.tokens + list(rng.integers(2, args.vocab, args.user_len))
        return replies, firsts, generated

    return _measure(side, work)


def rl_group(side: Side, args: argparse.Namespace, seed: int) -> tuple[dict, list]:
    """The RL group workload on `side` (random tokens from `seed`, its own namespace)."""
    from tinker_jax.sampler import SampleRequest
    from tinker_jax.sampling import SamplingParams

    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(2, args.vocab, args.group_prompt_len)) for _ in range(args.groups)]
    requests = [
        SampleRequest(
            prompt,
            params=SamplingParams(max_tokens=args.group_reply_len, seed=g * 1000 + i, stop=[]),
            cache_namespace=seed,
        )
        for g, prompt in enumerate(prompts)
        for i in range(args.group_size)
    ]

    def work():
        results, first = side.run(requests)
        tokens = [(r.sequences[0].tokens, r.sequences[0].logprobs) for r in results]
        return tokens, [first], sum(len(t) for t, _ in tokens)

    return _measure(side, work)


def _measure(side: Side, work) -> tuple[dict, list]:
    """Runs `work` (-> (outputs, first step seconds of each submission, generated tokens))
    on `side`: (its stats, outputs)."""
    sampler = side.sampler
    prefilled = sampler.prefill_tokens
    start = time.perf_counter()
    outputs, firsts, generated = work()
    seconds = time.perf_counter() - start
    stats = {
        "prefill tokens": sampler.prefill_tokens - prefilled,
        "tokens/s": generated / seconds,
        "time to first token ms": 1000 * float(np.mean(firsts)),
        "wall s": seconds,
    }
    return stats, outputs


def report(name: str, off: dict, on: dict) -> dict[str, float]:
    """Prints one workload's two sides and their ratios; returns the ratios."""
    print(f"{name}:")
    for key in off:
        print(f"  {key:24s} off {off[key]:12.1f}   on {on[key]:12.1f}")
    ratios = {
        "prefill tokens": off["prefill tokens"] / max(on["prefill tokens"], 1),
        "tokens/s": on["tokens/s"] / off["tokens/s"],
        "time to first token": off["time to first token ms"] / on["time to first token ms"],
    }
    print(
        f"  ratio off/on: {ratios['prefill tokens']:.2f}x fewer prefill tokens, "
        f"{ratios['tokens/s']:.2f}x tokens/s, "
        f"{ratios['time to first token']:.2f}x faster first token"
    )
    return ratios


def main() -> None:
    args = parse_args()
    import jax
    import jax.numpy as jnp

    from tinker_jax.lora import LoRASpec
    from tinker_jax.sharding import make_mesh
    from tinker_jax.weights import load_model

    print("config:", json.dumps({k: v for k, v in vars(args).items() if v is not None}))
    turn = args.user_len + args.reply_len
    max_len = max(args.system_len + args.turns * turn, args.group_prompt_len + args.group_reply_len)
    rows = max(args.conversations, args.group_size)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir or tmp)
        ensure_model(folder, args, max_len, fast=True)
        mesh = make_mesh(devices=jax.devices()[:1])
        model, _ = load_model(
            str(folder), lora=LoRASpec(slots=1, max_rank=8), mesh=mesh, dtype=jnp.dtype(args.dtype)
        )
        print(f"{jax.default_backend()} {jax.devices()[0].device_kind}, {rows} rows x {max_len}")
        results = {}
        for workload in (multi_turn, rl_group):
            sides = {}
            for label, share in (("off", 0.0), ("on", args.share)):
                side = Side(model, mesh, args, rows, max_len, share)
                workload(side, args, seed=1)  # compiles; its blocks stay, in another namespace
                sides[label] = workload(side, args, seed=2)
            results[workload.__name__] = sides
        ratios = report(
            "multi-turn", results["multi_turn"]["off"][0], results["multi_turn"]["on"][0]
        )
        check_exact(results["multi_turn"]["off"][1], results["multi_turn"]["on"][1])
        report("rl-group", results["rl_group"]["off"][0], results["rl_group"]["on"][0])
        if jax.default_backend() == "cpu":
            for key, need in TARGETS.items():
                verdict = "met" if ratios[key] >= need else "NOT met"
                print(f"target multi-turn {key}: >= {need:.1f}x, got {ratios[key]:.2f}x: {verdict}")


def check_exact(off: list, on: list) -> None:
    """Prints whether the greedy replies with the cache equal those without it."""
    same = sum(a[0] == b[0] for a, b in zip(off, on))
    worst = max(
        (float(np.max(np.abs(np.subtract(a[1], b[1])))) for a, b in zip(off, on) if a[0] == b[0]),
        default=0.0,
    )
    print(
        f"  greedy replies equal in {same}/{len(off)} turns; largest logprob difference {worst:.2e}"
    )


if __name__ == "__main__":
    main()
