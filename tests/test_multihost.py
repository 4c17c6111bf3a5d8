"""Multi-host serving on JAX's multi-controller runtime, through the real server: 2 processes
x 4 CPU devices (gloo collectives between them) against 1 process x 8 devices, on the same
global mesh shape. The same client loop must see the same losses, logprobs (before and after
training: the same gradients were applied) and greedy tokens, and checkpoints written by both
processes through Orbax must load back (a new run and a sampler from the saved paths). The
two processes write their checkpoints to gs:// (a local emulator), as on a TPU pod slice.
A two-process server that precompiles defers prefix-cache hits' programs on both hosts alike."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.server_process import MAX_ADAPTERS, MAX_LORA_RANK, ServerProcess, wait_until
from tests.sft_data import sft_data
from tests.xla_env import xla_flags
from tinker_jax import ServiceClient, checkpoints, distributed
from tinker_jax import types as T
from tinker_jax.checkpoints import INFO_FILE
from tinker_jax.storage import resolve as resolve_location

MESH = "data=2,fsdp=2,tensor=2"
# The serving comparison starts three servers, and process 1 compiles every program afresh
# each time (only process 0 writes the persistent cache): CI runs it in its `-m slow` step.
SLOW = pytest.mark.slow


def _devices(n: int) -> dict[str, str]:
    return {"XLA_FLAGS": xla_flags(devices=n)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _follower(model: Path, storage: Path, log, *args: str) -> subprocess.Popen:
    """Process 1 of a two-process server on 4 CPU devices (`args`: its flags beyond the model,
    storage, LoRA limits and compilation cache; its process id is added), logging to `log`."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tinker_jax.service.cli",
            "serve",
            "--base-model",
            str(model),
            "--storage",
            str(storage),
            "--max-lora-rank",
            str(MAX_LORA_RANK),
            "--max-adapters",
            str(MAX_ADAPTERS),
            "--compilation-cache",
            jax.config.jax_compilation_cache_dir,
            *args,
            "--process-id",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **_devices(4)},
    )


@contextlib.contextmanager
def _two_processes(
    model: Path, storage: Path, log: Path, *flags: str, leader=(), follower=()
) -> Iterator[ServerProcess]:
    """A server of two processes on 4 CPU devices each, sharing `storage`: process 1 (`flags`
    and `follower`, logging to `log`), then process 0 (`flags` and `leader`), which is yielded.
    On exit process 0 stops, and process 1 must then exit cleanly."""
    join = ("--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2")
    with open(log, "w") as follower_log:
        process1 = _follower(model, storage, follower_log, *flags, *join, *follower)
        try:
            process0 = ServerProcess(
                model, storage, *flags, *join, "--process-id", "0", *leader, env=_devices(4)
            )
            try:
                yield process0
            finally:
                process0.stop()
            assert process1.wait(timeout=60) == 0, log.read_text()
        finally:
            if process1.poll() is None:
                process1.kill()


def _data() -> list[T.Datum]:
    return sft_data(0, (12, 20))


def _logprobs(out) -> list[np.ndarray]:
    return [o["logprobs"].to_numpy() for o in out.loss_fn_outputs]


def _workload(server: ServerProcess, model: str) -> dict:
    """Trains a few steps, samples greedily, saves, and loads the checkpoints back."""
    key = server.create_key("alice")
    greedy = T.SamplingParams(max_tokens=8, temperature=0.0, stop=[])
    prompt = T.ModelInput.from_ints([5, 6, 7, 8, 9])
    data = _data()
    result: dict = {"losses": [], "logprobs": []}
    with ServiceClient(base_url=server.address, api_key=key) as client:
        tc = client.create_lora_training_client(model, rank=4, seed=1)
        for _ in range(3):
            out = tc.forward_backward(data, "cross_entropy").result(timeout=300)
            tc.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=300)
            result["losses"].append(out.metrics["loss:sum"])
            result["logprobs"].append(_logprobs(out))
        # forward_backward, not forward: one program fewer for process 1 to compile (only
        # process 0 writes JAX's persistent cache, and on CPU the keys differ by process).
        trained = tc.forward_backward(data, "cross_entropy").result(timeout=300)
        result["trained"] = _logprobs(trained)
        sample = tc.save_weights_and_get_sampling_client().sample(prompt, 1, greedy)
        seq = sample.result(timeout=300).sequences[0]
        result["tokens"], result["token_logprobs"] = seq.tokens, seq.logprobs
        state = tc.save_state("s").result(timeout=300).path
        weights = tc.save_weights_for_sampler("w").result(timeout=300).path
        resumed = client.create_training_client_from_state_with_optimizer(state)
        resumed_out = resumed.forward_backward(data, "cross_entropy").result(timeout=300)
        result["resumed"] = _logprobs(resumed_out)
        from_path = client.create_sampling_client(model_path=weights)
        result["from_path"] = from_path.sample(prompt, 1, greedy).result(timeout=300)
        result["from_path"] = result["from_path"].sequences[0].tokens
    return result


