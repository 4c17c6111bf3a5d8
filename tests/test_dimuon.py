"""Dimuon (Muon on each LoRA factor): the update against a NumPy reference, isolation from an
AdamW run in the next slot, checkpoint round trips, family checks, padding, and training."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.engine_helpers import make_trainer, sft_datum
from tinker_jax.batching import RunBatch
from tinker_jax.checkpoints import INFO_FILE, load_state, read_info, save_state
from tinker_jax.errors import ValidationError
from tinker_jax.optim import NS_COEFFS, AdamParams, DimuonParams, dimuon_step
from tinker_jax.trainer import LoraConfig, NonFiniteStep

VOCAB, MAX_RANK = 160, 8
ADAM = AdamParams(learning_rate=1e-2)
DIMUON = DimuonParams(learning_rate=1e-2)


@pytest.fixture(scope="module")
def trainer(hf_model_dir):
    return make_trainer(hf_model_dir("qwen3"), slots=4, max_rank=MAX_RANK)


@pytest.fixture
def fresh(trainer):
    """Frees every slot after a test so each test starts from an empty trainer."""
    yield trainer
    for slot in list(trainer.slots):
        trainer.free_slot(slot)


def _data(seed: int, lengths=(16, 12)) -> list:
    rng = np.random.default_rng(seed)
    return [sft_datum(rng, n, VOCAB) for n in lengths]


def _state(trainer, slot: int) -> dict:
    state = {w: trainer.slot_arrays(slot, w) for w in ("lora", "mu", "nu", "grads")}
    state["count"] = int(trainer.counts[slot])
    return state


def _assert_same(got: dict, want: dict) -> None:
    """Bitwise equal slot states."""
    assert got["count"] == want["count"]
    for which in ("lora", "mu", "nu", "grads"):
        for name, value in want[which].items():
            np.testing.assert_array_equal(got[which][name], value, err_msg=f"{which} {name}")


# ------------------------------------------------------------------ the NumPy reference


def _newton_schulz(x: np.ndarray) -> np.ndarray:
    """Muon's quintic iteration in float64 on one matrix [m, n]."""
    a, b, c = NS_COEFFS
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(5):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x


def _rank_axis(name: str, ndim: int) -> int:
    return ndim - 1 if name.endswith("lora_a") else ndim - 2


def _cut(name: str, x: np.ndarray, rank: int) -> np.ndarray:
    return np.take(x, range(rank), axis=_rank_axis(name, x.ndim)).astype(np.float64)


def _reference(lora, grads, mu, step, params: DimuonParams, rank: int):
    """Dimuon's documented update on each factor cut to the run's rank (no padding, no
    optax): returns the new (lora, mu) at that rank."""
    lr, b1, clip = params.learning_rate, params.beta1, params.grad_clip_norm
    g = {n: _cut(n, x, rank) for n, x in grads.items()}
    norm = np.sqrt(sum((x**2).sum() for x in g.values()))
    if clip > 0 and norm > clip:
        g = {n: x * clip / norm for n, x in g.items()}
    new_lora, new_mu = {}, {}
    for name, p in lora.items():
        p = _cut(name, p, rank)
        m = b1 * _cut(name, mu[name], rank) + (1 - b1) * g[name]
        u = b1 * m / (1 - b1 ** (step + 1)) + (1 - b1) * g[name] / (1 - b1**step)
        ortho = np.stack([_newton_schulz(x) for x in u.reshape(-1, *u.shape[-2:])])
        model_dim = p.shape[-2] if name.endswith("lora_a") else p.shape[-1]
        scale = 0.2 * np.sqrt(max(model_dim, rank))
        new_lora[name] = p - lr * scale * ortho.reshape(p.shape)
        new_mu[name] = m
    return new_lora, new_mu


