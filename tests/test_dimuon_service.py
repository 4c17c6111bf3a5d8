"""Dimuon through the service, as users call it: our client over gRPC and the official SDK 0.38
over HTTP create a run with a Dimuon optimizer config and step it with DimuonParams. A run's
loss falls and its saved state after the steps is the engine's own Dimuon step from its saved
state before them; a run refuses the other family's parameters naming the field; get_info,
weights info and checkpoint loads keep the family; an AdamW run beside it is unaffected."""

from __future__ import annotations

import numpy as np
import pytest

from tests.engine_helpers import make_trainer
from tests.server_process import ServerProcess
from tests.sft_data import sft_data
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.batching import Datum, RunBatch
from tinker_jax.checkpoints import load_state
from tinker_jax.client.errors import BadRequestError
from tinker_jax.errors import ValidationError
from tinker_jax.optim import DimuonParams
from tinker_jax.service.core import _loaded_family
from tinker_jax.service.store import Store

TIMEOUT = 300
DIMUON = dict(learning_rate=2e-2, beta1=0.8)


@pytest.fixture(scope="module")
def server(shared_server) -> ServerProcess:
    return shared_server.with_users("dimuon", "alice", "bob")


@pytest.fixture(scope="module")
def engine(hf_model_dir):
    """An engine of the server's settings (max rank 32, lora_alpha 32, float32) in this
    process, to replay a run's steps from its checkpoint."""
    return make_trainer(hf_model_dir("qwen3"), slots=2, max_rank=32)


def _client(server, user="alice") -> ServiceClient:
    return ServiceClient(base_url=server.address, api_key=server.keys[user])


def _train(tc, data, params, steps: int) -> list[float]:
    """Pipelined steps; each step's loss:sum before its update."""
    futures = []
    for _ in range(steps):
        futures.append(tc.forward_backward(data, "cross_entropy"))
        futures.append(tc.optim_step(params))
    return [f.result(timeout=TIMEOUT).metrics["loss:sum"] for f in futures[::2]]


def _engine_data(data) -> list[Datum]:
    return [
        Datum(
            np.asarray(d.model_input.to_ints()),
            {
                "target_tokens": np.asarray(d.loss_fn_inputs["target_tokens"].tolist()),
                "weights": np.asarray(d.loss_fn_inputs["weights"].tolist(), np.float32),
            },
        )
        for d in data
    ]


def _saved(server, path: str):
    store = Store(server.storage)
    try:
        location = store.get_checkpoint(path).location
    finally:
        store.close()
    return load_state(location, with_optimizer=True)[0]


def _assert_steps_as_the_engine(server, engine, before: str, after: str, data, steps: int):
    """The checkpoint `after` holds what the engine's Dimuon steps on `data` make of the
    checkpoint `before` (adapter and momentum)."""
    start, want = _saved(server, before), _saved(server, after)
    assert (start.optimizer, want.optimizer) == ("dimuon", "dimuon")
    slot = engine.import_slot(start, with_optimizer=True)
    try:
        assert engine.slots[slot].optimizer == "dimuon"
        batch = _engine_data(data)
        for _ in range(steps):
            engine.forward_backward([RunBatch(slot, batch)], "cross_entropy")
            engine.optim_step(slot, DimuonParams(**DIMUON))
        got = engine.export_slot(slot)
    finally:
        engine.free_slot(slot)
    assert got.step == want.step == start.step + steps
    for which in ("adapter", "mu"):
        mine, theirs = getattr(got, which), getattr(want, which)
        assert mine.keys() == theirs.keys()
        for name in mine:
            # the engine's arrays are padded to its max rank, a checkpoint's cut to the run's
            inside = tuple(slice(0, n) for n in theirs[name].shape)
            cut, padding = mine[name][inside], mine[name].copy()
            padding[inside] = 0
            assert not padding.any(), f"{which} {name}: the padding moved"
            # float32 rounding differs between the server's batches and this replay
            scale = float(np.abs(theirs[name]).max())
            np.testing.assert_allclose(
                cut, theirs[name], rtol=1e-4, atol=1e-5 * scale, err_msg=f"{which} {name}"
            )
    moved = [n for n in want.adapter if not np.array_equal(want.adapter[n], start.adapter[n])]
    assert moved, "the steps changed nothing"


# ------------------------------------------------------------------ our client (gRPC)


