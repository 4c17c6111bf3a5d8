"""The decode program's structure, read from its compiled HLO (scripts/inspect_decode.py, in
process): no copy of a weight or of the KV cache inside a decode step, byte accounting
that adds up (every layer is in the step: the layer loop is unrolled), and a layer's base
weights read in as few matmuls as its joined kernels allow.

The model is the tiny Qwen3 of the parity tests, so a copy counts as large when its output is
as large as the smallest weight matrix of a layer (the 1 MiB of the real-size script scaled
down); the decode program compiles in a few seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from tests.hf_models import TINY_CONFIGS
from tinker_jax.models.config import config_from_hf
from tinker_jax.models.decoder import KVCache

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "inspect_decode.py"
CONFIG = config_from_hf(TINY_CONFIGS["qwen3"])


def _load_script():
    spec = importlib.util.spec_from_file_location("inspect_decode", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


inspect_decode = _load_script()


def _smallest_layer_matrix_bytes(cfg) -> int:
    e, f = cfg.hidden_size, cfg.intermediate_size
    return 4 * min(e * cfg.q_size, e * cfg.kv_size, e * f)


@pytest.fixture(scope="module")
def batch4():
    """(shape, the inspection's figures, the compiled program's HLO text) of a batch-4 decode
    with 2 adapters: the program compiled once for the module's structural tests."""
    shape = inspect_decode.DecodeShape(
        batch=4, adapters=2, context=64, rank=8, slots=3, steps=4, dtype="float32"
    )
    out = inspect_decode.inspect(CONFIG, shape, _smallest_layer_matrix_bytes(CONFIG))
    compiled, _, _ = inspect_decode.compile_decode(CONFIG, shape)
    return shape, out, compiled.as_text()


def test_the_copy_count_sees_a_scan_over_stacked_weights():
    """The HLO reading itself: a scan that multiplies by each layer of a stacked weight
    copies it out once per layer on CPU (dynamic-slice feeding a dot); weights passed one
    array per layer are read in place."""
    layers, e = 3, 256  # each layer's matrix: 256 KiB

    def scanned(w, x):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]

    def per_layer(ws, x):
        for wl in ws:
            x = jnp.tanh(x @ wl)
        return x

    def stats(fn, w):
        x = jax.ShapeDtypeStruct((8, e), jnp.float32)
        text = jax.jit(fn).lower(w, x).compile().as_text()
        return inspect_decode.hlo_stats(text, e * e * 4, {(e, e)})

    stacked = stats(scanned, jax.ShapeDtypeStruct((layers, e, e), jnp.float32))
    assert stacked["weight_copies"] == layers and stacked["step_loops"] == [layers]
    split = stats(per_layer, [jax.ShapeDtypeStruct((e, e), jnp.float32)] * layers)
    assert split["large_copies"] == split["weight_copies"] == 0
    assert split["fusions"] >= layers - 1  # tanh after each product, maybe fused with one


def test_min_bytes_add_up(batch4):
    """The analytic minimum, term by term, from the config (untied lm head: the embedding
    contributes only the rows looked up)."""
    shape, out, _ = batch4
    c = CONFIG
    e, q, kv, f, v, layers = (
        c.hidden_size,
        c.q_size,
        c.kv_size,
        c.intermediate_size,
        c.vocab_size,
        c.num_layers,
    )
    per_layer = 2 * e * q + 2 * e * kv + 3 * e * f + 2 * e + 2 * c.head_dim  # + norms, QK norm
    weights = layers * per_layer + e + e * v + shape.batch * e  # final norm, head, embed rows
    lora_in_out = 2 * (e + q) + 2 * (e + kv) + 3 * (e + f)
    adapters = shape.adapters * shape.rank * (layers * lora_in_out + e + v)  # + lm head
    kv_cache = 2 * layers * shape.batch * shape.context * kv
    assert out["min_bytes_terms"] == {
        "weights": 4 * weights,
        "adapters": 4 * adapters,
        "kv_cache": 4 * kv_cache,
    }
    assert out["min_bytes"] == sum(out["min_bytes_terms"].values())
    assert out["bytes_ratio"] == pytest.approx(out["bytes_accessed"] / out["min_bytes"])
    # XLA reads every byte it must: the step holds every layer, not a loop body counted once.
    assert out["bytes_accessed"] >= out["min_bytes"]
    assert out["fusions"] > 0 and out["kernels"] >= out["fusions"]
    assert (out["batch"], out["adapters"]) == (4, 2)


