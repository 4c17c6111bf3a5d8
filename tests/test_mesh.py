"""Sharded execution: a data x fsdp x tensor = 2x2x2 mesh of CPU devices gives the losses and
gradients of a single device."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from tests.engine_helpers import make_trainer, sft_datum
from tinker_jax.batching import RunBatch
from tinker_jax.optim import AdamParams
from tinker_jax.sharding import logical_to_spec, make_mesh
from tinker_jax.trainer import LoraConfig

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (CPU) devices")


def _run(trainer):
    slot = trainer.create_slot(LoraConfig(rank=4, seed=2))
    rng = np.random.default_rng(0)
    datums = [sft_datum(rng, n, 160) for n in (30, 17, 22)]
    first = trainer.forward_backward([RunBatch(slot, datums)], "cross_entropy")[0]
    trainer.optim_step(slot, AdamParams(learning_rate=1e-2))
    second = trainer.forward_backward([RunBatch(slot, datums)], "cross_entropy")[0]
    return first, second, trainer.slot_arrays(slot, "grads")


@pytest.mark.slow  # eight-device programs (~10 s): in CI's `-m slow` step
def test_2x2x2_mesh_matches_single_device(hf_model_dir):
    folder = hf_model_dir("qwen3")
    sharded = make_trainer(
        folder,
        slots=2,
        max_rank=4,
        devices=jax.devices()[:8],
        mesh_shape={"data": 2, "fsdp": 2, "tensor": 2},
    )
    q = sharded.base["blocks"][0]["self_attn"]["q_proj"]["kernel"][...]
    assert q.sharding.spec == PartitionSpec("fsdp", "tensor")
    single = make_trainer(folder, slots=2, max_rank=4)
    (s1, s2, sg), (r1, r2, rg) = _run(sharded), _run(single)
    for a, b in ((s1, r1), (s2, r2)):
        assert a.metrics["loss:sum"] == pytest.approx(b.metrics["loss:sum"], rel=1e-5)
        for x, y in zip(a.logprobs, b.logprobs):
            np.testing.assert_allclose(x, y, atol=1e-5)
    for name in sg:
        np.testing.assert_allclose(sg[name], rg[name], atol=1e-5, err_msg=name)


def test_rules_map_logical_names_and_skip_uneven_dims():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=jax.devices()[:8])
    assert logical_to_spec(("embed", "heads"), (64, 96), mesh) == PartitionSpec("fsdp", "tensor")
    assert logical_to_spec(("embed", "heads"), (64, 3), mesh) == PartitionSpec("fsdp", None)
    assert logical_to_spec(("act_batch", None), (4, 7), mesh) == PartitionSpec(
        ("data", "fsdp"), None
    )
    with pytest.raises(ValueError, match="at most one axis"):
        make_mesh({"data": -1, "fsdp": -1})
