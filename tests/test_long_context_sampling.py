"""Long-context sampling: prompts prefilled a chunk at a time, the KV cache split over the
`sequence` mesh axis (decode merging the shards' softmaxes), the memory plan that counts both,
and a server on a `sequence=4` mesh that trains and samples as a one-device server does."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from tests.hf_models import QWEN3_8B, TINY_CONFIGS, save_hf_model
from tests.server_process import ServerProcess
from tests.sft_data import sft_data
from tests.xla_env import xla_flags
from tinker_jax import ServiceClient
from tinker_jax import types as T
from tinker_jax.errors import ValidationError
from tinker_jax.lora import LoRASpec
from tinker_jax.memory import plan_memory
from tinker_jax.models.config import config_from_hf
from tinker_jax.models.decoder import KVCache
from tinker_jax.sampler import Sampler, SampleRequest
from tinker_jax.sampling import SamplingParams
from tinker_jax.service.config import ServerConfig
from tinker_jax.sharding import logical_to_spec, make_mesh
from tinker_jax.weights import load_model

VOCAB = TINY_CONFIGS["qwen3"]["vocab_size"]
CONTEXT = 4096
CHUNK = 1024  # prompts of 1.3k and 1.9k positions: two chunks, the last partly padding
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, stop=[])
EIGHT = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (CPU) devices")


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """The tiny Qwen3 (2 layers, GQA) with a 4k context."""
    config = dict(TINY_CONFIGS["qwen3"], max_position_embeddings=CONTEXT)
    return save_hf_model(tmp_path_factory.mktemp("long_sampling"), config)


def _samplers(folder, mesh_shape, chunks):
    """Samplers on one model (its base weights shared), one per prefill chunk, each holding
    the same two random adapters (slots 0 and 1)."""
    n = int(np.prod(list(mesh_shape.values()))) if mesh_shape else 1
    mesh = make_mesh(mesh_shape, devices=jax.devices()[:n])
    model, _ = load_model(str(folder), lora=LoRASpec(2, 4), mesh=mesh, attention="chunked")
    samplers = []
    for chunk in chunks:
        sampler = Sampler.sharing_base(
            model, mesh, slots=2, rows=4, max_len=CONTEXT, steps_per_call=8, prefill_chunk=chunk
        )
        rng = np.random.default_rng(5)
        shapes = sampler.layout.slot_shapes(sampler.lora)
        for _ in range(2):
            arrays = {
                leaf.name: 0.05 * rng.standard_normal(shape)
                for leaf, shape in zip(sampler.layout.leaves, shapes)
            }
            sampler.load_adapter(arrays, 1.0)
        samplers.append(sampler)
    return samplers


def _requests():
    """Prompts of 1.9k and 1.3k tokens under the two adapters, in one batch: greedy
    tokens, prompt logprobs and top-2 prompt logprobs; the second with two samples."""
    rng = np.random.default_rng(11)
    long, shorter = (rng.integers(0, VOCAB, n).tolist() for n in (1900, 1300))
    return [
        SampleRequest(long, 1, GREEDY, 0, include_prompt_logprobs=True, topk_prompt_logprobs=2),
        SampleRequest(shorter, 2, GREEDY, 1, include_prompt_logprobs=True),
    ]


def _assert_same(got, want):
    for a, b in zip(got, want):
        for sa, sb in zip(a.sequences, b.sequences):
            assert sa.tokens == sb.tokens
            np.testing.assert_allclose(sa.logprobs, sb.logprobs, atol=1e-5, rtol=0)
        assert a.prompt_logprobs[0] is None and b.prompt_logprobs[0] is None
        np.testing.assert_allclose(a.prompt_logprobs[1:], b.prompt_logprobs[1:], atol=1e-5, rtol=0)
        if b.topk_prompt_logprobs is not None:
            for ta, tb in zip(a.topk_prompt_logprobs[1:], b.topk_prompt_logprobs[1:]):
                assert [t for t, _ in ta] == [t for t, _ in tb]
                np.testing.assert_allclose([x for _, x in ta], [x for _, x in tb], atol=1e-5)


@pytest.fixture(scope="module")
def one_device(long_model):
    """(unchunked results, the chunked sampler's results and its program trace counts)."""
    whole, chunked = _samplers(long_model, None, (CONTEXT, CHUNK))
    return whole.sample(_requests()), chunked.sample(_requests()), chunked.trace_counts


def test_chunked_prefill_equals_one_prefill(one_device):
    """Greedy tokens identical, sampled and prompt logprobs (and top-k) within 1e-5 in fp32,
    with two adapters in one batch (one request's two samples in two rows, which both get
    every chunk); the chunked sampler ran its chunk-continuing programs."""
    whole, chunked, traced = one_device
    _assert_same(chunked, whole)
    assert any("_rows" in name for name in traced), traced
    assert len(whole[1].sequences) == 2


@EIGHT
@pytest.mark.slow  # compiles the sampler for an 8-device mesh: a minute or more on 2 cores
def test_sequence_sharded_sampling_equals_one_device(long_model, one_device):
    """On a data=1, fsdp=2, sequence=4 mesh, the cache's positions split four ways, chunked
    prefill and decode give the one-device results."""
    (sampler,) = _samplers(long_model, {"fsdp": 2, "sequence": 4}, (CHUNK,))
    results = sampler.sample(_requests())
    # The cache is as long as the rows reached (a bucket below max_len), split four ways.
    assert sampler.cache_len < CONTEXT
    for layer, axis in ((sampler.cache.k[0], 3), (sampler.cache.v[0], 2)):  # positions' axis
        assert layer.sharding.spec[axis] == "sequence"
        assert layer.addressable_shards[0].data.shape[axis] == sampler.cache_len // 4
    _assert_same(results, one_device[0])


@EIGHT
def test_decode_on_a_split_cache_moves_no_cache_positions():
    """The decode program on a sequence=4 mesh reads each device's own block of the cache:
    no all-gather or collective permute (only the small all-reduces of the softmax merge),
    and no more copies of a layer's cache slice than on one device."""
    from tests.test_decode_structure import inspect_decode
    from tinker_jax.sampler import CACHE_AXES, KEY_CACHE_AXES, decode_arg_shapes, decode_loop

    cfg, context = config_from_hf(TINY_CONFIGS["qwen3"]), 1024
    shape = inspect_decode.DecodeShape(
        batch=4, adapters=2, context=context, rank=8, slots=3, steps=2, dtype="float32"
    )
    graphdef, lora, base = inspect_decode.abstract_model(cfg, shape)
    shapes = KVCache.layer_shapes(4, cfg.num_kv_heads, context, cfg.head_dim)  # a layer's
    block = context // 4
    read = 4 * block * cfg.num_kv_heads * cfg.head_dim * 4  # a device's keys of one layer

    def compiled(shards: int) -> str:
        mesh = make_mesh({"sequence": shards}, devices=jax.devices()[:shards])

        def layer(axes, layer_shape):
            sharding = NamedSharding(mesh, logical_to_spec(axes, layer_shape, mesh))
            return jax.ShapeDtypeStruct(layer_shape, jnp.float32, sharding=sharding)

        k, v = layer(KEY_CACHE_AXES, shapes[0]), layer(CACHE_AXES, shapes[1])
        cache = KVCache.of(lambda: k, lambda: v, cfg.num_layers)
        shardings = KVCache.of(lambda: k.sharding, lambda: v.sharding, cfg.num_layers)
        fn = functools.partial(decode_loop, graphdef, shape.steps, max_len=context)
        with jax.set_mesh(mesh):
            jitted = jax.jit(fn, donate_argnums=(2,), out_shardings=(shardings, None, None))
            return jitted.lower(lora, base, cache, decode_arg_shapes(4, 2)).compile().as_text()

    split, whole = compiled(4), compiled(1)
    assert "all-gather" not in split and "collective-permute" not in split
    assert "all-reduce" in split
    copies = [
        inspect_decode.hlo_stats(text, read, set())["large_copies"] for text in (split, whole)
    ]
    assert copies[0] <= copies[1], copies


def test_prefill_chunk_is_validated(tmp_path):
    for bad in (0, 8, 1000, True, 1 << 21):
        with pytest.raises(ValidationError, match="prefill_chunk"):
            ServerConfig(base_models=("m",), storage=tmp_path, prefill_chunk=bad)
    assert ServerConfig(base_models=("m",), storage=tmp_path, prefill_chunk=512).prefill_chunk


def _plan(mesh, max_seq_len=131072, prefill_chunk=2048, n_devices=4, model=TINY_CONFIGS["qwen3"]):
    cfg = config_from_hf(dict(model, max_position_embeddings=131072))
    return plan_memory(
        cfg,
        mesh_shape=mesh,
        n_devices=n_devices,
        dtype="float32",
        max_adapters=2,
        max_lora_rank=4,
        sampler_slots=2,
        sampler_rows=2,
        max_seq_len=max_seq_len,
        train_batch_tokens=4096,
        attention="chunked",
        prefill_chunk=prefill_chunk,
    )


def test_memory_plan_splits_the_cache_and_bounds_prefill_by_the_chunk():
    """The KV cache per device divides by the sequence axis; the prefill working set grows
    with the context only by the one layer's prefix keys and values it reads whole (and
    joins with the chunk's), where an unchunked prefill's grows with every activation."""
    one, four = _plan({"data": 1, "fsdp": 1}, n_devices=1), _plan({"sequence": 4})
    assert four.kv_cache * 4 == one.kv_cache

    def growth(chunk, model=TINY_CONFIGS["qwen3"]):
        short, long = (_plan({"sequence": 4}, n, chunk, model=model) for n in (65536, 131072))
        return long.sampler_prefill - short.sampler_prefill

    cfg = TINY_CONFIGS["qwen3"]
    rows, kv = 2, cfg["num_key_value_heads"] * cfg["head_dim"]
    assert growth(1024) == 4 * rows * 65536 * kv * 4
    assert growth(1 << 17, QWEN3_8B) > 4 * growth(1024, QWEN3_8B)
    assert "chunks of 1024" in _plan({"sequence": 4}, prefill_chunk=1024).format()


def test_serve_refuses_a_max_seq_len_that_does_not_fit(long_model, tmp_path, monkeypatch, capsys):
    """`serve --max-seq-len N` on a device of known memory: refused before any weight is
    loaded, with the plan's numbers and the flags that would shrink it."""
    from tinker_jax import memory
    from tinker_jax.service.cli import main

    monkeypatch.setattr(memory, "device_memory_bytes", lambda device: 64 << 20)
    argv = ["serve", "--base-model", str(long_model), "--storage", str(tmp_path / "s")]
    assert main([*argv, "--max-seq-len", "4096", "--max-adapters", "2"]) == 2
    err = capsys.readouterr().err
    assert "error: memory: needs" in err and "57.6 MiB available" in err, err
    assert "--max-seq-len (now 4096)" in err and "--prefill-chunk" in err, err


# ------------------------------------------------------------------ end to end


def _session(server: ServerProcess):
    """A few training steps and a greedy sample through the client: (losses, tokens)."""
    with ServiceClient(base_url=server.address, api_key=server.keys["alice"]) as client:
        caps = client.get_server_capabilities()
        limit = caps.supported_models[0].max_context_length
        tc = client.create_lora_training_client(server.model, rank=4, seed=3)
        data = sft_data(2, [96, 70])
        losses = []
        for _ in range(3):
            out = tc.forward_backward(data, "cross_entropy").result(timeout=300)
            losses.append(out.metrics["loss:sum"])
            tc.optim_step(T.AdamParams(learning_rate=1e-2)).result(timeout=300)
        sampler = tc.save_weights_and_get_sampling_client()
        prompt = T.ModelInput.from_ints([int(t) for t in np.arange(200) % VOCAB])
        params = T.SamplingParams(max_tokens=12, temperature=0.0, stop=[])
        result = sampler.sample(prompt, 1, params, include_prompt_logprobs=True).result(timeout=300)
        return limit, losses, result.sequences[0].tokens, result.prompt_logprobs


@pytest.mark.slow  # a server of its own on 8 devices: its start-up and compilations, minutes
@EIGHT
def test_sequence_mesh_server_trains_and_samples_as_one_device(shared_server, tmp_path):
    """A server on data=1, fsdp=2, sequence=4 (8 CPU devices) prefilling 64 positions at a
    time: the same losses (fp32, 1e-5) and greedy tokens as the one-device shared server, and
    its capabilities report the configured context."""
    sharded = ServerProcess(
        shared_server.model,
        tmp_path / "storage",
        "--mesh",
        "data=1,fsdp=2,sequence=4,tensor=1",
        "--max-seq-len",
        "256",
        "--prefill-chunk",
        "64",
        env={"XLA_FLAGS": xla_flags(devices=8)},
        users=("alice",),
    )
    try:
        limit, losses, tokens, prompt_lp = _session(sharded)
    finally:
        sharded.stop()
    want_limit, want_losses, want_tokens, want_prompt_lp = _session(
        shared_server.with_users("long_sampling", "alice")
    )
    assert (limit, want_limit) == (256, TINY_CONFIGS["qwen3"]["max_position_embeddings"])
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert tokens == want_tokens
    np.testing.assert_allclose(prompt_lp[1:], want_prompt_lp[1:], atol=1e-5)
