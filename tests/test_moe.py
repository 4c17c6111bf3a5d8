"""Qwen3-MoE: parity with transformers, per-expert weight loading, expert LoRA in the trainer,
router load metrics, and an expert-sharded mesh equal to one device."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec
from safetensors.numpy import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from tests.engine_helpers import make_trainer, sft_datum
from tests.hf_models import TINY_CONFIGS
from tinker_jax.batching import RunBatch
from tinker_jax.checkpoints import export_peft
from tinker_jax.errors import ValidationError
from tinker_jax.lora import AdapterBatch, LoRASpec
from tinker_jax.models.config import config_from_hf
from tinker_jax.models.moe import LOAD_METRICS, MoE, expert_load, load_metrics
from tinker_jax.models.qwen3_moe import QWEN3_MOE
from tinker_jax.optim import AdamParams
from tinker_jax.sampler import Sampler, SampleRequest
from tinker_jax.sampling import SamplingParams
from tinker_jax.sharding import make_mesh
from tinker_jax.trainer import LoraConfig, SlotState
from tinker_jax.weights import SafetensorsIndex, load_model

VOCAB = 160
EXPERT_LEAVES = [
    f"layers.mlp.experts.{p}_proj.lora_{f}" for p in ("gate", "up", "down") for f in "ab"
]


def _hf_config(**overrides):
    return {**TINY_CONFIGS["qwen3_moe"], **overrides}


# ---------------------------------------------------------------- model and weights


def test_logits_match_transformers(hf_model_dir):
    folder = hf_model_dir("qwen3_moe")
    model, cfg = load_model(
        str(folder), lora=LoRASpec(2, 4), mesh=make_mesh(devices=jax.devices()[:1])
    )
    assert cfg.moe.num_experts == 8 and cfg.moe.experts_per_token == 3
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 40)).astype(np.int32)
    positions = np.broadcast_to(np.arange(40, dtype=np.int32), tokens.shape)
    adapter = AdapterBatch(jnp.zeros((2,), jnp.int32), jnp.zeros((2,), jnp.float32))
    ours = np.asarray(
        jax.jit(lambda t, p: model.logits(model(t, p, adapter), adapter))(tokens, positions)
    )
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    assert np.abs(ref).max() > 1e-2


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_routing_matches_transformers_router(norm_topk_prob):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    hf_cfg = AutoConfig.for_model(
        "qwen3_moe",
        **{k: v for k, v in _hf_config(norm_topk_prob=norm_topk_prob).items() if k != "model_type"},
    )
    torch.manual_seed(0)
    router = Qwen3MoeTopKRouter(hf_cfg)
    torch.nn.init.normal_(router.weight, std=0.2)
    x = torch.randn(50, hf_cfg.hidden_size)
    _, ref_weights, ref_experts = router(x)
    cfg = config_from_hf(_hf_config(norm_topk_prob=norm_topk_prob))
    moe = MoE(cfg, None, jnp.float32, nnx.Rngs(0))
    moe.router.kernel[...] = jnp.asarray(router.weight.detach().numpy().T)
    weights, experts = moe.route(jnp.asarray(x.numpy()))
    np.testing.assert_array_equal(np.asarray(experts), ref_experts.numpy())
    np.testing.assert_allclose(np.asarray(weights), ref_weights.detach().numpy(), rtol=1e-5)
    assert np.allclose(np.asarray(weights).sum(-1), 1.0) == norm_topk_prob


def test_each_device_reads_only_its_experts(hf_model_dir, monkeypatch):
    folder = hf_model_dir("qwen3_moe")
    reads: list[str] = []
    original = SafetensorsIndex.read

    def spy(self, key, index, transpose):
        reads.append(key)
        return original(self, key, index, transpose)

    monkeypatch.setattr(SafetensorsIndex, "read", spy)
    mesh = make_mesh({"expert": 2, "tensor": 2}, devices=jax.devices()[:4])
    model, cfg = load_model(str(folder), lora=LoRASpec(2, 4), mesh=mesh)
    kernel = model.blocks[0].mlp.experts.gate_proj.kernel[...]  # [experts, embed, mlp]
    assert kernel.sharding.spec == PartitionSpec("expert", None, "tensor")
    # 4 devices, each holding half the experts of both layers: 4 * (2 layers * 4 experts).
    gate_reads = [k for k in reads if k.endswith("gate_proj.weight")]
    assert len(gate_reads) == 4 * 2 * 4
    down = load_file(folder / "model.safetensors")["model.layers.1.mlp.experts.5.down_proj.weight"]
    np.testing.assert_array_equal(
        np.asarray(model.blocks[1].mlp.experts.down_proj.kernel[...])[5], down.T
    )
    lora_b = model.layers.mlp.experts.gate_proj.lora_b[...]  # [layers, slots, experts, r, mlp]
    assert lora_b.sharding.spec == PartitionSpec(None, None, "expert", None, "tensor")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(mlp_only_layers=[1]), "config.mlp_only_layers"),
        (dict(decoder_sparse_step=2), "config.mlp_only_layers"),
        (dict(num_experts_per_tok=9), "config.num_experts_per_tok"),
        (dict(use_sliding_window=True), "config.use_sliding_window"),
    ],
)
def test_heterogeneous_or_unsupported_configs_are_refused(overrides, field):
    with pytest.raises(ValidationError) as e:
        config_from_hf(_hf_config(**overrides))
    assert e.value.field == field
    missing = {k: v for k, v in _hf_config().items() if k != "num_experts"}
    with pytest.raises(ValidationError, match="num_experts"):
        config_from_hf(missing)


# ---------------------------------------------------------------- router metrics


def test_load_metrics_by_hand():
    experts = jnp.asarray([[[[0, 1], [0, 2], [0, 1], [3, 3]]]])  # [layers 1, batch 1, seq 4, k 2]
    mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])  # the last token is padding
    load = np.asarray(expert_load(experts, mask, 4))
    np.testing.assert_array_equal(load, [[[3, 2, 1, 0]]])
    m = load_metrics(load[:, 0])  # ideal load 6 / 4 = 1.5
    assert m == pytest.approx(
        {
            "e_frac_with_tokens:mean": 0.75,
            "e_frac_oversubscribed:mean": 0.5,
            "e_max_violation:mean": 1.0,
            "e_max_violation:max": 1.0,
            "e_min_violation:mean": -1.0,
        }
    )


# ---------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def trainer(hf_model_dir):
    return make_trainer(hf_model_dir("qwen3_moe"), slots=3, max_rank=4)


@pytest.fixture
def fresh(trainer):
    yield trainer
    for slot in list(trainer.slots):
        trainer.free_slot(slot)


def _logits(trainer, tokens, slot, scale):
    model = nnx.merge(trainer.graphdef, trainer.lora, trainer.base)

    @jax.jit
    def run(tokens):
        n = tokens.shape[0]
        adapter = AdapterBatch(jnp.full((n,), slot, jnp.int32), jnp.full((n,), scale))
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model.logits(model(tokens, positions, adapter), adapter)

    return np.asarray(run(tokens))


def test_expert_adapters_init_and_fresh_adapter_is_the_base_model(fresh):
    slot = fresh.create_slot(LoraConfig(rank=3, seed=3))
    arrays = fresh.slot_arrays(slot)
    layers, experts, mlp, embed = 2, 8, 32, 64
    shapes = {
        "layers.mlp.experts.gate_proj.lora_a": (layers, embed, 4),  # shared by the experts
        "layers.mlp.experts.gate_proj.lora_b": (layers, experts, 4, mlp),
        "layers.mlp.experts.down_proj.lora_a": (layers, experts, mlp, 4),
        "layers.mlp.experts.down_proj.lora_b": (layers, 4, embed),  # shared by the experts
    }
    for name, shape in shapes.items():
        assert arrays[name].shape == shape, name
    for name in ("layers.mlp.experts.gate_proj.lora_a", "layers.mlp.experts.down_proj.lora_a"):
        a = arrays[name]
        assert np.abs(a).max() <= 1 / np.sqrt(a.shape[-2]) and np.abs(a[..., :3]).min() > 0
        assert not a[..., 3:].any()  # padded rank
    tokens = np.random.default_rng(0).integers(0, VOCAB, (2, 24)).astype(np.int32)
    base = _logits(fresh, tokens, slot, 0.0)
    assert np.array_equal(_logits(fresh, tokens, slot, fresh.slots[slot].scale), base)


def _data(rng, lengths=(20, 13, 25)):
    """Datums that all tests batch into one shape ([4, 32]): one compiled step for the file."""
    return [sft_datum(rng, n, VOCAB) for n in lengths]


def _train(trainer, slot, datums, steps):
    outs = []
    for _ in range(steps):
        outs.append(trainer.forward_backward([RunBatch(slot, datums)], "cross_entropy")[0])
        trainer.optim_step(slot, AdamParams(learning_rate=2e-2))
    return outs


def test_training_moves_expert_adapters_and_reduces_loss(fresh):
    rng = np.random.default_rng(1)
    data = _data(rng)
    slot = fresh.create_slot(LoraConfig(rank=3, seed=1, train_attn=False, train_unembed=False))
    before = fresh.slot_arrays(slot)
    outs = _train(fresh, slot, data, steps=4)
    losses = [o.metrics["loss:sum"] for o in outs]
    assert losses[-1] < losses[0]
    after = fresh.slot_arrays(slot)
    for name in EXPERT_LEAVES:
        assert not np.array_equal(after[name], before[name]), name
        rank_axis = -1 if name.endswith("lora_a") else -2
        assert not np.take(after[name], range(3, 4), axis=rank_axis).any(), name
    for name in after:  # attention and lm head adapters are off: never moved
        if ".experts." not in name:
            assert np.array_equal(after[name], before[name]), name
    # Only experts that were routed tokens get gradient in their own factors.
    moved = np.abs(after["layers.mlp.experts.up_proj.lora_b"]).sum(axis=(-1, -2)) > 0
    assert moved.any() and moved.shape == (2, 8)


def test_expert_adapters_off_with_train_mlp_false(fresh):
    rng = np.random.default_rng(2)
    slot = fresh.create_slot(LoraConfig(rank=2, seed=2, train_mlp=False))
    _train(fresh, slot, _data(rng), steps=2)
    arrays = fresh.slot_arrays(slot)
    for name in EXPERT_LEAVES:
        assert not arrays[name].any(), name
    assert arrays["layers.self_attn.q_proj.lora_b"].any()


def test_router_metrics_are_per_run_and_in_range(fresh):
    rng = np.random.default_rng(3)
    s0 = fresh.create_slot(LoraConfig(rank=4, seed=0))
    s1 = fresh.create_slot(LoraConfig(rank=2, seed=1))
    d0, d1 = _data(rng, (18, 27)), _data(rng, (29,))
    mixed = fresh.forward_backward([RunBatch(s0, d0), RunBatch(s1, d1)], "cross_entropy")
    for out, (slot, data) in zip(mixed, ((s0, d0), (s1, d1))):
        m = out.metrics
        assert set(LOAD_METRICS) <= set(m)
        assert 0 < m["e_frac_with_tokens:mean"] <= 1
        assert 0 < m["e_frac_oversubscribed:mean"] < 1
        assert 0 < m["e_max_violation:mean"] <= m["e_max_violation:max"] <= 8 / 3 - 1
        assert -1 <= m["e_min_violation:mean"] < 0
        # Counts of this run's tokens only: the same as when the run is alone in a batch.
        alone = fresh.forward([RunBatch(slot, data)], "cross_entropy")[0].metrics
        for name in LOAD_METRICS:
            assert m[name] == pytest.approx(alone[name], abs=1e-12), name


def test_export_import_round_trip_and_peft_export_refused(fresh, tmp_path):
    rng = np.random.default_rng(4)
    slot = fresh.create_slot(LoraConfig(rank=3, seed=4))
    _train(fresh, slot, _data(rng), steps=1)
    data = _data(rng, (30,))
    state = fresh.export_slot(slot)
    copy = fresh.import_slot(state, with_optimizer=True)
    for which in ("lora", "mu", "nu"):
        a, b = fresh.slot_arrays(slot, which), fresh.slot_arrays(copy, which)
        assert all(np.array_equal(a[n], b[n]) for n in a)
    r0 = fresh.forward([RunBatch(slot, data)], "cross_entropy")[0]
    r1 = fresh.forward([RunBatch(copy, data)], "cross_entropy")[0]
    np.testing.assert_array_equal(r0.logprobs[0], r1.logprobs[0])
    with pytest.raises(ValidationError, match="MoE expert"):
        export_peft(
            tmp_path / "peft",
            SlotState(state.lora, state.adapter),
            base_model="m",
            lora_alpha=32.0,
            hf_keys=QWEN3_MOE.hf_keys,
        )


def test_greedy_sampling_equals_transformers_generate(hf_model_dir, trainer):
    folder = hf_model_dir("qwen3_moe")
    model = nnx.merge(trainer.graphdef, trainer.lora, trainer.base)
    sampler = Sampler.sharing_base(
        model, trainer.mesh, slots=2, rows=2, max_len=64, steps_per_call=4
    )
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    prompts = [np.random.default_rng(5).integers(0, VOCAB, n) for n in (6, 17)]
    params = SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    results = sampler.sample([SampleRequest(p, 1, params) for p in prompts])
    for prompt, result in zip(prompts, results):
        ids = torch.from_numpy(prompt[None]).long()
        # An explicit mask: generate() would otherwise mask prompt tokens equal to pad_token_id.
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert result.sequences[0].tokens == ref[0, len(prompt) :].tolist()


# ---------------------------------------------------------------- mesh


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (CPU) devices")
def test_expert_sharded_mesh_matches_single_device(hf_model_dir, trainer):
    sharded = make_trainer(
        hf_model_dir("qwen3_moe"),
        slots=3,
        max_rank=4,
        devices=jax.devices()[:8],
        mesh_shape={"fsdp": 2, "expert": 2, "tensor": 2},
    )
    kernel = sharded.base["blocks"][0]["mlp"]["experts"]["down_proj"]["kernel"][...]
    assert kernel.sharding.spec == PartitionSpec("expert", "tensor", "fsdp")
    assert sharded.batch_multiple == 4  # fsdp x expert split the batch

    def run(t):
        slot = t.create_slot(LoraConfig(rank=4, seed=2))
        rng = np.random.default_rng(0)
        datums = _data(rng, (30, 17, 22))
        first = t.forward_backward([RunBatch(slot, datums)], "cross_entropy")[0]
        grads = t.slot_arrays(slot, "grads")
        t.optim_step(slot, AdamParams(learning_rate=1e-2))
        second = t.forward_backward([RunBatch(slot, datums)], "cross_entropy")[0]
        t.free_slot(slot)
        return first, second, grads

    (s1, s2, sg), (r1, r2, rg) = run(sharded), run(trainer)
    for a, b in ((s1, r1), (s2, r2)):
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
        for name in LOAD_METRICS:
            assert a.metrics[name] == pytest.approx(b.metrics[name], abs=1e-9), name
        for x, y in zip(a.logprobs, b.logprobs):
            np.testing.assert_allclose(x, y, atol=1e-5)
    for name in sg:
        np.testing.assert_allclose(sg[name], rg[name], atol=1e-5, err_msg=name)
