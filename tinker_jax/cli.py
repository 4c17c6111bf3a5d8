"""The `tinker-jax` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    """Engine-level demo on the built-in tiny model: a short LoRA SFT run, loss falling."""
    import tempfile

    import numpy as np
    from transformers import AutoTokenizer

    from tinker_jax.batching import Datum, RunBatch
    from tinker_jax.lora import LoRASpec
    from tinker_jax.optim import AdamParams
    from tinker_jax.sharding import make_mesh
    from tinker_jax.tiny_model import write_tiny_model
    from tinker_jax.trainer import LoraConfig, Trainer
    from tinker_jax.weights import load_model

    folder = write_tiny_model(tempfile.mkdtemp(prefix="tinker-jax-tiny-"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    mesh = make_mesh()
    model, _ = load_model(str(folder), lora=LoRASpec(slots=2, max_rank=8), mesh=mesh)
    trainer = Trainer(model, mesh)
    slot = trainer.create_slot(LoraConfig(rank=8, seed=0))
    texts = [
        "The quick brown fox jumps over the lazy dog.",
        "tinker-jax trains LoRA adapters with JAX.",
    ]
    datums = []
    for text in texts:
        ids = np.asarray(tokenizer.encode(text) + [tokenizer.eos_token_id])
        datums.append(
            Datum(
                ids[:-1], {"target_tokens": ids[1:], "weights": np.ones(len(ids) - 1, np.float32)}
            )
        )
    tokens = sum(d.tokens.size for d in datums)
    first = last = None
    for step in range(args.steps):
        out = trainer.forward_backward([RunBatch(slot, datums)], "cross_entropy")[0]
        trainer.optim_step(slot, AdamParams(learning_rate=args.learning_rate))
        nll = out.metrics["loss:sum"] / tokens
        first = nll if first is None else first
        last = nll
        bar = "#" * int(30 * (step + 1) / args.steps)
        print(
            f"\rstep {step + 1:3d}/{args.steps} [{bar:<30}] loss/token {nll:.4f}",
            end="",
            flush=True,
        )
    print(f"\nloss/token fell from {first:.4f} to {last:.4f}")
    return 0 if last < first else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinker-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a LoRA on the built-in tiny model")
    demo.add_argument("--steps", type=int, default=20)
    demo.add_argument("--learning-rate", type=float, default=1e-2)
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
