"""`tinker-jax demo`: a server on the built-in tiny model and a short session against it over
the real gRPC API: LoRA SFT with the loss falling, a save, sampling from the saved weights."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "tinker-jax trains LoRA adapters with JAX.",
]


def run_demo(steps: int = 20, learning_rate: float = 1e-2) -> int:
    """Returns 0 when the loss fell, 1 otherwise."""
    from tinker_jax import ServiceClient
    from tinker_jax import types as T
    from tinker_jax.service.config import ServerConfig
    from tinker_jax.service.server import Server
    from tinker_jax.tiny_model import write_tiny_model

    work = Path(tempfile.mkdtemp(prefix="tinker-jax-demo-"))
    model_dir = write_tiny_model(work / "tiny-qwen3")
    config = ServerConfig.from_dict(
        {
            "base_models": [str(model_dir)],
            "storage": work / "storage",
            "port": 0,
            "max_adapters": 4,
            "max_lora_rank": 8,
            "sampler_slots": 4,
            "sampler_rows": 8,
            "max_seq_len": 256,
            "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        }
    )
    server = Server(config)
    _, api_key = server.store.create_user("demo")
    try:
        client = ServiceClient(base_url=f"127.0.0.1:{server.port}", api_key=api_key)
        training = client.create_lora_training_client(str(model_dir), rank=8, seed=0)
        tokenizer = training.get_tokenizer()
        data = []
        for text in TEXTS:
            ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
            data.append(
                T.Datum(
                    model_input=T.ModelInput.from_ints(ids[:-1]),
                    loss_fn_inputs={"target_tokens": ids[1:], "weights": [1.0] * (len(ids) - 1)},
                )
            )
        tokens = sum(d.model_input.length for d in data)
        losses = []
        for step in range(steps):
            fwd = training.forward_backward(data, "cross_entropy")
            opt = training.optim_step(T.AdamParams(learning_rate=learning_rate))
            losses.append(fwd.result().metrics["loss:sum"] / tokens)
            opt.result()
            bar = "#" * int(30 * (step + 1) / steps)
            print(
                f"\rstep {step + 1:3d}/{steps} [{bar:<30}] loss/token {losses[-1]:.4f}",
                end="",
                flush=True,
            )
        print(f"\nloss/token fell from {losses[0]:.4f} to {losses[-1]:.4f}")
        path = training.save_weights_for_sampler("demo").result().path
        print(f"saved {path}")
        sampler = client.create_sampling_client(model_path=path)
        prompt = tokenizer.encode("The quick")
        result = sampler.sample(
            T.ModelInput.from_ints(prompt),
            num_samples=1,
            sampling_params=T.SamplingParams(max_tokens=40, temperature=0.0),
        ).result()
        print("sample:", repr(tokenizer.decode(prompt + list(result.sequences[0].tokens))))
        client.close()
    finally:
        server.stop()
    return 0 if losses[-1] < losses[0] else 1


if __name__ == "__main__":
    sys.exit(run_demo())
