"""Sampling throughput: our sampler against transformers `generate` on the same model.

Both sides load one random HF folder, take the same prompts (`--prompt-len` random tokens,
one prompt per sequence) and generate exactly `--new-tokens` tokens greedily with no stop
token (`eos_token_id=None` for torch, `stop=[]` for us; torch uses its KV cache). Each batch
size runs once untimed (compilation, for us), then `--repeats` times alternating the two
sides; the median is reported. Tokens/s counts generated tokens only, end to end: prefill of
the prompts, every decode step, and host work. Our sampler is built with `rows` = the batch
size, the base model (no adapter) and `--rank`-sized LoRA slots that it still computes.
With `--adapters K`, the rows are spread round robin over K random LoRA adapters of rank
`--rank` (a multi-tenant batch): ours from K sampler slots, transformers through PEFT's
mixed-batch `generate(adapter_names=...)` with K adapters on q, k, v, o, gate, up and down
(ours also computes the lm head's LoRA). The two sides' adapters differ, so their tokens are
not compared then.

    python scripts/bench_sample.py                                 # CPU: ratios and targets
    python scripts/bench_sample.py --preset qwen3-1.7b --no-torch  # accelerator: roofline

Conventions (printed with the numbers):

    weight_bytes = itemsize * (N_layers + vocab * hidden)
    decode_flops per token = 2 * (N_layers + vocab * hidden) + 4 * L * S * H * D

N_layers counts every weight matrix of the decoder layers that a token reads (q, k, v, o,
gate, up, down; in a MoE model only its experts_per_token experts, the batch-1 case; norms
and the router are negligible); `vocab * hidden` is the lm head, tied or not. The embedding
lookup reads one row per token and is not counted, nor are the LoRA arrays. A decode step
reads every weight once whatever the batch, so at batch 1 decode is bound by memory
bandwidth and its ceiling is `roofline tokens/s = hbm_bytes_per_s / weight_bytes`. The KV
cache (2 * L * S * KVH * D * itemsize per sequence at context S) is left out of that
ceiling: at the prompt and output lengths here it is under 1% of the weights (it is printed
for the cache our sampler allocates, which attention reads in full every step). The
attention term of decode_flops counts QK^T and PV (2 FLOPs per multiply-add each) over the S
positions a token attends to.

"Decode" tokens/s excludes prefill: it is (new_tokens - 1) * batch over the end-to-end time
minus the time of the same requests with max_tokens=1 (prefill + first token).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_models import (
    active_shapes,
    add_model_args,
    attention_shapes,
    ensure_model,
    is_moe,
    mlp_shapes,
    parse_with_preset,
)

# The CPU targets: batch 1 against torch (ratio ours/torch), batch 32 against its own matmul
# ceiling (`report_matmul_ceiling`: the share of a step of nothing but its weight matmuls).
TORCH_TARGETS = {1: 2.0}
# The modules PEFT adapts on the transformers side with --adapters.
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CEILING_TARGETS = {32: 0.75}
# HBM bandwidth in GB/s by `device_kind` substring (the vendors' figures).
HBM_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "TPU v5p": 2765.0, "TPU v6": 1640.0}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument(
        "--batches",
        default=None,
        help="comma-separated batch sizes (default 1,32 on CPU, 1,64 on GPU/TPU)",
    )
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per side and batch")
    p.add_argument("--steps-per-call", type=int, default=16, help="Sampler steps_per_call")
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="the sampler's cache rows, all decoded every step (default: the batch; a server's "
        "sampler has sampler_rows, 32 by default, however few requests it holds)",
    )
    p.add_argument(
        "--max-len", type=int, default=None, help="Sampler max_len (default prompt + new tokens)"
    )
    p.add_argument("--rank", type=int, default=8, help="max rank of the sampler's LoRA slots")
    p.add_argument("--lora-slots", type=int, default=2, help="sampler adapter slots")
    p.add_argument(
        "--adapters",
        type=int,
        default=0,
        help="distinct random LoRA adapters the rows are spread over (0: the base model)",
    )
    p.add_argument("--no-torch", action="store_true", help="time only our sampler")
    p.add_argument(
        "--torch-device", default="cpu", help="where transformers runs (cpu, or cuda on a GPU)"
    )
    p.add_argument(
        "--hbm-gbps",
        type=float,
        default=None,
        help="memory bandwidth in GB/s for the roofline (default: the chip's figure from "
        "HBM_GBPS on GPU/TPU; on CPU the roofline prints only when this is given)",
    )
    return parse_with_preset(p)


def weight_counts(args: argparse.Namespace) -> tuple[int, int]:
    """(N_layers, lm head weights) as the module docstring defines them."""
    per_layer = sum(o * i for o, i in active_shapes(args))
    return args.layers * per_layer, args.vocab * args.hidden


def make_prompts(args: argparse.Namespace, batch: int) -> np.ndarray:
    rng = np.random.default_rng(batch)
    return rng.integers(2, args.vocab, (batch, args.prompt_len), dtype=np.int64)


class Ours:
    """Our sampler at one batch size (rows = batch, or --rows), on a model shared by all batch
    sizes."""

    def __init__(self, model, mesh, args: argparse.Namespace, batch: int):
        from tinker_jax.sampler import Sampler

        self.args = args
        max_len = args.max_len or args.prompt_len + args.new_tokens
        self.sampler = Sampler.sharing_base(
            model,
            mesh,
            slots=max(args.lora_slots, args.adapters),
            rows=max(args.rows or batch, batch),
            max_len=max_len,
            steps_per_call=args.steps_per_call,
        )
        rng = np.random.default_rng(0)
        layout, lora = self.sampler.layout, self.sampler.lora
        shapes = list(zip(layout.leaves, layout.slot_shapes(lora)))
        adapters = [
            {leaf.name: rng.normal(0.0, 0.02, shape).astype(np.float32) for leaf, shape in shapes}
            for _ in range(args.adapters)
        ]
        self.slots: list[int | None] = [
            self.sampler.load_adapter(arrays, scale=1.0) for arrays in adapters
        ] or [None]

    def generate(self, prompts: np.ndarray, new_tokens: int) -> list[list[int]]:
        from tinker_jax.sampler import SampleRequest
        from tinker_jax.sampling import SamplingParams

        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, stop=[])
        requests = [
            SampleRequest(p, 1, params, slot=self.slots[i % len(self.slots)])
            for i, p in enumerate(prompts)
        ]
        results = self.sampler.sample(requests)
        return [r.sequences[0].tokens for r in results]


class Torch:
    """transformers `generate`: greedy, KV cache on, no EOS, fixed length."""

    def __init__(self, folder: Path, args: argparse.Namespace):
        import torch
        from transformers import AutoModelForCausalLM

        self.torch, self.device = torch, torch.device(args.torch_device)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype))
        self.adapter_names: list[str] = []
        if args.adapters:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=args.rank,
                lora_alpha=args.rank,
                target_modules=list(MODULES),
                init_lora_weights=False,
            )
            self.adapter_names = [f"adapter{k}" for k in range(args.adapters)]
            model = get_peft_model(model, config, adapter_name=self.adapter_names[0])
            for name in self.adapter_names[1:]:
                model.add_adapter(name, config)
        self.model = model.to(self.device).eval()

    def generate(self, prompts: np.ndarray, new_tokens: int) -> list[list[int]]:
        torch = self.torch
        ids = torch.from_numpy(prompts).long().to(self.device)
        names = self.adapter_names
        mixed = {"adapter_names": [names[i % len(names)] for i in range(len(ids))]} if names else {}
        with torch.inference_mode():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                use_cache=True,
                **mixed,
            )
        return out[:, prompts.shape[1] :].tolist()  # .tolist() waits for the device


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_batch(ours: Ours, theirs: Torch | None, args: argparse.Namespace, batch: int) -> dict:
    """Warm-up, then `repeats` alternating timed runs of both sides at one batch size."""
    prompts, n = make_prompts(args, batch), args.new_tokens
    warm = ours.generate(prompts, n)
    ours.generate(prompts, 1)
    assert all(len(t) == n for t in warm), "our sampler stopped early"
    if theirs is not None:
        ref = theirs.generate(prompts, n)
        assert all(len(t) == n for t in ref), "transformers stopped early"
        same = None if args.adapters else np.mean([a == b for a, b in zip(warm, ref)])
    times: dict[str, list[float]] = {"ours": [], "ours_prefill": [], "torch": []}
    for _ in range(args.repeats):
        times["ours"].append(timed(lambda: ours.generate(prompts, n))[0])
        times["ours_prefill"].append(timed(lambda: ours.generate(prompts, 1))[0])
        if theirs is not None:
            times["torch"].append(timed(lambda: theirs.generate(prompts, n))[0])
    result = {k: statistics.median(v) for k, v in times.items() if v}
    result["spread"] = {k: (min(v), max(v)) for k, v in times.items() if v}
    result["ours_tps"] = batch * n / result["ours"]
    decode_time = result["ours"] - result["ours_prefill"]
    result["ours_decode_tps"] = batch * (n - 1) / decode_time if decode_time > 0 else float("nan")
    if theirs is not None:
        result["torch_tps"] = batch * n / result["torch"]
        result["ratio"] = result["ours_tps"] / result["torch_tps"]
        result["same_tokens"] = same
    return result


def main() -> None:
    args = parse_args()
    import jax
    import jax.numpy as jnp

    from tinker_jax.lora import LoRASpec
    from tinker_jax.sharding import make_mesh
    from tinker_jax.weights import load_model

    accelerator = jax.default_backend() in ("gpu", "tpu")
    batches = [int(b) for b in (args.batches or ("1,64" if accelerator else "1,32")).split(",")]
    print("config:", json.dumps({k: v for k, v in vars(args).items() if v is not None}))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir or tmp)
        max_len = args.prompt_len + args.new_tokens
        ensure_model(folder, args, max_len, fast=args.no_torch or args.preset is not None)

        mesh = make_mesh()
        model, _ = load_model(
            str(folder),
            lora=LoRASpec(slots=1, max_rank=args.rank),
            mesh=mesh,
            dtype=jnp.dtype(args.dtype),
        )
        theirs = None if args.no_torch else Torch(folder, args)
        device = jax.devices()[0]
        print(f"ours: {jax.default_backend()} {device.device_kind} x{len(jax.devices())}", end="")
        if theirs is None:
            print()
        elif theirs.device.type == "cpu":
            print(f"; torch: CPU, {theirs.torch.get_num_threads()} threads")
        else:
            print(f"; torch: {theirs.device}")

        results = {}
        for batch in batches:
            ours = Ours(model, mesh, args, batch)
            r = results[batch] = bench_batch(ours, theirs, args, batch)
            spread = "  ".join(f"{k} {lo:.2f}-{hi:.2f}s" for k, (lo, hi) in r["spread"].items())
            line = (
                f"batch {batch:3d}: ours {r['ours_tps']:9.1f} tok/s "
                f"(decode {r['ours_decode_tps']:9.1f})"
            )
            if "torch_tps" in r:
                same = r["same_tokens"]
                line += (
                    f"  torch {r['torch_tps']:9.1f} tok/s  ratio ours/torch {r['ratio']:5.2f}x  "
                    + (
                        f"(greedy tokens equal in {same:.0%} of rows)"
                        if same is not None
                        else f"({args.adapters} random adapters a side: tokens not compared)"
                    )
                )
            print(line)
            print(f"           {args.repeats} runs each, min-max: {spread}")
            del ours

        if theirs is not None and not accelerator:
            shares = {batch: report_matmul_ceiling(args, results, batch) for batch in batches}
            for batch, need in TORCH_TARGETS.items():
                if batch in results:
                    got = results[batch]["ratio"]
                    verdict = "met" if got >= need else "NOT met"
                    print(f"target batch {batch}: >= {need:.1f}x torch, got {got:.2f}x: {verdict}")
            for batch, need in CEILING_TARGETS.items():
                if batch in shares:
                    got = shares[batch]
                    verdict = "met" if got >= need else "NOT met"
                    print(
                        f"target batch {batch}: >= {need:.0%} of its matmul ceiling, "
                        f"got {got:.0%}: {verdict}"
                    )
            report_peak_bound(args)

        if accelerator or args.hbm_gbps is not None:
            report_roofline(args, results, device.device_kind)


def report_matmul_ceiling(args: argparse.Namespace, results: dict, batch: int) -> float:
    """The most any sampler could do here at `batch`: a decode step that ran nothing but its
    weight matmuls, jitted by XLA on this machine. Each layer has arrays of its own, unrolled as
    the sampler's layers are, and the matrices that read the same input are joined (q|k|v,
    o, gate|up, down; a MoE token's experts_per_token experts each), then the lm head. At
    batch 1 that is the time to stream the weights once: the CPU's roofline. Printed as
    tokens/s and as a ratio to torch: when a CPU target asks for more than this ratio, no
    formulation of the rest of the step can meet it. Returns the share of it that ours reached.

    Also printed: the same step with attention's two products per layer over a KV cache of the
    mean attended context (prompt_len + new_tokens / 2 positions, the sampler's cache layout),
    and no softmax, norm or sampling: what a step must at least add to the ceiling here, and
    what that leaves the rest of a step at the target."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    dtype = jnp.dtype(args.dtype)

    def weight(i: int, o: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal((i, o)) * 0.02, dtype)

    attention, mlp = attention_shapes(args), mlp_shapes(args)
    q, e = attention["self_attn.q_proj"]
    kv = attention["self_attn.k_proj"][0]
    m = mlp["gate_proj"][0]
    experts = args.experts_per_token if is_moe(args) else 1
    layers = [
        (
            weight(e, q + 2 * kv),
            weight(q, e),
            [(weight(e, 2 * m), weight(m, e)) for _ in range(experts)],
        )
        for _ in range(args.layers)
    ]
    head = weight(args.hidden, args.vocab)
    x = jnp.asarray(rng.standard_normal((batch, args.hidden)), dtype)

    context = args.prompt_len + args.new_tokens // 2
    group, d = args.heads // args.kv_heads, args.head_dim

    @jax.jit
    def matmuls(x, layers, head, caches=None):
        for i, (qkv, o, mlps) in enumerate(layers):
            a = (x @ qkv)[:, :q]
            if caches is not None:
                keys, values = caches[i]
                scores = jnp.einsum("bhgd,bhdk->bhgk", a.reshape(batch, -1, group, d), keys)
                a = jnp.einsum("bhgk,bhkd->bhgd", scores, values).reshape(batch, q)
            x = x + a @ o
            for gate_up, down in mlps:
                g = x @ gate_up
                x = x + (g[:, :m] * g[:, m:]) @ down
        return x @ head

    def step_time(*cache: list) -> float:
        matmuls(x, layers, head, *cache).block_until_ready()
        return min(
            timed(lambda: matmuls(x, layers, head, *cache).block_until_ready())[0]
            for _ in range(10)
        )

    best = step_time()
    tps = batch / best
    flops = 2 * batch * (sum(w.size for w in jax.tree.leaves(layers)) + head.size)
    line = (
        f"ceiling batch {batch}: its matmuls alone take {best * 1e3:.1f} ms per step "
        f"({flops / best / 1e9:.0f} GFLOP/s) = {tps:.1f} tok/s"
    )
    r = results[batch]
    share = r["ours_tps"] / tps
    if "torch_tps" in r:
        ratio = tps / r["torch_tps"]
        line += (
            f" = {ratio:.2f}x torch; ours reaches {share:.0%} of it end to end "
            f"({r['ours_decode_tps'] / tps:.0%} over its decode steps, the prefill left out)"
        )
        need = TORCH_TARGETS.get(batch)
        if need is not None and ratio < need:
            line += f" (a {need:.1f}x target is above what the matmuls alone reach here)"
    print(line)
    # What the ceiling leaves out and a step must still read: the KV cache attention reads.
    cache = 2 * args.layers * batch * context * args.kv_heads * d * dtype.itemsize
    weights = sum(w.nbytes for w in jax.tree.leaves(layers)) + head.nbytes
    print(
        f"           beside its weights ({weights / 2**20:.0f} MiB), a step's attention reads "
        f"{cache / 2**20:.0f} MiB of KV cache at the mean context ({context} positions), "
        "which the ceiling leaves out"
    )
    need = CEILING_TARGETS.get(batch)
    if need is None:
        return share
    # Per layer: keys [batch, kv_heads, head_dim, context], values [batch, kv_heads, context,
    # head_dim], as the sampler's cache holds them (`KVCache`).
    caches = [
        (
            jnp.asarray(rng.standard_normal((batch, args.kv_heads, d, context)), dtype),
            jnp.asarray(rng.standard_normal((batch, args.kv_heads, context, d)), dtype),
        )
        for _ in range(args.layers)
    ]
    with_attention = step_time(caches)
    # The decode-step time at which `need` of the ceiling is reached end to end, the prefill
    # and first token (`ours_prefill`) included.
    step = (batch * args.new_tokens / (need * tps) - r["ours_prefill"]) / (args.new_tokens - 1)
    print(
        f"           with attention's two products over it: {with_attention * 1e3:.1f} ms per "
        f"step (+{(with_attention - best) * 1e3:.1f} ms) = {best / with_attention:.0%} of the "
        f"ceiling; ours reaches {r['ours_tps'] * with_attention / batch:.0%} of that end to end."
        f" {need:.0%} of the ceiling end to end needs decode steps of {step * 1e3:.1f} ms: "
        f"{(step - with_attention) * 1e3:.1f} ms per step for the rest (norms, rotary, softmax, "
        "cache writes, sampling, the gaps between kernels and reads past the mean context)"
    )
    return share


def decode_flops(args: argparse.Namespace, context: int) -> int:
    """FLOPs of one generated token at `context` attended positions (module docstring)."""
    n_layers, n_head = weight_counts(args)
    return 2 * (n_layers + n_head) + 4 * args.layers * context * args.heads * args.head_dim


def machine_peak_gflops(dtype: str) -> tuple[float, str]:
    """The fastest dense matmul rate this machine reaches: a large square matmul ([2048,
    2048] @ [2048, 2048], best of 5), by XLA and by NumPy's BLAS, whichever is faster."""
    import jax
    import jax.numpy as jnp

    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(dtype)
    square = jax.jit(lambda x: x @ x)
    on_device = jnp.asarray(a)
    square(on_device).block_until_ready()
    xla = min(timed(lambda: square(on_device).block_until_ready())[0] for _ in range(5))
    blas = min(timed(lambda: a @ a)[0] for _ in range(5)) if dtype == "float32" else np.inf
    best, source = min((xla, "XLA"), (blas, "NumPy BLAS"))
    return 2 * n**3 / best / 1e9, source


def report_peak_bound(args: argparse.Namespace) -> None:
    """The most any sampler could do on this machine: every FLOP of every generated token at
    the machine's peak matmul rate, and nothing else."""
    peak, source = machine_peak_gflops(args.dtype)
    flops = decode_flops(args, args.prompt_len + args.new_tokens // 2)
    tps = peak * 1e9 / flops
    print(
        f"peak bound: a [2048, 2048] matmul runs at {peak:.0f} GFLOP/s here ({source}); a "
        f"token is {flops / 1e6:.1f} MFLOP, so at most {tps:.0f} tok/s at any batch"
    )


def report_roofline(args: argparse.Namespace, results: dict, device_kind: str) -> None:
    """Batch-1 decode as a fraction of the weight-bandwidth ceiling (module docstring)."""
    import jax.numpy as jnp

    known = [(name, gbps) for name, gbps in HBM_GBPS.items() if name.lower() in device_kind.lower()]
    if args.hbm_gbps is not None:
        gbps, source = args.hbm_gbps, "--hbm-gbps"
    elif known:
        gbps, source = known[0][1], f"{known[0][0]} figure"
    else:
        print(f"no HBM bandwidth known for {device_kind!r}; pass --hbm-gbps")
        return
    itemsize = jnp.dtype(args.dtype).itemsize
    n_layers, n_head = weight_counts(args)
    weight_bytes = itemsize * (n_layers + n_head)
    max_len = args.max_len or args.prompt_len + args.new_tokens
    kv_bytes = 2 * args.layers * max_len * args.kv_heads * args.head_dim * itemsize
    ceiling = gbps * 1e9 / weight_bytes
    print(
        f"weights read per decode step {weight_bytes / 1e9:.3f} GB ({args.dtype}); "
        f"KV cache per row {kv_bytes / 1e6:.2f} MB at max_len {max_len}; "
        f"bandwidth {gbps:.0f} GB/s ({source})"
    )
    if 1 in results:
        tps = results[1]["ours_decode_tps"]
        print(
            f"batch 1 decode {tps:.1f} tok/s = {tps / ceiling:.1%} of the roofline "
            f"{ceiling:.1f} tok/s"
        )
    for batch, r in results.items():
        if batch != 1:
            print(f"batch {batch} tokens/s {r['ours_tps']:.1f} (decode {r['ours_decode_tps']:.1f})")


if __name__ == "__main__":
    main()