@pytest.fixture(scope="module")
def results(hf_model_dir, tmp_path_factory, gcs):
    """The workload on one process, and on two whose checkpoints go to gs:// (as on a TPU
    pod slice: storage every host sees)."""
    model = hf_model_dir("qwen3")
    args = ("--mesh", MESH)
    single = ServerProcess(model, tmp_path_factory.mktemp("one"), *args, env=_devices(8))
    try:
        one = _workload(single, str(model))
    finally:
        single.stop()

    storage = tmp_path_factory.mktemp("two")
    to_gcs = ("--checkpoint-storage", gcs.url("two"))
    with _two_processes(model, storage, storage.parent / "follower.log", *args, *to_gcs) as leader:
        two = _workload(leader, str(model))
    return one, two, single.storage / "checkpoints", resolve_location(gcs.url("two"))


def _saved_state(root: Path):
    """The training state saved as `weights/s` under a server's checkpoint storage (a local
    or gs:// path)."""
    (folder,) = root.glob("*/weights/s-*")
    return checkpoints.load_state(folder, with_optimizer=True)[0]


@SLOW
def test_two_processes_match_one(results):
    one, two, *_ = results
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5, atol=1e-5)
    assert one["losses"][-1] < one["losses"][0]
    for key in ("trained", "resumed"):
        for a, b in zip(two[key], one[key]):
            np.testing.assert_allclose(a, b, atol=1e-5)
    for step_two, step_one in zip(two["logprobs"], one["logprobs"]):
        for a, b in zip(step_two, step_one):
            np.testing.assert_allclose(a, b, atol=1e-5)
    assert two["tokens"] == one["tokens"] and two["from_path"] == one["from_path"]
    assert two["from_path"] == two["tokens"]
    np.testing.assert_allclose(two["token_logprobs"], one["token_logprobs"], atol=1e-5)


@SLOW
def test_same_gradients_and_adapter(results):
    """The AdamW moments are running averages of the gradients (and their squares)."""
    *_, one_storage, two_storage = results
    one, two = _saved_state(one_storage), _saved_state(two_storage)
    assert one.step == two.step == 3
    for name in one.adapter:
        for a, b in ((one.adapter, two.adapter), (one.mu, two.mu), (one.nu, two.nu)):
            np.testing.assert_allclose(b[name], a[name], rtol=1e-5, atol=1e-7, err_msg=name)
    assert any(np.abs(one.mu[name]).max() > 0 for name in one.mu)


@SLOW
def test_resumed_run_continues_where_it_was_saved(results):
    one, two, *_ = results
    for run in (one, two):
        for a, b in zip(run["resumed"], run["trained"]):
            np.testing.assert_allclose(a, b, atol=1e-6)


@SLOW
def test_checkpoints_are_complete_folders(results, gcs):
    objects = gcs.list("two")
    folders = sorted(o.rpartition("/")[0] for o in objects if o.endswith(f"/{INFO_FILE}"))
    assert len(folders) == 2, objects
    for folder in folders:  # each process wrote its own shards of the arrays
        for process in (0, 1):
            shards = f"{folder}/state/adapter/ocdbt.process_{process}/"
            assert any(o.startswith(shards) for o in objects), (shards, objects)


# Process 0 publishes 100 messages, waits until process 1 has read them, publishes 28 more
# (the 128th publish collects), and finds the first 100 deleted from the store.
STREAM_SCRIPT = """
import sys, jax
from jax._src import distributed as d
from tinker_jax.distributed import MessageStream, initialize
initialize(sys.argv[1], 2, int(sys.argv[2]))
stream, client = MessageStream("test"), d.global_state.client
if jax.process_index() == 0:
    for i in range(100):
        stream.publish(b"m%d" % i)
    client.wait_at_barrier("read", 60_000)
    for i in range(100, 128):
        stream.publish(b"m%d" % i)
    for i in range(100):
        try:
            client.key_value_try_get_bytes("tinker_jax/stream/test/%d" % i)
            sys.exit("message %d was not deleted" % i)
        except jax.errors.JaxRuntimeError:
            pass
else:
    got = [stream.receive() for _ in range(100)]
    assert got == [b"m%d" % i for i in range(100)], got
    client.wait_at_barrier("read", 60_000)
    assert [stream.receive() for _ in range(28)] == [b"m%d" % i for i in range(100, 128)]
client.wait_at_barrier("done", 60_000)
"""


