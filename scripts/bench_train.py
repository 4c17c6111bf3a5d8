"""LoRA training throughput: our engine against torch + PEFT on the same model and batch.

Both sides load one random HF folder and train rank-`r` LoRA on every target (q, k, v, o,
gate, up, down, lm_head) with AdamW on summed token cross-entropy. One step is
forward_backward + optim_step; warm-up steps (compilation, for us) are not timed.

    python scripts/bench_train.py                      # CPU defaults, prints `ratio ours/torch`
    python scripts/bench_train.py --preset qwen3-1.7b --no-torch   # on an accelerator
    python scripts/bench_train.py --preset qwen3-30b-a3b --no-torch --batch 4 --seq 2048
                                        # the MoE shape (ours only: PEFT cannot target the
                                        # fused expert weights of transformers' Qwen3-MoE)

FLOP convention (MaxText-style, per trained token, used for MFU on GPU/TPU):

    model_flops = 6 * (N_base + N_lora) + 6 * L * S * H * D

N_base counts every matmul weight a token goes through (attention and MLP projections of all
layers, in a MoE model the experts_per_token experts it is routed to, and the lm head; not
the embedding lookup or the router); N_lora the adapter weights on those matrices; the
second term is causal attention (QK^T and PV, halved for the causal mask) with L layers, S
the sequence length and H * D the query width. "6" is 2 (forward) + 4 (backward: gradients
of inputs and weights). LoRA needs no gradient of the frozen weights, so the work actually
done is about 4 * N_base + 6 * N_lora + attention, roughly 2/3 of model_flops; MFU reports
model_flops, and "LoRA MFU" the 4 * N_base count. fp32 peaks are the TF32 tensor-core peaks
(XLA's default precision on GPU), bf16 the dense bf16 peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_models import active_shapes, add_model_args, ensure_model, parse_with_preset

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]

# Dense peak FLOP/s per chip: (bf16, fp32 as TF32). Matched against `device_kind`.
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "TPU v4": (275e12, 275e12),
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5e": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v6": (918e12, 918e12),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(p)
    p.add_argument("--seq", type=int, default=512, help="model_input length of every datum")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per side")
    p.add_argument("--remat", choices=["none", "dots", "full"], default="none")
    p.add_argument(
        "--attention",
        choices=["auto", "einsum", "chunked", "xla", "cudnn"],
        default="auto",
        help="our self-attention kernel (auto: what `tinker-jax serve` picks here)",
    )
    p.add_argument("--logprob-chunk", type=int, default=None, help="Trainer logprob_chunk")
    p.add_argument("--no-torch", action="store_true", help="time only our engine")
    p.add_argument(
        "--torch-device", default="cpu", help="where torch+PEFT runs (cpu, or cuda on a GPU)"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="override the chip peak")
    return parse_with_preset(p)


def flops_per_token(args: argparse.Namespace) -> tuple[float, float]:
    """(model_flops, lora_flops) per trained token; see the module docstring."""
    shapes = active_shapes(args)
    n_base = args.layers * sum(o * i for o, i in shapes) + args.hidden * args.vocab
    n_lora = args.layers * sum(args.rank * (i + o) for o, i in shapes) + args.rank * (
        args.hidden + args.vocab
    )
    attention = 6 * args.layers * args.seq * args.heads * args.head_dim
    return 6 * (n_base + n_lora) + attention, 4 * n_base + 6 * n_lora + attention


def make_tokens(args: argparse.Namespace) -> np.ndarray:
    """[batch, seq + 1] random token ids: inputs are [:, :-1], targets [:, 1:]."""
    return np.random.default_rng(1).integers(0, args.vocab, (args.batch, args.seq + 1))


class Side:
    """One side of the comparison: a `step()` returning the summed loss, and its timings."""

    def __init__(self, name: str, step):
        self.name, self.step = name, step
        self.losses: list[float] = []
        self.times: list[float] = []
        self.cores: list[float] = []  # process CPU seconds per wall second, per timed step

    def run(self, timed: bool) -> None:
        cpu0, start = os.times(), time.perf_counter()
        self.losses.append(self.step())
        wall = time.perf_counter() - start
        cpu1 = os.times()
        if timed:
            self.times.append(wall)
            self.cores.append((cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall)

    def tokens_per_s(self, tokens_per_step: int) -> tuple[float, float]:
        """(best step, mean over steps)."""
        return tokens_per_step / min(self.times), tokens_per_step * len(self.times) / sum(
            self.times
        )


def ours_step(folder: Path, args: argparse.Namespace, tokens: np.ndarray):
    import jax.numpy as jnp

    from tinker_jax.batching import Datum, RunBatch
    from tinker_jax.lora import LoRASpec
    from tinker_jax.models.decoder import auto_attention_kernel
    from tinker_jax.optim import AdamParams
    from tinker_jax.sharding import make_mesh
    from tinker_jax.trainer import LoraConfig, Trainer
    from tinker_jax.weights import load_model

    mesh = make_mesh()
    model, _ = load_model(
        str(folder),
        lora=LoRASpec(slots=2, max_rank=args.rank),
        mesh=mesh,
        dtype=jnp.dtype(args.dtype),
        remat=args.remat,
        attention=(
            auto_attention_kernel(jnp.dtype(args.dtype))
            if args.attention == "auto"
            else args.attention
        ),
    )
    kwargs = {} if args.logprob_chunk is None else {"logprob_chunk": args.logprob_chunk}
    trainer = Trainer(model, mesh, **kwargs)
    slot = trainer.create_slot(LoraConfig(rank=args.rank, seed=0))
    weights = np.ones(args.seq, np.float32)
    datums = [Datum(row[:-1], {"target_tokens": row[1:], "weights": weights}) for row in tokens]
    adam = AdamParams(learning_rate=1e-4)

    def step() -> float:
        (out,) = trainer.forward_backward([RunBatch(slot, datums)], "cross_entropy")
        trainer.optim_step(slot, adam)
        return out.metrics["loss:sum"]

    return step


def torch_step(folder: Path, args: argparse.Namespace, tokens: np.ndarray):
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    device = torch.device(args.torch_device)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    config = peft.LoraConfig(r=args.rank, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0)
    model = peft.get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)
    batch = torch.from_numpy(tokens).to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step() -> float:
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device

    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else str(device)
    return step, where


def peak_flops(device_kind: str, dtype: str) -> float | None:
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if name.lower() in device_kind.lower():
            return bf16 if dtype == "bfloat16" else fp32
    return None


def report_device(args: argparse.Namespace, tokens_per_s: float) -> None:
    """MFU and peak memory on an accelerator (see the FLOP convention in the docstring)."""
    import jax

    if jax.default_backend() not in ("gpu", "tpu"):
        return
    devices = jax.devices()
    model_flops, lora_flops = flops_per_token(args)
    peak = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else peak_flops(devices[0].device_kind, args.dtype)
    )
    per_chip = tokens_per_s / len(devices)
    if peak:
        print(
            f"MFU {100 * model_flops * per_chip / peak:.1f}% "
            f"(LoRA MFU {100 * lora_flops * per_chip / peak:.1f}%) "
            f"of {peak / 1e12:.0f} TFLOP/s {args.dtype} per chip"
        )
    else:
        print(f"no peak FLOP/s known for {devices[0].device_kind!r}; pass --peak-tflops")
    peak_bytes = (devices[0].memory_stats() or {}).get("peak_bytes_in_use")
    if peak_bytes:
        print(f"peak device memory {peak_bytes / 2**30:.2f} GiB")


def main() -> None:
    args = parse_args()
    tokens_per_step = args.batch * args.seq
    print("config:", json.dumps({k: v for k, v in vars(args).items() if v is not None}))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model_dir or tmp)
        ensure_model(folder, args, args.seq, fast=args.no_torch or args.preset is not None)
        tokens = make_tokens(args)

        import jax

        device = jax.devices()[0]
        sides = [
            Side(
                f"ours ({jax.default_backend()}: {device.device_kind} x{len(jax.devices())})",
                ours_step(folder, args, tokens),
            )
        ]
        if not args.no_torch:
            step, where = torch_step(folder, args, tokens)
            sides.append(Side(f"torch+peft ({where})", step))
        for side in sides:
            for _ in range(args.warmup):
                side.run(timed=False)
        # Interleaved, so that load from other processes falls on both sides alike.
        for i in range(args.steps):
            for side in sides if i % 2 == 0 else sides[::-1]:
                side.run(timed=True)

        for side in sides:
            best, mean = side.tokens_per_s(tokens_per_step)
            print(
                f"{side.name}: {best:9.1f} tokens/s best step, {mean:9.1f} mean  "
                f"(steps {' '.join(f'{t:.2f}' for t in side.times)} s; "
                f"CPU cores busy {min(side.cores):.2f}-{max(side.cores):.2f}; "
                f"first loss/token {side.losses[0] / tokens_per_step:.4f})"
            )
        report_device(args, sides[0].tokens_per_s(tokens_per_step)[1])
        if len(sides) == 2:
            ours, theirs = (side.tokens_per_s(tokens_per_step) for side in sides)
            print(
                f"ratio ours/torch = {ours[0] / theirs[0]:.2f}x "
                f"(best steps; {ours[1] / theirs[1]:.2f}x on means)"
            )
            if jax.default_backend() == "cpu":
                busy = min(min(side.cores) for side in sides)
                if busy < 0.85 * (os.cpu_count() or 1):
                    print(
                        f"note: a step got only {busy:.2f} of {os.cpu_count()} cores: other "
                        "processes were running; the best-step ratio is the robust one"
                    )


if __name__ == "__main__":
    main()
