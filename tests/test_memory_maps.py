"""The process's memory maps (`service/memory_maps.py`) and the compiled programs that hold
them (`tinker_jax.programs`): the registry drops the programs used least recently, which frees
their maps and recompiles them on next use; the guard does so after an engine call that
compiled once the maps pass HIGH_SHARE of the limit, so that a server meeting ever new shapes
stalls a user on a recompilation instead of crashing for everyone.

Readings of the maps are patched where the test needs the limit crossed; the registries are the
tests' own, so that no other test's programs are dropped."""

from __future__ import annotations

import gc
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.sft_data import sft_data
from tests.small_server import small_server_config
from tinker_jax import programs
from tinker_jax.programs import Programs, Registry
from tinker_jax.service import memory_maps
from tinker_jax.service.memory_maps import MapGuard, map_usage
from tinker_jax.service.server import Server

TIMEOUT = 600


def _square_sum(k: int):
    return lambda x: jnp.tanh(x @ x.T * k).sum(0)


def _built(owner: Programs, name: str, k: int) -> None:
    """Gets program `name` of `owner` and runs it (so it is traced and compiled)."""
    owner.get(name, _square_sum(k))(np.ones((7, 5 + k), np.float32)).block_until_ready()


def test_map_usage_counts_the_maps_a_compiled_program_keeps():
    """`map_usage` reads this process's memory maps and the system's limit; a newly compiled
    program adds maps, which it keeps while it lives (the premise of the precompiler's stop)."""
    gc.collect()  # programs already unreachable unmap now, not while this one is measured
    held, limit = map_usage()
    assert 0 < held < limit
    program = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0)).lower(jnp.ones((7, 13))).compile()
    assert map_usage()[0] > held
    del program


def test_the_registry_drops_the_least_recently_used_programs_of_every_owner():
    """Across two owners (a trainer's and a sampler's, say), the programs whose last `get` is
    oldest go first; a dropped one traces again on its next call, the others do not."""
    registry = Registry()
    a, b = Programs(registry), Programs(registry)
    _built(a, "a1", 1)
    _built(b, "b1", 2)
    _built(a, "a2", 3)
    _built(a, "a1", 1)  # used again: now the most recent
    assert registry.count() == 3 and registry.traces == 3
    assert registry.forget_least_recent(0.5) == 2  # ceil(1.5): b1, then a2
    assert registry.count() == 1
    for owner, name, k in ((a, "a1", 1), (a, "a2", 3), (b, "b1", 2)):
        _built(owner, name, k)
    assert a.trace_counts == {"a1": 1, "a2": 2} and b.trace_counts == {"b1": 2}
    assert registry.traces == 5


def test_dropping_programs_frees_their_memory_maps():
    """What the guard relies on: once the registry lets go of its programs, collecting
    garbage unmaps their kernels."""
    registry = Registry()
    owner = Programs(registry)
    gc.collect()
    before = map_usage()[0]
    for k in range(12):
        _built(owner, f"p{k}", k + 1)
    gc.collect()
    full = map_usage()[0]
    assert full > before
    assert registry.forget_least_recent(1.0) == 12
    gc.collect()
    assert map_usage()[0] < full


def test_the_guard_drops_programs_past_its_high_share_until_under_its_low_share(caplog):
    """Under HIGH_SHARE nothing is dropped; past it, DROP_SHARE of the programs at a time
    (oldest first) until the maps are under LOW_SHARE, with one warning naming the counts and
    the remedy. The maps are read only after something was traced since the last look."""
    registry = Registry()
    owner = Programs(registry)
    for k in range(8):
        _built(owner, f"p{k}", k + 1)
    readings = [(10, 100)]
    guard = MapGuard(lambda: readings.pop(0), registry)
    guard.check()
    assert guard.dropped == 0 and registry.count() == 8
    guard.check()  # nothing traced since: the maps are not read (`readings` is empty)
    _built(owner, "p8", 9)
    readings[:] = [(85, 100), (70, 100), (55, 100)]
    with caplog.at_level("WARNING", logger="tinker_jax.memory_maps"):
        guard.check()
    assert readings == []
    assert guard.dropped == 3 + 2  # ceil(9 / 4), then ceil(6 / 4)
    assert sorted(owner._compiled) == ["p5", "p6", "p7", "p8"]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == memory_maps.log.name]
    assert "held 85 memory maps of vm.max_map_count 100" in warning
    assert "dropped 5 of its 9 compiled programs" in warning and "now holds 55" in warning
    assert "sysctl -w vm.max_map_count=" in warning