def test_message_stream_delivers_in_order_and_collects():
    address = f"127.0.0.1:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **_devices(1)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STREAM_SCRIPT, address, str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]


def test_initialize_wants_all_three_flags():
    with pytest.raises(ValueError, match="all of"):
        distributed.initialize("127.0.0.1:1234", None, 0)
    with pytest.raises(ValueError, match="outside"):
        distributed.initialize("127.0.0.1:1234", 2, 2)


def test_a_follower_takes_host_0s_deferral_of_prefix_hit_programs():
    """Whether prefix-cache hits wait for their programs follows from host 0's precompile level
    (a follower's is not used): a follower started with another level runs host 0's choice,
    and any other setting that differs still refuses to start."""
    import pickle

    from tinker_jax.errors import ValidationError
    from tinker_jax.service.engine import EngineSettings, check_settings

    class Stream:
        def __init__(self, message: object):
            self.message = pickle.dumps(message)

        def receive(self) -> bytes:
            return self.message

    models = ("m",)
    host0 = EngineSettings(defer_hit_programs=True)
    ours = check_settings(Stream((models, host0)), models, EngineSettings())
    assert ours == host0
    with pytest.raises(ValidationError, match="every process needs the same flags"):
        check_settings(Stream((models, host0)), models, EngineSettings(sampler_rows=8))


HIT_BUILT = "built the programs of a prefix-cache hit"


def _prefix_hits(server: ServerProcess) -> None:
    """Prompts that share a 40-token system prompt (two cached blocks of 16), sampled from one
    sampling client: the first caches the blocks, the second is a hit whose programs wait
    (prefilled from position 0), and the third, once host 0 has built them, is served from
    the cache. Each gets the tokens of a fresh client (a cache scope of its own: no hit)."""
    key = server.create_key("hits")
    rng = np.random.default_rng(3)
    system = [int(t) for t in rng.integers(0, 100, 40)]
    prompts = [system + [int(t) for t in rng.integers(0, 100, 8)] for _ in range(3)]
    greedy = T.SamplingParams(max_tokens=4, temperature=0.0, stop=[])
    with ServiceClient(base_url=server.address, api_key=key) as client:

        def sample(sampling_client, prompt: list[int]) -> list[int]:
            future = sampling_client.sample(T.ModelInput.from_ints(prompt), 1, greedy)
            return list(future.result(timeout=600).sequences[0].tokens)

        cached = client.create_sampling_client(base_model=server.model)
        tokens = [sample(cached, prompts[0]), sample(cached, prompts[1])]
        wait_until(lambda: HIT_BUILT in server.log.read_text(), 600, 0.5, "host 0's hit build")
        tokens.append(sample(cached, prompts[2]))
        fresh = client.create_sampling_client(base_model=server.model)
        assert tokens == [sample(fresh, prompt) for prompt in prompts]


@SLOW
def test_two_processes_defer_a_prefix_hits_programs_alike(hf_model_dir, tmp_path):
    """A two-process server that precompiles defers prefix-cache hits' programs on both hosts:
    a follower started with `--precompile none` takes host 0's choice, host 0 alone runs the
    plan and then builds the waiting hit's programs through the calls every host runs, and the
    hits before and after that build get the tokens of prompts with nothing cached. A host
    that deferred otherwise would run other programs, whose collectives never meet the other
    host's: the requests would time out."""
    model = hf_model_dir("qwen3")
    settings = tmp_path / "settings.toml"
    # A small plan: one sampler row, 64 positions, two adapters; the prefix cache holds 4 blocks.
    settings.write_text(
        "max_seq_len = 64\nsampler_rows = 1\nsampler_slots = 2\nprefix_cache_share = 1.0\n"
    )
    flags = ("--mesh", MESH, "--max-adapters", "2", "--config", str(settings))
    with _two_processes(
        model,
        tmp_path / "server",
        tmp_path / "follower.log",
        *flags,
        leader=("--precompile", "common"),
        follower=("--precompile", "none"),
    ) as leader:
        _prefix_hits(leader)
        assert leader.log.read_text().count(HIT_BUILT) == 1