def test_decode_step_copies_no_kv_cache(batch4):
    """A step's keys and values are written in place before the next step reads the cache,
    and each layer's attention reads its slice of the cache where it lies: no copy as large as
    a weight matrix at all. (Written after the layers, the write was free to run before the
    last layer's reads, and XLA copied the whole cache twice per step; keys multiplied and
    summed unselected went to a YNNPACK kernel, which cannot take a slice, and XLA copied each
    layer's keys out for it.)"""
    _, out, _ = batch4
    assert out["large_copies"] == 0, out["copies"]


def test_a_slice_of_a_longer_cache_is_copied_before_attention():
    """Why the sampler's cache is as long as its rows reach (`Sampler._fit_cache`): attending
    over the first positions of a longer cache, XLA copies each layer's keys and values out
    of it before attention's matmuls read them, two copies per layer (and a decode step
    would do so every step: three times the cache bytes it must read); the whole cache is
    read where it lies. If the first count drops to 0, XLA reads a slice in place and the
    cache could stay max_len long."""
    from tinker_jax.models.decoder import decode_attention

    rows, kvh, group, d, attended, layers = 4, 2, 2, 16, 128, 3
    q = jax.ShapeDtypeStruct((rows, 1, kvh * group, d), jnp.float32)
    new = jax.ShapeDtypeStruct((rows, kvh, d), jnp.float32)
    positions = jax.ShapeDtypeStruct((rows, 1), jnp.int32)

    def copies(length: int) -> int:
        k_shape, v_shape = KVCache.layer_shapes(rows, kvh, length, d)
        k = [jax.ShapeDtypeStruct(k_shape, jnp.float32)] * layers
        v = [jax.ShapeDtypeStruct(v_shape, jnp.float32)] * layers

        def attend(q, ks, vs, positions, new):
            for key, value in zip(ks, vs):
                out = decode_attention(q, key[..., :attended], value[:, :, :attended], positions)
                q = q + out
            return q

        text = jax.jit(attend).lower(q, k, v, positions, new).compile().as_text()
        prefix = rows * kvh * d * attended * 4
        return inspect_decode.hlo_stats(text, prefix, set())["large_copies"]

    assert copies(4 * attended) == 2 * layers
    assert copies(attended) == 0


def test_decode_step_copies_no_random_bits():
    """Temperature sampling hashes a [rows, vocab] block of random bits per step. As JAX lowers
    the hash for GPU and TPU (unrolled, what `compile_decode` compiles), the step copies none
    of them; as it lowers it for the CPU (a loop of five rounds carrying the bits), XLA copies
    both halves into the loop every round. If the first count rises, the sampler copies its
    random bits on accelerators too; if the second falls to 0, JAX's CPU lowering no longer
    differs and `inspect_decode.accelerator_rng` can go."""
    shape = inspect_decode.DecodeShape(
        batch=32, adapters=0, context=64, rank=8, slots=1, steps=4, dtype="float32"
    )
    bits = shape.batch * CONFIG.vocab_size * 4  # one half of the hash's output

    def copies(cpu_rng: bool) -> int:
        compiled, _, _ = inspect_decode.compile_decode(CONFIG, shape, cpu_rng=cpu_rng)
        return inspect_decode.hlo_stats(compiled.as_text(), bits)["large_copies"]

    assert copies(cpu_rng=False) == 0
    assert copies(cpu_rng=True) == 2 * 5


def test_decode_step_copies_no_weight(batch4):
    """Each layer's base weights are arrays of their own, read in place by its matmuls; the
    adapters in use are gathered per layer from the stacked slots, never copied whole."""
    _, out, _ = batch4
    assert out["weight_copies"] == 0, out["copies"]


