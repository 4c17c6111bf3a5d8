"""Checkpoint folders: exact round trips, resume-with-optimizer equals an uninterrupted run,
atomic saves, errors that name the path, and PEFT exports that PEFT loads to the same logits."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from safetensors.numpy import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.engine_helpers import make_trainer, sft_datum
from tinker_jax import checkpoints, storage
from tinker_jax.batching import RunBatch
from tinker_jax.checkpoints import (
    INFO_FILE,
    export_peft,
    import_peft,
    load_state,
    read_info,
    save_state,
)
from tinker_jax.errors import ValidationError
from tinker_jax.lora import AdapterBatch
from tinker_jax.merge import export_merged
from tinker_jax.optim import AdamParams
from tinker_jax.trainer import LoraConfig, SlotState

VOCAB, RANK, MAX_RANK, ALPHA = 160, 4, 8, 32.0
ADAM = AdamParams(learning_rate=1e-2, weight_decay=0.01)


def _padded(rng, shape_a: tuple[int, ...], rank: int, max_rank: int, is_a: bool) -> np.ndarray:
    """A random array with the rank axis padded by zeros from `rank` to `max_rank`."""
    x = rng.standard_normal(shape_a).astype(np.float32)
    axis = -1 if is_a else -2
    keep = (np.arange(max_rank) < rank).reshape((-1, 1) if axis == -2 else (-1,))
    return x * keep


def _fake_state(rank: int = RANK, max_rank: int = MAX_RANK, step: int = 7) -> SlotState:
    """A SlotState with the trainer's names and shapes (2 layers, hidden 64, mlp 96)."""
    rng = np.random.default_rng(0)
    shapes = {  # module -> (in, out)
        "layers.self_attn.q_proj": (64, 96),
        "layers.self_attn.o_proj": (96, 64),
        "layers.mlp.down_proj": (96, 64),
        "lm_head.head": (64, VOCAB),
    }

    def arrays() -> dict[str, np.ndarray]:
        out = {}
        for module, (d_in, d_out) in shapes.items():
            lead = (2,) if module.startswith("layers") else ()
            out[f"{module}.lora_a"] = _padded(rng, (*lead, d_in, max_rank), rank, max_rank, True)
            out[f"{module}.lora_b"] = _padded(rng, (*lead, max_rank, d_out), rank, max_rank, False)
        return out

    mu, nu = arrays(), arrays()
    nu = {k: np.abs(v) for k, v in nu.items()}
    return SlotState(LoraConfig(rank=rank, seed=3, train_mlp=False), arrays(), mu, nu, step)


def _trimmed(name: str, x: np.ndarray, rank: int) -> np.ndarray:
    return x[..., :rank] if name.endswith("lora_a") else x[..., :rank, :]


def _assert_arrays_equal(got: dict, want: dict, rank: int) -> None:
    assert got.keys() == want.keys()
    for name, x in want.items():
        assert got[name].dtype == np.float32, name
        assert np.array_equal(got[name], _trimmed(name, x, rank)), name


@pytest.mark.parametrize("with_optimizer", [True, False])
def test_round_trip_is_exact_at_the_true_rank(tmp_path, with_optimizer):
    state = _fake_state()
    folder = tmp_path / "run" / "weights" / "ckpt"  # parents are created
    size = save_state(
        folder, state, base_model="org/m", lora_alpha=16, with_optimizer=with_optimizer
    )
    assert size == storage.tree_size(folder) > 0
    assert [p.name for p in folder.parent.iterdir()] == ["ckpt"]  # no temporary left over

    loaded, info = load_state(folder, with_optimizer=with_optimizer)
    assert info == read_info(folder)
    assert info.base_model == "org/m" and info.lora == state.lora and info.lora_alpha == 16.0
    assert info.has_optimizer is with_optimizer and info.step == 7
    assert loaded.lora == state.lora
    _assert_arrays_equal(loaded.adapter, state.adapter, RANK)
    if with_optimizer:
        assert loaded.step == 7
        _assert_arrays_equal(loaded.mu, state.mu, RANK)
        _assert_arrays_equal(loaded.nu, state.nu, RANK)
    else:
        assert loaded.mu is None and loaded.nu is None and loaded.step == 0
    # The adapter alone can be read from a checkpoint that also holds the optimizer.
    adapter_only, _ = load_state(folder, with_optimizer=False)
    assert adapter_only.mu is None
    _assert_arrays_equal(adapter_only.adapter, state.adapter, RANK)


