"""Training parity with PEFT: the same initial adapter, 5 AdamW steps of cross_entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from tests.engine_helpers import make_trainer, sft_datum
from tinker_jax.batching import RunBatch
from tinker_jax.optim import AdamParams
from tinker_jax.trainer import LoraConfig

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
RANK, MAX_RANK, ALPHA, STEPS = 4, 8, 32.0, 5
ADAM = AdamParams(learning_rate=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.01)


def _peft_module(peft_model, name: str, layer: int | None):
    base = peft_model.base_model.model
    if name.startswith("lm_head"):
        return base.lm_head
    _, block, proj, _ = name.split(".")
    return getattr(getattr(base.model.layers[layer], block), proj)


def _copy_adapter_into_peft(peft_model, arrays: dict[str, np.ndarray]) -> None:
    with torch.no_grad():
        for name, value in arrays.items():
            attr = "lora_A" if name.endswith("lora_a") else "lora_B"
            per_layer = [(None, value)] if name.startswith("lm_head") else enumerate(value)
            for layer, v in per_layer:
                v = v[:, :RANK] if attr == "lora_A" else v[:RANK]
                getattr(_peft_module(peft_model, name, layer), attr)["default"].weight.copy_(
                    torch.from_numpy(np.ascontiguousarray(v.T))
                )


@pytest.mark.parametrize("name", ["qwen3", "llama_untied"])
def test_five_adamw_steps_match_peft(hf_model_dir, name):
    folder = hf_model_dir(name)
    trainer = make_trainer(folder, slots=2, max_rank=MAX_RANK, lora_alpha=ALPHA)
    slot = trainer.create_slot(LoraConfig(rank=RANK, seed=11))
    rng = np.random.default_rng(0)
    datums = [sft_datum(rng, 24, 160), sft_datum(rng, 17, 160)]

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_model = get_peft_model(
        model, PeftLoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    )
    _copy_adapter_into_peft(peft_model, trainer.slot_arrays(slot))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=ADAM.learning_rate,
        betas=(ADAM.beta1, ADAM.beta2),
        eps=ADAM.eps,
        weight_decay=ADAM.weight_decay,
    )

    def torch_loss():
        total = 0.0
        for d in datums:
            logits = peft_model(torch.from_numpy(d.tokens[None]).long()).logits[0]
            logp = torch.log_softmax(logits, -1)
            target = torch.from_numpy(d.loss_fn_inputs["target_tokens"]).long()
            picked = logp.gather(-1, target[:, None])[:, 0]
            total = total - (picked * torch.from_numpy(d.loss_fn_inputs["weights"])).sum()
        return total

    for step in range(STEPS):
        ours = trainer.forward_backward([RunBatch(slot, datums)], "cross_entropy")[0]
        trainer.optim_step(slot, ADAM)
        opt.zero_grad()
        ref = torch_loss()
        ref.backward()
        opt.step()
        assert ours.metrics["loss:sum"] == pytest.approx(ref.item(), rel=1e-4), step

    for key, ours in trainer.slot_arrays(slot).items():
        attr = "lora_A" if key.endswith("lora_a") else "lora_B"
        per_layer = [(None, ours)] if key.startswith("lm_head") else enumerate(ours)
        for layer, v in per_layer:
            v = v[:, :RANK] if attr == "lora_A" else v[:RANK]
            ref = getattr(_peft_module(peft_model, key, layer), attr)["default"].weight
            np.testing.assert_allclose(
                v.T, ref.detach().numpy(), atol=1e-4, err_msg=f"{key} layer {layer}"
            )
    assert np.abs(trainer.slot_arrays(slot)["lm_head.head.lora_b"]).max() > 1e-4