def test_update_matches_numpy_reference(fresh):
    rank = 4
    slot = fresh.create_slot(LoraConfig(rank=rank, seed=3), optimizer="dimuon")
    steps = [
        DimuonParams(learning_rate=2e-2, beta1=0.9),
        DimuonParams(learning_rate=1e-2, beta1=0.8, grad_clip_norm=1e-3),  # clips
        DimuonParams(learning_rate=1e-2, beta1=0.0),  # no momentum: orthogonalised gradient
    ]
    for step, params in enumerate(steps, start=1):
        fresh.forward_backward([RunBatch(slot, _data(step))], "cross_entropy")
        before = _state(fresh, slot)
        metrics = fresh.optim_step(slot, params)
        after = _state(fresh, slot)
        want_lora, want_mu = _reference(
            before["lora"], before["grads"], before["mu"], step, params, rank
        )
        assert after["count"] == step and fresh.slots[slot].step == step
        norm = np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in before["grads"].values()))
        assert metrics["grad_norm:mean"] == pytest.approx(norm, rel=1e-5)
        for name, want in want_lora.items():
            got = _cut(name, after["lora"][name], rank)
            delta = want - _cut(name, before["lora"][name], rank)
            # float32 Newton-Schulz against float64: the error (about 1e-6 of the step) is a
            # small part of the step.
            tol = 1e-4 * np.abs(delta).max() + 1e-7
            np.testing.assert_allclose(got, want, rtol=0, atol=tol, err_msg=name)
            got_mu = _cut(name, after["mu"][name], rank)
            np.testing.assert_allclose(got_mu, want_mu[name], rtol=1e-5, atol=1e-9, err_msg=name)
        assert not any(g.any() for g in after["grads"].values())  # the step consumed them
        # The first step moves only B (A's gradient is zero while B is); later ones both.
        for name in ("layers.self_attn.q_proj.lora_a", "layers.self_attn.q_proj.lora_b"):
            moved = not np.array_equal(after["lora"][name], before["lora"][name])
            assert moved == (step > 1 or name.endswith("lora_b")), (step, name)


def test_each_matrix_of_a_stacked_factor_is_orthogonalised_on_its_own():
    """Leaves with layer and expert axes (MoE's per-expert factors): every matrix is its own
    Muon problem, its update's singular values near 1 (the quintic's [0.7, 1.2] band)."""
    rng = np.random.default_rng(0)
    rank, layers, experts, d_in, d_out = 3, 2, 3, 10, 12
    a = np.zeros((layers, experts, d_in, MAX_RANK), np.float32)
    b = np.zeros((layers, MAX_RANK, d_out), np.float32)
    a[..., :rank] = rng.normal(size=(layers, experts, d_in, rank))
    b[:, :rank] = rng.normal(size=(layers, rank, d_out))
    grads = [np.zeros_like(a), np.zeros_like(b)]
    grads[0][..., :rank] = rng.normal(size=(layers, experts, d_in, rank)) * [
        [[[1.0]], [[1e3]], [[1e-3]]]
    ]
    grads[1][:, :rank] = rng.normal(size=(layers, rank, d_out))
    masks = [np.zeros_like(a), np.zeros_like(b)]
    masks[0][..., :rank], masks[1][:, :rank] = 1, 1
    params = DimuonParams(learning_rate=0.5, beta1=0.0)
    step = jax.jit(dimuon_step, static_argnums=(6,))
    new, mu, count, _ = step(
        [a, b],
        grads,
        [np.zeros_like(a), np.zeros_like(b)],
        jnp.int32(0),
        params.as_array(),
        masks,
        (3, 1),
        jnp.int32(rank),
    )
    assert int(count) == 1
    names = ("experts.lora_a", "experts.lora_b")
    want, _ = _reference(
        dict(zip(names, (a, b))),
        dict(zip(names, grads)),
        dict(zip(names, (np.zeros_like(a), np.zeros_like(b)))),
        1,
        params,
        rank,
    )
    for name, old, got in zip(names, (a, b), new):
        got = np.asarray(got)
        axis = _rank_axis(name, got.ndim)
        assert not np.take(got, range(rank, MAX_RANK), axis=axis).any(), name  # padding
        got = _cut(name, got, rank)
        delta = want[name] - _cut(name, old, rank)
        np.testing.assert_allclose(got, want[name], atol=1e-4 * np.abs(delta).max(), err_msg=name)
        model_dim = d_in if name.endswith("lora_a") else d_out
        unit = (got - _cut(name, old, rank)) / (-0.5 * 0.2 * np.sqrt(model_dim))
        for matrix in unit.reshape(-1, *unit.shape[-2:]):  # the gradients' scales differ 1e6x
            sv = np.linalg.svd(matrix, compute_uv=False)
            assert 0.6 < sv.min() and sv.max() < 1.25, (name, sv)