def test_trimmed_rank_makes_files_smaller(tmp_path):
    small = save_state(
        tmp_path / "r2",
        _fake_state(rank=2, max_rank=64),
        base_model="m",
        lora_alpha=32,
        with_optimizer=False,
    )
    large = save_state(
        tmp_path / "r64",
        _fake_state(rank=64, max_rank=64),
        base_model="m",
        lora_alpha=32,
        with_optimizer=False,
    )
    assert small * 8 < large


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(checkpoints, "_write_info", fail)  # runs after the arrays are written
    folder = tmp_path / "parent" / "ckpt"
    with pytest.raises(RuntimeError, match="disk full"):
        save_state(folder, _fake_state(), base_model="m", lora_alpha=32, with_optimizer=True)
    assert not folder.exists()
    assert list(folder.parent.iterdir()) == []


def test_gcs_checkpoints_round_trip_and_fail_cleanly(gcs, tmp_path, monkeypatch):
    """On gs:// (a local emulator): the same exact round trip; the info file, written last,
    is what makes a prefix a checkpoint; a failed save and a removal leave no object."""
    state = _fake_state()
    url = gcs.url("unit/run/weights/ckpt")
    size = save_state(url, state, base_model="org/m", lora_alpha=16, with_optimizer=True)
    objects = gcs.list("unit/run/weights/ckpt/")
    assert f"unit/run/weights/ckpt/{INFO_FILE}" in objects and len(objects) > 5
    assert size == storage.tree_size(storage.resolve(url)) > 0
    loaded, info = load_state(url, with_optimizer=True)
    assert info == read_info(url) and info.step == 7 and info.lora == state.lora
    for got, want in ((loaded.adapter, state.adapter), (loaded.mu, state.mu)):
        _assert_arrays_equal(got, want, RANK)
    with pytest.raises(ValidationError, match="already exists"):
        save_state(url, state, base_model="m", lora_alpha=32, with_optimizer=False)

    export_peft(gcs.url("unit/peft"), state, base_model="org/m", lora_alpha=16)
    export_peft(tmp_path / "peft", state, base_model="org/m", lora_alpha=16)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        remote = storage.resolve(gcs.url(f"unit/peft/{name}")).read_bytes()
        assert remote == (tmp_path / "peft" / name).read_bytes(), name

    partial = storage.resolve(gcs.url("unit/partial"))
    (partial / "state" / "x").write_text("an array file of a save that was cut off")
    with pytest.raises(ValidationError, match="is not a checkpoint"):
        read_info(partial)

    def fail(*args):
        raise RuntimeError("quota exceeded")

    with monkeypatch.context() as m:
        m.setattr(checkpoints, "_write_info", fail)  # runs after the arrays are written
        with pytest.raises(RuntimeError, match="quota exceeded"):
            save_state(
                gcs.url("unit/failed"), state, base_model="m", lora_alpha=1, with_optimizer=True
            )
    assert gcs.list("unit/failed") == []
    storage.remove_tree(url)
    assert gcs.list("unit/run") == []
    with pytest.raises(ValidationError, match="does not exist"):
        read_info(url)


def test_errors_name_the_path(tmp_path):
    state = _fake_state()
    with pytest.raises(ValidationError, match="does not exist") as e:
        load_state(tmp_path / "missing", with_optimizer=False)
    assert e.value.field == "path"
    with pytest.raises(ValidationError, match="is not a checkpoint"):
        read_info(tmp_path)

    no_opt = tmp_path / "no_opt"
    save_state(no_opt, state, base_model="m", lora_alpha=32, with_optimizer=False)
    with pytest.raises(ValidationError, match="without optimizer state") as e:
        load_state(no_opt, with_optimizer=True)
    assert e.value.field == "path"
    with pytest.raises(ValidationError, match="already exists") as e:
        save_state(no_opt, state, base_model="m", lora_alpha=32, with_optimizer=False)
    assert e.value.field == "path"
    with pytest.raises(ValidationError, match="only local folders and gs://"):
        save_state("s3://bucket/ckpt", state, base_model="m", lora_alpha=32, with_optimizer=False)
    with pytest.raises(ValidationError, match="valid bucket"):
        save_state("gs://B/ckpt", state, base_model="m", lora_alpha=32, with_optimizer=False)

    bad_json = tmp_path / "bad_json"
    save_state(bad_json, state, base_model="m", lora_alpha=32, with_optimizer=False)
    (bad_json / INFO_FILE).write_text("{not json")
    with pytest.raises(ValidationError, match="corrupt checkpoint metadata"):
        load_state(bad_json, with_optimizer=False)
    meta = json.loads((no_opt / INFO_FILE).read_text())
    (bad_json / INFO_FILE).write_text(json.dumps({**meta, "lora": {"rank": 4}}))
    with pytest.raises(ValidationError, match="corrupt checkpoint metadata"):
        read_info(bad_json)
    (bad_json / INFO_FILE).write_text(json.dumps({**meta, "lora": {**meta["lora"], "rank": 5}}))
    with pytest.raises(ValidationError, match="not rank 5"):
        load_state(bad_json, with_optimizer=False)

    no_arrays = tmp_path / "no_arrays"
    save_state(no_arrays, state, base_model="m", lora_alpha=32, with_optimizer=False)
    for f in (no_arrays / checkpoints.STATE_DIR).rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(ValidationError, match="cannot read checkpoint arrays") as e:
        load_state(no_arrays, with_optimizer=False)
    assert e.value.field == "path"