def test_the_guard_waits_for_programs_to_add_maps_when_others_hold_them(caplog):
    """When dropping every program leaves the maps at LOW_SHARE or more (maps that are not
    programs'), the next compiles do not drop the programs again until the maps are halfway
    from that floor to the limit: no recompiling of every request for nothing."""
    registry = Registry()
    owner = Programs(registry)
    for k in range(4):
        _built(owner, f"p{k}", k + 1)
    readings = [(85, 100)] + [(75, 100)] * 4
    guard = MapGuard(lambda: readings.pop(0), registry)
    with caplog.at_level("WARNING", logger="tinker_jax.memory_maps"):
        guard.check()
    assert readings == [] and guard.dropped == 4 and registry.count() == 0
    (warning,) = [r.getMessage() for r in caplog.records if r.name == memory_maps.log.name]
    assert "now holds 75, mostly maps that are not programs'" in warning
    assert "the next drop waits for 87" in warning
    _built(owner, "p4", 5)
    readings[:] = [(86, 100)]  # past HIGH_SHARE, under halfway from the floor to the limit
    guard.check()
    assert readings == [] and guard.dropped == 4 and registry.count() == 1
    _built(owner, "p5", 6)
    readings[:] = [(87, 100), (55, 100)]
    guard.check()
    assert readings == [] and guard.dropped == 5 and registry.count() == 1
    _built(owner, "p6", 7)
    readings[:] = [(85, 100), (55, 100)]  # back under LOW_SHARE: HIGH_SHARE rules again
    guard.check()
    assert readings == [] and guard.dropped == 6


def test_a_server_past_its_map_limit_drops_programs_and_goes_on_serving(hf_model_dir, tmp_path):
    """Requests that compile while the process holds HIGH_SHARE of its maps make the server
    drop its programs, least recently used first, not crash: the sample is served, and the
    user's next forward on the same data compiles again and returns the same loss."""
    from tinker_jax import ServiceClient, types

    registry = Registry()
    heights = {"now": itertools.repeat(10)}
    guard = MapGuard(lambda: (next(heights["now"]), 100), registry)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(programs, "PROCESS", registry)  # this server's programs only
        patch.setattr(memory_maps, "GUARD", guard)
        server = Server(small_server_config(hf_model_dir("qwen3"), tmp_path / "storage"))
        try:
            key = server.store.create_user("maps")[1]
            service = ServiceClient(base_url=f"127.0.0.1:{server.port}", api_key=key)
            model = server.config.base_models[0]
            training = service.create_lora_training_client(model, rank=4, seed=1)
            data = sft_data(1, [12, 9])
            first = training.forward(data, "cross_entropy").result(TIMEOUT)
            built = registry.count()
            assert guard.dropped == 0 and built > 0
            # While the user samples, the maps stay past HIGH_SHARE: every call that compiles
            # makes the guard drop every program.
            heights["now"] = itertools.repeat(90)
            sampler = training.save_weights_and_get_sampling_client()
            params = types.SamplingParams(max_tokens=3, temperature=0.0)
            prompt = types.ModelInput.from_ints([5, 17, 3])
            sample = sampler.sample(prompt, num_samples=1, sampling_params=params).result(TIMEOUT)
            assert len(sample.sequences[0].tokens) == 3
            assert guard.dropped >= built
            heights["now"] = itertools.repeat(10)
            (engine,) = (w.engine for w in server.workers.values())
            traced = sum(engine.trainer.trace_counts.values())
            again = training.forward(data, "cross_entropy").result(TIMEOUT)
            assert sum(engine.trainer.trace_counts.values()) > traced  # compiled again
            assert again.metrics["loss:sum"] == pytest.approx(first.metrics["loss:sum"])
        finally:
            server.stop()