# ------------------------------------------------------------------ through the trainer


def _train(trainer, slot, params, data, steps) -> list[float]:
    losses = []
    for _ in range(steps):
        out = trainer.forward_backward([RunBatch(slot, data)], "cross_entropy")[0]
        trainer.optim_step(slot, params)
        losses.append(out.metrics["loss:sum"])
    return losses


def test_adam_and_dimuon_runs_in_neighbouring_slots_are_isolated(fresh):
    data_a, data_d = _data(10), _data(11, lengths=(14,))
    adam, dimuon = AdamParams(learning_rate=1e-2, weight_decay=0.1), DimuonParams(2e-2)
    alone = {}
    for name, params, family, lora, data in (
        ("adam", adam, "adamw", LoraConfig(rank=4, seed=1), data_a),
        ("dimuon", dimuon, "dimuon", LoraConfig(rank=8, seed=2), data_d),
    ):
        slot = fresh.create_slot(lora, optimizer=family)
        _train(fresh, slot, params, data, steps=3)
        alone[name] = _state(fresh, slot)
        fresh.free_slot(slot)

    a = fresh.create_slot(LoraConfig(rank=4, seed=1))
    d = fresh.create_slot(LoraConfig(rank=8, seed=2), optimizer="dimuon")
    assert abs(a - d) == 1
    for _ in range(3):
        # Each run's batch alone (a batch of both equals them only up to rounding, which
        # test_trainer checks), so that the optimizer states can be compared bitwise.
        fresh.forward_backward([RunBatch(a, data_a)], "cross_entropy")
        fresh.forward_backward([RunBatch(d, data_d)], "cross_entropy")
        before = _state(fresh, a)
        fresh.optim_step(d, dimuon)
        _assert_same(_state(fresh, a), before)  # a Dimuon step leaves Adam's slot alone
        before = _state(fresh, d)
        fresh.optim_step(a, adam)
        _assert_same(_state(fresh, d), before)  # and the reverse
    _assert_same(_state(fresh, a), alone["adam"])
    _assert_same(_state(fresh, d), alone["dimuon"])
    assert not any(x.any() for x in alone["dimuon"]["nu"].values())  # Dimuon has no nu