# ------------------------------------------------------------------ through the real trainer


@pytest.fixture(scope="module")
def trainers(hf_model_dir):
    """A function: tiny config name -> a trainer on it (made once, slots freed per use)."""
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = make_trainer(
                hf_model_dir(name), slots=3, max_rank=MAX_RANK, lora_alpha=ALPHA
            )
        for slot in list(made[name].slots):
            made[name].free_slot(slot)
        return made[name]

    return get


def _train(trainer, slot, datums, steps):
    losses = []
    for _ in range(steps):
        out = trainer.forward_backward([RunBatch(slot, datums)], "cross_entropy")[0]
        trainer.optim_step(slot, ADAM)
        losses.append(out.metrics["loss:sum"])
    return losses


def test_resume_with_optimizer_continues_the_run_exactly(trainers, tmp_path):
    trainer = trainers("qwen3")
    rng = np.random.default_rng(0)
    datums = [sft_datum(rng, 20, VOCAB), sft_datum(rng, 14, VOCAB)]
    original = trainer.create_slot(LoraConfig(rank=RANK, seed=5))
    _train(trainer, original, datums, steps=2)
    save_state(
        tmp_path / "ckpt",
        trainer.export_slot(original),
        base_model="qwen3",
        lora_alpha=trainer.lora_alpha,
        with_optimizer=True,
    )
    state, info = load_state(tmp_path / "ckpt", with_optimizer=True)
    assert info.step == 2
    restored = trainer.import_slot(state, with_optimizer=True)

    assert _train(trainer, original, datums, 2) == _train(trainer, restored, datums, 2)
    for which in ("lora", "mu", "nu"):
        a, b = trainer.slot_arrays(original, which), trainer.slot_arrays(restored, which)
        assert all(np.array_equal(a[n], b[n]) for n in a), which
    assert int(trainer.counts[restored]) == 4


def _our_logits(trainer, slot: int, tokens: np.ndarray) -> np.ndarray:
    """tokens: [batch, seq] -> logits [batch, seq, vocab] under the slot's adapter."""

    @jax.jit
    def run(lora, base, tokens, adapter):
        model = nnx.merge(trainer.graphdef, lora, base)
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        return model.logits(model(tokens, positions, adapter), adapter)

    n = tokens.shape[0]
    adapter = AdapterBatch(
        jnp.full((n,), slot, jnp.int32), jnp.full((n,), trainer.slots[slot].scale, jnp.float32)
    )
    return np.asarray(run(trainer.lora, trainer.base, jnp.asarray(tokens, jnp.int32), adapter))