def test_decode_step_reads_a_layer_in_five_matmuls(batch4):
    """k and v are one matmul, and gate and up another (`lora.JoinedLinear`): a decode step
    runs five matmuls on each layer's base weights (q, k+v, o, gate+up, down) and one on the
    lm head; the adapters' products read no base weight. One matmul per HF projection, seven
    per layer, read the same bytes in more kernels."""
    _, out, _ = batch4
    assert out["weight_matmuls"] == 5 * CONFIG.num_layers + 1


def test_decode_step_reads_the_cache_where_it_lies(batch4):
    """Attention's products read each layer's keys and values straight from the cache: no
    kernel writes an array shaped like a layer of the cache other than the cache writes
    themselves. (Keys and values selected before the products were materialised by a select
    kernel each, a layer of the cache written and read again per layer and step; and a slice
    of a stacked cache was copied out.)"""
    shape, _, text = batch4
    comps, entry = inspect_decode.parse_hlo(text)
    loops = [i for i in comps[entry] if i.opcode == "while" and i.called("body")]
    body = max((loop.called("body")[0] for loop in loops), key=lambda c: len(comps[c]))
    layer = KVCache.layer_shapes(shape.batch, CONFIG.num_kv_heads, shape.context, CONFIG.head_dim)

    def writes_cache(instr) -> bool:
        return inspect_decode.scatter_root(instr, comps) is not None

    shaped = [
        f"{i.opcode} {i.name} {i.shape}"
        for i in comps[body]
        if i.dims in layer and i.opcode not in inspect_decode.FREE_OPS and not writes_cache(i)
    ]
    assert shaped == []
    writes = [i for i in comps[body] if writes_cache(i)]
    assert len(writes) == 2 * CONFIG.num_layers  # each layer's new keys and values


def test_decode_step_evaluates_the_rotary_sines_once(batch4):
    """A decode step evaluates its rows' rotary cosines and sines once, for every layer's
    queries and keys (`rope_rotation`, which the decode loop carries): computed inside the
    step, XLA fused them into each layer's rotation of q and of k, where they were evaluated
    per element, every head of every layer."""
    shape, _, text = batch4
    comps, entry = inspect_decode.parse_hlo(text)
    body = inspect_decode.decode_loop_of(comps, entry).called("body")[0]

    def trig(comp: str) -> list[str]:
        """The cosines and sines computed in `comp` and the computations it calls."""
        found = []
        for instr in comps[comp]:
            if instr.opcode in ("cosine", "sine"):
                found.append(f"{instr.opcode} {instr.shape}")
            for called in instr.called("calls") + instr.called("to_apply"):
                found += trig(called)
        return found

    rotation = f"[2,{shape.batch},1,1,{CONFIG.head_dim}]"
    evaluated = trig(body)
    assert sorted(op.split()[0] for op in evaluated) == ["cosine", "sine"], evaluated
    fusions = [i for i in comps[body] if i.opcode == "fusion" and trig(i.called("calls")[0])]
    assert len(fusions) == 1 and rotation in fusions[0].shape.replace(" ", "")


def test_decode_step_carries_no_keys_or_values(batch4):
    """Each layer writes its new keys and values into the cache before its attention reads
    them (`Attention.decode`): the loop carries none from one step to the next, and the step
    copies none. Carried to the next step's write, they were copied into the loop's buffers
    every step, and the new token's score took a path of its own (202 more kernels per step
    for Qwen3-1.7B at batch 1)."""
    shape, _, text = batch4
    comps, entry = inspect_decode.parse_hlo(text)
    loop = inspect_decode.decode_loop_of(comps, entry)
    body = loop.called("body")[0]
    token = (shape.batch, CONFIG.num_kv_heads, CONFIG.head_dim)
    carried = (CONFIG.num_layers,) + token
    assert f"[{','.join(map(str, carried))}]" not in loop.shape.replace(" ", "")
    copies = [i.dims for i in comps[body] if i.opcode == "copy"]
    assert token not in copies and carried not in copies, copies