def test_export_import_and_checkpoint_resume_dimuon_exactly(fresh, tmp_path):
    data = _data(20)
    original = fresh.create_slot(LoraConfig(rank=4, seed=5), optimizer="dimuon")
    _train(fresh, original, DIMUON, data, steps=2)

    copied = fresh.import_slot(fresh.export_slot(original), with_optimizer=True)
    assert fresh.slots[copied].optimizer == "dimuon"
    save_state(
        tmp_path / "ckpt",
        fresh.sharded_state(original),  # what the service writes
        base_model="qwen3",
        lora_alpha=fresh.lora_alpha,
        with_optimizer=True,
    )
    assert read_info(tmp_path / "ckpt").optimizer == "dimuon"
    state, info = load_state(tmp_path / "ckpt", with_optimizer=True)
    assert (state.optimizer, info.step) == ("dimuon", 2)
    restored = fresh.import_slot(state, with_optimizer=True)

    want = _train(fresh, original, DIMUON, data, 2)
    assert _train(fresh, copied, DIMUON, data, 2) == want
    assert _train(fresh, restored, DIMUON, data, 2) == want
    for slot in (copied, restored):
        _assert_same(_state(fresh, slot), _state(fresh, original))
    assert fresh.slots[restored].step == 4

    # Dimuon's momentum cannot resume an AdamW run (nor the reverse); weights alone can.
    fresh.free_slot(copied)
    with pytest.raises(ValidationError, match="dimuon optimizer state") as e:
        fresh.import_slot(state, with_optimizer=True, optimizer="adamw")
    assert e.value.field == "optimizer_config.type"
    weights, _ = load_state(tmp_path / "ckpt", with_optimizer=False)
    as_adam = fresh.import_slot(weights, with_optimizer=False, optimizer="adamw")
    assert fresh.slots[as_adam].optimizer == "adamw"
    assert not any(x.any() for x in fresh.slot_arrays(as_adam, "mu").values())
    fresh.free_slot(as_adam)
    # A checkpoint from before the optimizer was recorded is an AdamW one.
    meta = json.loads((tmp_path / "ckpt" / INFO_FILE).read_text())
    del meta["optimizer"]
    (tmp_path / "ckpt" / INFO_FILE).write_text(json.dumps(meta))
    old, _ = load_state(tmp_path / "ckpt", with_optimizer=True)
    assert old.optimizer == "adamw"
    with pytest.raises(ValidationError, match="adamw optimizer state"):
        fresh.import_slot(old, with_optimizer=True, optimizer="dimuon")
    meta["optimizer"] = "sgd"
    (tmp_path / "ckpt" / INFO_FILE).write_text(json.dumps(meta))
    with pytest.raises(ValidationError, match="corrupt checkpoint metadata"):
        read_info(tmp_path / "ckpt")


def test_wrong_family_and_bad_params_are_refused_naming_the_field(fresh):
    adam = fresh.create_slot(LoraConfig(rank=4, seed=0))
    dimuon = fresh.create_slot(LoraConfig(rank=4, seed=0), optimizer="dimuon")
    fresh.forward_backward([RunBatch(dimuon, _data(30))], "cross_entropy")
    grads = fresh.slot_arrays(dimuon, "grads")
    cases = [
        (adam, DIMUON, "optim_params.type", "pass AdamParams"),
        (dimuon, ADAM, "optim_params.type", "pass DimuonParams"),
        (dimuon, DimuonParams(learning_rate=-1.0), "dimuon_params.learning_rate", "outside"),
        (dimuon, DimuonParams(1e-3, beta1=1.0), "dimuon_params.beta1", "outside"),
        (
            dimuon,
            DimuonParams(1e-3, grad_clip_norm=float("nan")),
            "dimuon_params.grad_clip_norm",
            "outside",
        ),
        (dimuon, DimuonParams("0.1"), "dimuon_params.learning_rate", "must be a number"),
    ]
    for slot, params, field, text in cases:
        with pytest.raises(ValidationError, match=text) as e:
            fresh.optim_step(slot, params)
        assert e.value.field == field
    # Refused before anything ran: the run's gradients wait for a valid step.
    now = fresh.slot_arrays(dimuon, "grads")
    assert all(np.array_equal(grads[n], now[n]) for n in grads)
    fresh.optim_step(dimuon, DimuonParams(1e-3, grad_clip_norm=-1.0))  # nonpositive: no clip
    with pytest.raises(ValidationError) as e:
        fresh.create_slot(LoraConfig(rank=4), optimizer="sgd")
    assert e.value.field == "optimizer_config.type"