@pytest.mark.parametrize(
    "name, lora, targets",
    [
        ("qwen3", LoraConfig(rank=RANK, seed=1), 8),
        # Tied embeddings: PEFT adapts lm_head's output only (not the shared embedding), as we
        # do; no MLP targets.
        ("llama", LoraConfig(rank=RANK, seed=3, train_mlp=False), 5),
    ],
)
def test_peft_export_gives_the_same_logits(trainers, hf_model_dir, tmp_path, name, lora, targets):
    trainer = trainers(name)
    slot = trainer.create_slot(lora)
    rng = np.random.default_rng(1)
    _train(trainer, slot, [sft_datum(rng, 20, VOCAB), sft_datum(rng, 14, VOCAB)], steps=3)
    out = tmp_path / "peft"
    export_peft(
        out,
        trainer.export_slot(slot, with_optimizer=False),
        base_model=str(hf_model_dir(name)),
        lora_alpha=trainer.lora_alpha,
    )

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == RANK and config["lora_alpha"] == ALPHA
    assert len(config["target_modules"]) == targets
    base = AutoModelForCausalLM.from_pretrained(hf_model_dir(name), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    tokens = rng.integers(0, VOCAB, (2, 24))
    with torch.no_grad():
        theirs = peft_model(torch.from_numpy(tokens)).logits.numpy()
    ours = _our_logits(trainer, slot, tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # The adapter matters: the base model alone is measurably different.
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(plain - theirs).max() > 1e-3


@pytest.mark.parametrize(
    "name, lora",
    [
        ("qwen3", LoraConfig(rank=RANK, seed=1)),
        # Tied embeddings with a trained head: the merged folder unties it.
        ("llama", LoraConfig(rank=RANK, seed=3)),
        # Shared-outer expert LoRA: each expert's weight gets its own product.
        ("qwen3_moe", LoraConfig(rank=RANK, seed=5)),
    ],
)
def test_merged_export_loads_in_transformers_with_the_same_logits(
    trainers, hf_model_dir, tmp_path, name, lora
):
    trainer = trainers(name)
    slot = trainer.create_slot(lora)
    rng = np.random.default_rng(2)
    _train(trainer, slot, [sft_datum(rng, 20, VOCAB), sft_datum(rng, 14, VOCAB)], steps=3)
    out = export_merged(
        tmp_path / "merged",
        trainer.export_slot(slot, with_optimizer=False),
        base_model_dir=hf_model_dir(name),
        lora_alpha=trainer.lora_alpha,
        progress=False,
    )
    assert (out / "tokenizer.json").is_file()
    tied = json.loads((hf_model_dir(name) / "config.json").read_text())["tie_word_embeddings"]
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False or not tied
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = rng.integers(0, VOCAB, (2, 24))
    with torch.no_grad():
        theirs = merged(torch.from_numpy(tokens)).logits.numpy()
    ours = _our_logits(trainer, slot, tokens)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(hf_model_dir(name), dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(plain - theirs).max() > 1e-3  # the adapter is in the weights


def test_a_peft_adapter_imports_as_the_same_run(trainers, hf_model_dir, tmp_path):
    """export_peft then import_peft gives back the adapter exactly; an adapter with another
    lora_alpha (its B scaled to match) computes the same logits once imported."""
    trainer = trainers("qwen3")
    slot = trainer.create_slot(LoraConfig(rank=RANK, seed=4, train_unembed=False))
    rng = np.random.default_rng(5)
    _train(trainer, slot, [sft_datum(rng, 20, VOCAB)], steps=2)
    folder = tmp_path / "peft"
    base = str(hf_model_dir("qwen3"))
    export_peft(folder, trainer.export_slot(slot, False), base_model=base, lora_alpha=ALPHA)

    def imported(path) -> int:
        state = import_peft(
            path, base_model_dir=base, base_model=base, max_rank=MAX_RANK, lora_alpha=ALPHA
        )
        assert (state.lora.rank, *state.lora.flags()) == (RANK, 1, 1, 0)
        return trainer.import_slot(state, with_optimizer=False)

    tokens = rng.integers(0, VOCAB, (2, 16))
    again = imported(folder)
    np.testing.assert_array_equal(
        _our_logits(trainer, again, tokens), _our_logits(trainer, slot, tokens)
    )
    trainer.free_slot(again)
    # The same adapter as PEFT would save it with lora_alpha 16: B twice as large.
    halved = tmp_path / "alpha16"
    halved.mkdir()
    config = json.loads((folder / "adapter_config.json").read_text())
    (halved / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 16.0}))
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors = {k: v * 2 if "lora_B" in k else v for k, v in tensors.items()}
    save_file(tensors, halved / "adapter_model.safetensors")
    np.testing.assert_allclose(
        _our_logits(trainer, imported(halved), tokens),
        _our_logits(trainer, slot, tokens),
        atol=1e-5,
    )


@pytest.mark.parametrize(
    "change, field",
    [
        ({"r": 64}, "r"),
        ({"target_modules": ["q_proj", "embed_tokens"]}, "target_modules"),
        ({"use_dora": True}, "use_dora"),
        ({"base_model_name_or_path": "meta-llama/Llama-3.2-1B"}, "base_model"),
    ],
)
def test_an_adapter_that_does_not_fit_is_refused_naming_the_field(
    trainers, hf_model_dir, tmp_path, change, field
):
    trainer = trainers("qwen3")
    slot = trainer.create_slot(LoraConfig(rank=RANK, seed=6))
    folder = tmp_path / "peft"
    base = str(hf_model_dir("qwen3"))
    export_peft(folder, trainer.export_slot(slot, False), base_model=base, lora_alpha=ALPHA)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValidationError, match=field):
        import_peft(
            folder, base_model_dir=base, base_model=base, max_rank=MAX_RANK, lora_alpha=ALPHA
        )


def test_an_adapter_of_another_shape_is_refused(trainers, hf_model_dir, tmp_path):
    """qwen3's adapter onto llama (another hidden size), under llama's name: the shapes say no."""
    trainer = trainers("qwen3")
    slot = trainer.create_slot(LoraConfig(rank=RANK, seed=7))
    folder = tmp_path / "peft"
    llama = str(hf_model_dir("llama"))
    export_peft(folder, trainer.export_slot(slot, False), base_model=llama, lora_alpha=ALPHA)
    with pytest.raises(ValidationError, match="adapter_model: .* has shape"):
        import_peft(
            folder, base_model_dir=llama, base_model=llama, max_rank=MAX_RANK, lora_alpha=ALPHA
        )