def test_dimuon_through_our_client(server, engine):
    data, other = sft_data(21, [20, 16]), sft_data(22, [18])
    adam = T.AdamParams(learning_rate=1e-2)
    with _client(server, "bob") as bob:  # an AdamW run alone: the reference
        alone = _train(
            bob.create_lora_training_client(server.model, rank=4, seed=2), other, adam, 3
        )

    with _client(server) as alice, _client(server, "bob") as bob:
        tc = alice.create_lora_training_client(
            server.model, rank=8, seed=1, optimizer=T.DimuonOptimizerConfig()
        )
        assert tc.get_info().optimizer_config == T.DimuonOptimizerConfig()
        neighbour = bob.create_lora_training_client(server.model, rank=4, seed=2)
        assert neighbour.get_info().optimizer_config == T.AdamOptimizerConfig()
        before = tc.save_state("before").result(timeout=TIMEOUT).path

        # The neighbour's steps interleave with Dimuon's; it trains as it did alone.
        futures = []
        for _ in range(3):
            futures.append(neighbour.forward_backward(other, "cross_entropy"))
            futures.append(neighbour.optim_step(adam))
            futures.append(tc.forward_backward(data, "cross_entropy"))
            futures.append(tc.optim_step(T.DimuonParams(**DIMUON)))
        results = [f.result(timeout=TIMEOUT) for f in futures]
        assert [r.metrics["loss:sum"] for r in results[0::4]] == pytest.approx(alone, rel=1e-5)
        after = tc.save_state("after").result(timeout=TIMEOUT).path
        _assert_steps_as_the_engine(server, engine, before, after, data, steps=3)

        # The other family's parameters are refused, naming the field; nothing moves.
        loss = tc.forward(data, "cross_entropy").result(timeout=TIMEOUT).metrics["loss:sum"]
        with pytest.raises(BadRequestError, match=r"optim_params\.type.*pass DimuonParams"):
            tc.optim_step(adam).result(timeout=TIMEOUT)
        with pytest.raises(BadRequestError, match=r"optim_params\.type.*pass AdamParams"):
            neighbour.optim_step(T.DimuonParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
        assert tc.forward(data, "cross_entropy").result(timeout=TIMEOUT).metrics[
            "loss:sum"
        ] == pytest.approx(loss, rel=1e-6)

        losses = _train(tc, data, T.DimuonParams(**DIMUON), steps=5)
        assert losses[-1] < 0.8 * losses[0], losses

        # A checkpoint keeps its family: resumed with its momentum, the run continues exactly.
        path = tc.save_state("resume").result(timeout=TIMEOUT).path
        rest = alice.create_rest_client()
        weights = rest.get_weights_info_by_tinker_path(path).result(timeout=TIMEOUT)
        assert weights.optimizer_config == T.DimuonOptimizerConfig()
        resumed = alice.create_training_client_from_state_with_optimizer(path)
        assert resumed.get_info().optimizer_config == T.DimuonOptimizerConfig()
        go_on = _train(tc, data, T.DimuonParams(**DIMUON), steps=2)
        assert _train(resumed, data, T.DimuonParams(**DIMUON), steps=2) == pytest.approx(
            go_on, rel=1e-5
        )
        # Without its optimizer state a run takes the optimizer asked for, AdamW by default.
        fresh = alice.create_training_client_from_state(path)
        assert fresh.get_info().optimizer_config == T.AdamOptimizerConfig()
        with pytest.raises(BadRequestError, match="pass AdamParams"):
            fresh.optim_step(T.DimuonParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
        again = alice.create_training_client_from_state(path, optimizer=T.DimuonOptimizerConfig())
        assert again.get_info().optimizer_config == T.DimuonOptimizerConfig()
        again.optim_step(T.DimuonParams(learning_rate=1e-2)).result(timeout=TIMEOUT)


def test_the_family_of_a_loaded_run():
    assert _loaded_family("dimuon", True, None) == "dimuon"
    assert _loaded_family("dimuon", True, "dimuon") == "dimuon"
    assert _loaded_family("dimuon", False, None) == "adamw"
    assert _loaded_family("adamw", False, "dimuon") == "dimuon"
    with pytest.raises(ValidationError, match="holds dimuon optimizer state") as e:
        _loaded_family("dimuon", True, "adamw")
    assert e.value.field == "optimizer_config.type"
    with pytest.raises(ValidationError, match="optimizer_config.type"):
        _loaded_family("adamw", False, "sgd")


# ------------------------------------------------------------------ the official SDK (HTTP)


def test_dimuon_through_the_official_sdk(server, engine):
    tinker = pytest.importorskip("tinker")
    from tinker import types as TT

    data = sft_data(31, [20, 16], types=TT)
    service = tinker.ServiceClient(base_url=server.http_url, api_key=server.keys["alice"])
    tc = service.create_lora_training_client(
        server.model, rank=8, seed=4, optimizer=TT.DimuonOptimizerConfig()
    ).result(timeout=TIMEOUT)
    assert tc.get_info().optimizer_config.type == "dimuon"
    before = tc.save_state("sdk-before").result(timeout=TIMEOUT).path
    losses = _train(tc, data, TT.DimuonParams(**DIMUON), steps=3)
    after = tc.save_state("sdk-after").result(timeout=TIMEOUT).path
    _assert_steps_as_the_engine(server, engine, before, after, data, steps=3)
    losses += _train(tc, data, TT.DimuonParams(**DIMUON), steps=3)
    assert losses[-1] < 0.8 * losses[0], losses

    with pytest.raises(tinker.RequestFailedError, match=r"optim_params\.type.*DimuonParams"):
        tc.optim_step(TT.AdamParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
    tc.optim_step(TT.DimuonParams(learning_rate=1e-2)).result(timeout=TIMEOUT)  # still serving

    rest = tinker.RestClient(base_url=server.http_url, api_key=server.keys["alice"])
    info = rest.get_weights_info_by_tinker_path(after).result(timeout=TIMEOUT)
    assert info.optimizer_config.type == "dimuon"
    resumed = service.create_training_client_from_state_with_optimizer(after).result(
        timeout=TIMEOUT
    )
    assert resumed.get_info().optimizer_config.type == "dimuon"
    resumed.optim_step(TT.DimuonParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
    fresh = service.create_training_client_from_state(after).result(timeout=TIMEOUT)
    assert fresh.get_info().optimizer_config.type == "adamw"
    chosen = service.create_training_client_from_state(
        after, optimizer=TT.DimuonOptimizerConfig()
    ).result(timeout=TIMEOUT)
    assert chosen.get_info().optimizer_config.type == "dimuon"

    adam = service.create_lora_training_client(server.model, rank=4, seed=5).result(timeout=TIMEOUT)
    assert adam.get_info().optimizer_config == TT.AdamOptimizerConfig()
    with pytest.raises(tinker.RequestFailedError, match=r"optim_params\.type.*AdamParams"):
        adam.optim_step(TT.DimuonParams(learning_rate=1e-2)).result(timeout=TIMEOUT)
    service.close("success").result()


def test_loads_over_http_keep_or_refuse_the_family(server):
    """Create-via-load with the optimizer state refuses another optimizer_config; a legacy
    load_state into an AdamW run refuses Dimuon optimizer state, and loading only the weights
    leaves the run an AdamW one."""
    httpx = pytest.importorskip("httpx")
    from tests.test_tinker_sdk import _retrieve

    with _client(server) as client:
        tc = client.create_lora_training_client(
            server.model, rank=4, seed=6, optimizer=T.DimuonOptimizerConfig()
        )
        _train(tc, sft_data(41, [12]), T.DimuonParams(learning_rate=1e-2), steps=1)
        path = tc.save_state("http-loads").result(timeout=TIMEOUT).path

    headers = {"X-API-Key": server.keys["alice"]}
    with httpx.Client(base_url=server.http_url, headers=headers, timeout=60) as http:
        session = http.post("/api/v1/create_session", json={"tags": [], "sdk_version": "raw"})
        session_id = session.json()["session_id"]
        load = {"session_id": session_id, "model_seq_id": 0, "path": path, "optimizer": True}
        refused = http.post(
            "/api/v1/load_weights", json={**load, "optimizer_config": {"type": "adamw"}}
        )
        assert refused.status_code == 400 and "optimizer_config.type" in refused.text
        created = http.post(
            "/api/v1/create_model",
            json={
                "session_id": session_id,
                "model_seq_id": 1,
                "base_model": server.model,
                "lora_config": {"rank": 4, "seed": 5},
            },
        ).json()
        model_id = created["model_id"]
        assert _retrieve(http, created["request_id"])["model_id"] == model_id
        into = {"model_id": model_id, "path": path}
        state = http.post("/api/v1/load_weights", json={**into, "seq_id": 1, "optimizer": True})
        failed = _retrieve(http, state.json()["request_id"])
        assert "holds dimuon optimizer state" in failed["error"], failed
        weights = http.post("/api/v1/load_weights", json={**into, "seq_id": 2, "optimizer": False})
        assert "error" not in _retrieve(http, weights.json()["request_id"])
        info = http.post("/api/v1/get_info", json={"model_id": model_id}).json()
        assert info["optimizer_config"] == {"type": "adamw"}