def test_rank_padding_and_disabled_targets_stay_zero(fresh):
    lora = LoraConfig(rank=3, seed=4, train_unembed=False)
    slot = fresh.create_slot(lora, optimizer="dimuon")
    start = fresh.slot_arrays(slot)
    _train(fresh, slot, DimuonParams(5e-2, beta1=0.5), _data(40), steps=3)
    for which in ("lora", "mu"):
        for name, value in fresh.slot_arrays(slot, which).items():
            axis = _rank_axis(name, value.ndim)
            assert not np.take(value, range(3, MAX_RANK), axis=axis).any(), (which, name)
            if name.startswith("lm_head"):
                assert np.array_equal(value, start[name] if which == "lora" else 0 * value)
    assert not any(x.any() for x in fresh.slot_arrays(slot, "nu").values())
    moved = fresh.slot_arrays(slot)["layers.mlp.down_proj.lora_b"]
    assert np.abs(moved).max() > 0


def test_a_dimuon_step_that_is_not_finite_is_refused(fresh):
    slot = fresh.create_slot(LoraConfig(rank=4, seed=6), optimizer="dimuon")
    _train(fresh, slot, DIMUON, _data(50), steps=1)
    fresh.forward_backward([RunBatch(slot, _data(51))], "cross_entropy")
    before = _state(fresh, slot)
    grads = fresh.layout.take(fresh.grads, slot)
    fresh.grads = fresh.layout.put(fresh.grads, slot, [g + jnp.inf for g in grads])
    with pytest.raises(NonFiniteStep, match="not finite.*unchanged"):
        fresh.optim_step(slot, DIMUON)
    after = _state(fresh, slot)
    for which in ("lora", "mu", "nu"):
        assert all(np.array_equal(before[which][n], after[which][n]) for n in before[which])
    assert after["count"] == before["count"] and fresh.slots[slot].step == 1
    assert not any(g.any() for g in after["grads"].values())
    _train(fresh, slot, DIMUON, _data(50), steps=1)  # the run goes on


def test_dimuon_lowers_the_loss_on_a_small_sft_batch(fresh):
    slot = fresh.create_slot(LoraConfig(rank=8, seed=7), optimizer="dimuon")
    losses = _train(fresh, slot, DimuonParams(learning_rate=2e-2), _data(60), steps=6)
    assert losses[-1] < 0.9 * losses[0], losses
    assert all(np.isfinite(losses))
    # Hyper-parameters are traced: every Dimuon step of the module ran one compiled update.
    assert fresh.trace_counts["optim_update_dimuon"] == 1


def test_moe_expert_factors_step_as_the_reference(hf_model_dir):
    """Qwen3-MoE's expert factors (per expert: [layers, experts, in, rank] or [layers,
    experts, rank, out]; the shared-outer factor per layer): one matrix per layer and
    expert, through the trainer's own step."""
    trainer = make_trainer(hf_model_dir("qwen3_moe"), slots=2, max_rank=MAX_RANK)
    rank, params = 3, DimuonParams(learning_rate=1e-2, beta1=0.5)
    slot = trainer.create_slot(LoraConfig(rank=rank, seed=1), optimizer="dimuon")
    assert any(v.ndim == 4 for v in trainer.slot_arrays(slot).values())  # per-expert arrays
    rng = np.random.default_rng(0)
    for step in (1, 2):
        shapes = trainer.layout.slot_shapes(trainer.grads)
        noise = [jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in shapes]
        trainer.grads = trainer.layout.put(trainer.grads, slot, noise)
        before = _state(trainer, slot)
        trainer.optim_step(slot, params)
        after = _state(trainer, slot)
        want, want_mu = _reference(
            before["lora"], before["grads"], before["mu"], step, params, rank
        )
        for name, value in after["lora"].items():
            axis = _rank_axis(name, value.ndim)
            assert not np.take(value, range(rank, MAX_RANK), axis=axis).any(), name
            delta = want[name] - _cut(name, before["lora"][name], rank)
            np.testing.assert_allclose(
                _cut(name, value, rank), want[name], atol=1e-4 * np.abs(delta).max(), err_msg=name
            )
            np.testing.assert_allclose(
                _cut(name, after["mu"][name], rank), want_mu[name], rtol=1e-5, atol=1e-7
            )