def test_decode_attention_asks_for_full_fp32_products(batch4):
    """Attention's two fp32 matmuls per layer ask for HIGHEST precision: a GPU's default for
    fp32 matmuls rounds their operands to TF32 (10 bits), the softmax weights among them."""
    _, _, text = batch4
    exact = text.count("operand_precision={highest,highest}")
    assert exact >= 2 * CONFIG.num_layers


def test_a_table_lookup_counts_the_rows_it_reads():
    """XLA's cost analysis counts a fused gather of several rows as reading the whole table
    (the premise of `lookup_overcount`: if XLA stops doing so, this fails and the correction
    must go); `bytes_in_place` counts the rows read, and leaves other gathers alone."""
    vocab, embed, rows = 4096, 64, 8
    table = jax.ShapeDtypeStruct((vocab, embed), jnp.float32)
    tokens = jax.ShapeDtypeStruct((rows,), jnp.int32)
    compiled = jax.jit(lambda t, i: t[i] * 2.0).lower(table, tokens).compile()
    cost = compiled.cost_analysis()
    program = (cost[0] if isinstance(cost, list | tuple) else cost)["bytes accessed"]
    assert program >= vocab * embed * 4
    text = compiled.as_text()
    raw, in_place = inspect_decode.step_bytes(text, program, 1, (vocab, embed))
    assert raw == program
    assert 2 * rows * embed * 4 <= in_place <= 3 * rows * embed * 4 + 1024
    other = inspect_decode.step_bytes(text, program, 1, (vocab, 2 * embed))
    assert other == (program, program)


def test_per_call_work_is_shared_by_the_calls_steps(batch4):
    """`bytes_accessed` is a decode step's: the loop body's bytes (XLA's cost analysis of
    that computation alone) plus the rest of the program over the steps of a call."""
    shape, out, text = batch4
    comps, entry = inspect_decode.parse_hlo(text)
    body = inspect_decode.decode_loop_of(comps, entry).called("body")[0]
    per_step = inspect_decode.computation_bytes(text, body)
    per_call = out["program_bytes"] - per_step
    assert per_call > 0 and per_step >= out["min_bytes"]
    assert out["bytes_accessed"] == int(per_step + per_call / shape.steps)
    assert out["bytes_in_place"] <= out["bytes_accessed"] < out["program_bytes"]


def _body_matmuls(shape) -> int:
    """Matmuls (dots, or fusions holding one) in the decode loop's body of `shape`."""
    compiled, _, _ = inspect_decode.compile_decode(CONFIG, shape)
    comps, entry = inspect_decode.parse_hlo(compiled.as_text())
    body = inspect_decode.decode_loop_of(comps, entry).called("body")[0]
    return sum(inspect_decode.is_matmul(i, comps) for i in comps[body])


def test_base_model_rows_decode_without_adapter_products():
    """Rows all on the base model run a program of their own (no group slots): its matmuls
    are the layers' weights (five each), attention's two per layer and the lm head, where
    one adapter's program adds its A and B products."""
    base = inspect_decode.DecodeShape(batch=2, adapters=0, context=32, rank=4, slots=2, steps=2)
    one = dataclasses.replace(base, adapters=1)
    layers = CONFIG.num_layers
    assert _body_matmuls(base) == 5 * layers + 2 * layers + 1
    assert _body_matmuls(one) > _body_matmuls(base)


def test_decode_step_copies_no_adapter_in_use(batch4):
    """The adapters in use are gathered and laid side by side ([in, groups * rank]) once per
    call, outside the decode loop: no copy inside a step as large as one module's A columns.
    (Folded into the matmul, their transposition was a copy per module, layer and step.)"""
    shape, _, text = batch4
    columns = CONFIG.hidden_size * shape.adapters * shape.rank * 4  # bytes, the narrowest A's
    stats = inspect_decode.hlo_stats(text, columns)
    assert stats["large_copies"] == 0, stats["copies"]
