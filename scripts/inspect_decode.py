"""What a decode step reads, from its compiled program: no weights in memory, no accelerator.

Lowers and compiles the sampler's decode program (`tinker_jax.sampler.decode_loop`, the one
`Sampler` runs) for a model's real shapes from abstract arrays (`jax.ShapeDtypeStruct`) on the
local backend, then compares it with what a decode step must read at least:

  min_bytes       every base weight once (the embedding table: only the rows looked up, unless
                  it is the tied lm head), each distinct adapter in use once, and the keys and
                  values of every row over the attended prefix (`--context` positions)
  bytes_accessed  XLA's `cost_analysis()` bytes per decode step: those of one iteration of the
                  decode loop (the layers are unrolled in it, so every layer counts) plus those
                  that run once per call (the adapters in use gathered out of their slots)
                  shared by the call's `--steps-per-call` steps.
                  XLA's figure for the whole program, which counts the loop's body once and
                  the per-call work whole, is `program_bytes`
  bytes_in_place  the same with two of XLA's fusion counts replaced by what the operation
                  moves: a cache write (a scatter into the donated cache) at the size of its
                  updates, where XLA counts a fused scatter as reading and writing its whole
                  operand though it updates the buffer in place (and counts the same update
                  made by a dynamic-update-slice at its own size); and a lookup of several rows
                  of the embedding table at the rows it reads, where XLA counts a fused gather
                  from the table as reading all of it (and one row's lookup, a dynamic-slice,
                  at its own size)
  large_copies    copy / dynamic-slice / slice instructions, or fusions that do nothing else,
                  whose output is at least `--copy-mib` MiB, per decode step (inside a loop of
                  known trip count counted once per iteration); those shaped like a weight are
                  also counted as `weight_copies`. The cache is compiled as the sampler holds
                  it, `--context` positions long; a slice of a longer cache would show here, 2
                  copies per layer and step (`Sampler._fit_cache`)
  fusions         fusion instructions (kernels) per decode step, and `kernels`: every
                  instruction that does work (fusions, dots, copies, sorts...), per decode step
  weight_matmuls  matmuls (dots, or fusions holding one) with an operand shaped like a base
                  weight matrix, per decode step: one per matrix of a layer, k and v together
                  and gate and up together (their kernels are joined), plus the lm head

When the step itself holds a loop, `bytes_accessed` counts its body once: `step_loops` names
the trip counts (a few small arrays; the layers are no loop).

The program is the one a GPU or TPU compiles, built by the local CPU compiler, with one
difference JAX itself makes between platforms, undone here: it lowers the threefry hash of
temperature sampling's random bits for the CPU as a loop of five rounds (a smaller program to
compile), for GPU and TPU unrolled. The loop carries the step's bits, [rows, vocab] uint32
twice, and XLA copies them into it: at batch 64 of Qwen3's vocabulary, 10 copies of 37 MiB
per step that no accelerator's program holds. `compile_decode` lowers the hash unrolled, as
accelerators do (`accelerator_rng`); the bits drawn are the same.

    python scripts/inspect_decode.py --preset qwen3-1.7b --batch 1
    python scripts/inspect_decode.py --preset qwen3-1.7b --batch 64 --adapters 4 --json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_models, when imported by a test

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_models import PRESETS  # noqa: E402  (applies the engine's XLA flags; JAX reads them when its backend starts)
from flax import nnx  # noqa: E402

from tinker_jax.lora import LoRAParam, LoRASpec  # noqa: E402
from tinker_jax.models.config import ModelConfig, config_from_hf  # noqa: E402
from tinker_jax.models.decoder import KVCache, Transformer  # noqa: E402
from tinker_jax.sampler import decode_arg_shapes, decode_loop  # noqa: E402
from tinker_jax.sharding import make_mesh  # noqa: E402

MIB = 1 << 20
DTYPE_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
}
# Instructions that launch nothing: they name, pack or reinterpret buffers.
FREE_OPS = {
    "parameter",
    "constant",
    "get-tuple-element",
    "tuple",
    "bitcast",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
}
COPY_OPS = {"copy", "dynamic-slice", "slice"}
# A fusion made only of these moves data and computes nothing: a copy by another name.
MOVE_OPS = COPY_OPS | FREE_OPS | {"reshape", "transpose", "broadcast", "convert"}


def preset_config(name: str) -> ModelConfig:
    """The `ModelConfig` of a scripts/bench_models.py preset (e.g. "qwen3-1.7b")."""
    p = PRESETS[name]
    hf = dict(
        model_type=p["family"],
        vocab_size=p["vocab"],
        hidden_size=p["hidden"],
        intermediate_size=p["intermediate"],
        num_hidden_layers=p["layers"],
        num_attention_heads=p["heads"],
        num_key_value_heads=p["kv_heads"],
        head_dim=p["head_dim"],
        max_position_embeddings=40960,
        tie_word_embeddings=p["tied"],
        rope_theta=1_000_000.0,
    )
    if p["family"] == "qwen3_moe":
        hf.update(
            num_experts=p["experts"],
            num_experts_per_tok=p["experts_per_token"],
            moe_intermediate_size=p["moe_intermediate"],
            norm_topk_prob=True,
        )
    return config_from_hf(hf)


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """What one decode call is compiled for: `batch` cache rows attending all `context`
    positions of the cache (as long as its rows reach, `Sampler._fit_cache`), `adapters`
    distinct adapters among them (0: every row on the base model), rank `rank`, out of a
    sampler with `slots` adapter slots, `steps` decode steps per call."""

    batch: int
    adapters: int = 1
    context: int = 1024
    rank: int = 32
    slots: int = 8
    steps: int = 16
    dtype: str = "bfloat16"


def default_dtype(preset: str) -> str:
    """The preset's dtype, except on CPU: XLA's CPU dots upcast 16-bit operands, so every
    bf16 weight would show as a converted copy that no accelerator makes."""
    return "float32" if jax.default_backend() == "cpu" else PRESETS[preset]["dtype"]


def abstract_model(cfg: ModelConfig, shape: DecodeShape):
    """(graphdef, lora, base) of the model with abstract leaves: nothing is allocated."""
    lora = LoRASpec(max(shape.slots, shape.adapters, 1), shape.rank)
    model = nnx.eval_shape(
        lambda: Transformer(cfg, lora=lora, dtype=jnp.dtype(shape.dtype), rngs=nnx.Rngs(0))
    )
    return nnx.split(model, LoRAParam, ...)


def min_bytes(cfg: ModelConfig, shape: DecodeShape, lora, base) -> dict[str, int]:
    """The least a decode step can read, by component (see the module docstring).

    A MoE layer's experts count in proportion to those a step can reach (batch * k of them,
    at most all)."""
    weights = 0
    for path, var in nnx.to_flat_state(base):
        name = ".".join(map(str, path))
        size = math.prod(var.shape) * jnp.dtype(var.dtype).itemsize
        if name == "embed_tokens" and not cfg.tie_word_embeddings:
            size = size // cfg.vocab_size * min(shape.batch, cfg.vocab_size)
        elif "experts" in name and cfg.moe is not None:
            reach = min(cfg.moe.num_experts, shape.batch * cfg.moe.experts_per_token)
            size = size * reach // cfg.moe.num_experts
        weights += size
    adapter = 0
    for _, var in nnx.to_flat_state(lora):
        slots = var.shape[var.get_metadata("logical_axes").index("slots")]
        adapter += math.prod(var.shape) // slots * jnp.dtype(var.dtype).itemsize
    itemsize = jnp.dtype(shape.dtype).itemsize
    kv = 2 * cfg.num_layers * shape.batch * shape.context * cfg.kv_size * itemsize
    return {"weights": weights, "adapters": adapter * shape.adapters, "kv_cache": kv}


def weight_shapes(base, lora) -> set[tuple[int, ...]]:
    """Shapes of every parameter and of its slices along leading axes (one layer's, one
    slot's...), without axes of size 1."""
    shapes = set()
    for _, var in [*nnx.to_flat_state(base), *nnx.to_flat_state(lora)]:
        dims = tuple(var.shape)
        shapes.update(_squeeze(dims[lead:]) for lead in range(len(dims) - 1))
    return shapes


def matrix_shapes(base) -> set[tuple[int, ...]]:
    """Shapes of the base weight matrices (parameters of two or more axes) as a matmul may
    read them: as stored, and flattened to [in, out] (a joined kernel [in, members, out]),
    without axes of size 1."""
    shapes = set()
    for _, var in nnx.to_flat_state(base):
        dims = tuple(var.shape)
        if len(dims) >= 2:
            shapes.update({_squeeze(dims), _squeeze((dims[0], math.prod(dims[1:])))})
    return shapes


def _squeeze(dims: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Dims without those of size 1 (a layer's slice keeps its layer axis as 1)."""
    return None if dims is None else tuple(d for d in dims if d != 1)


@contextlib.contextmanager
def accelerator_rng():
    """Inside, JAX lowers the threefry hash for the CPU as it does for GPU and TPU: unrolled,
    not as a loop of five rounds (module docstring). JAX has no public switch for this: the
    rules are its private functions, which fail here loudly if they move."""
    from jax._src.random import threefry2x32 as threefry
    from jax.interpreters import mlir

    rule = functools.partial(mlir.register_lowering, threefry.threefry2x32_p, platform="cpu")
    rule(threefry._threefry2x32_lowering_rule, inline=False)
    try:
        yield
    finally:
        rule(threefry._threefry2x32_cpu_lowering_rule)


def compile_decode(cfg: ModelConfig, shape: DecodeShape, cpu_rng: bool = False):
    """(compiled decode program, lora, base): `decode_loop` as `Sampler._decode` jits it
    (the cache donated), for abstract weights, cache and rows; the random bits' hash lowered
    as on GPU and TPU (`accelerator_rng`), or with `cpu_rng` as JAX lowers it for the CPU."""
    graphdef, lora, base = abstract_model(cfg, shape)
    dtype = jnp.dtype(shape.dtype)
    shapes = KVCache.layer_shapes(shape.batch, cfg.num_kv_heads, shape.context, cfg.head_dim)
    k, v = (jax.ShapeDtypeStruct(s, dtype) for s in shapes)
    cache = KVCache.of(lambda: k, lambda: v, cfg.num_layers)
    groups = 1 << (shape.adapters - 1).bit_length() if shape.adapters else 0
    rows = decode_arg_shapes(shape.batch, groups)
    fn = functools.partial(decode_loop, graphdef, shape.steps, max_len=shape.context)
    mesh = make_mesh(devices=jax.devices()[:1])
    rng = contextlib.nullcontext() if cpu_rng else accelerator_rng()
    with jax.set_mesh(mesh), rng:
        lowered = jax.jit(fn, donate_argnums=(2,)).lower(lora, base, cache, rows)
    return lowered.compile(), lora, base


# ---------------------------------------------------------------- optimised HLO text

_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    attrs: str
    root: bool

    @property
    def bytes(self) -> int:
        """Bytes of the output (all elements of a tuple)."""
        return sum(
            DTYPE_BYTES.get(dt, 0) * math.prod(int(d) for d in dims.split(",") if d)
            for dt, dims in _SHAPE.findall(self.shape)
        )

    @property
    def dims(self) -> tuple[int, ...] | None:
        found = _SHAPE.findall(self.shape)
        if len(found) != 1:
            return None
        return tuple(int(d) for d in found[0][1].split(",") if d)

    def operands(self) -> list[str]:
        """Names of the operands (`dot(f32[4,8]{1,0} %a, %b), ...` -> ["a", "b"])."""
        return re.findall(r"%([\w.\-]+)", self.attrs.split(")", 1)[0])

    def called(self, key: str) -> list[str]:
        """The computations named by attribute `key` (`body=%b`, `calls=%f`,
        `branch_computations={%x, %y}`)."""
        m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attrs)
        return [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",")] if m else []


def _split_shape(rest: str) -> tuple[str, str]:
    """`(f32[2], s32[]) tuple(...)` or `f32[2]{0} add(...)` -> (shape, the rest)."""
    if rest.startswith("("):
        depth = 0
        for i, c in enumerate(rest):
            depth += (c == "(") - (c == ")")
            if depth == 0:
                return rest[: i + 1], rest[i + 1 :].strip()
    shape, _, tail = rest.partition(" ")
    return shape, tail


def parse_hlo(text: str) -> tuple[dict[str, list[Instr]], str]:
    """Computations of an HLO module's text by name, and the entry's name."""
    comps: dict[str, list[Instr]] = {}
    entry, current = "", None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and not line.startswith(" "):
            current = header.group(2)
            comps[current] = []
            entry = current if header.group(1) else entry
            continue
        m = _INSTR.match(line)
        if current is None or not m:
            continue
        shape, tail = _split_shape(m.group(3))
        opcode, _, attrs = tail.partition("(")
        comps[current].append(Instr(m.group(2), shape, opcode.strip(), attrs, bool(m.group(1))))
    return comps, entry


def _trip_count(instr: Instr) -> int | None:
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.attrs)
    return int(m.group(1)) if m else None


def is_matmul(instr: Instr, comps: dict[str, list[Instr]]) -> bool:
    """A dot, or a fusion holding one (at any depth)."""
    if instr.opcode == "dot":
        return True
    return instr.opcode == "fusion" and any(
        is_matmul(i, comps) for i in comps[instr.called("calls")[0]]
    )


def hlo_stats(
    text: str,
    threshold: int,
    weights: set[tuple[int, ...]] = frozenset(),
    matrices: set[tuple[int, ...]] = frozenset(),
) -> dict:
    """Per decode step, from optimised HLO text: fusions, kernels, copies whose output is at
    least `threshold` bytes (and those shaped like a weight), matmuls with an operand of a
    shape in `matrices` (`matrix_shapes`), and the trip counts of loops inside the step.
    The step is the body of the entry's while loop (the decode loop); a nested loop's body
    counts once per iteration, a conditional's largest branch once."""
    comps, entry = parse_hlo(text)
    by_name = {c: {i.name: i for i in instrs} for c, instrs in comps.items()}
    loop = decode_loop_of(comps, entry)
    step = loop.called("body")[0] if loop else entry
    stats = {
        "fusions": 0,
        "kernels": 0,
        "large_copies": 0,
        "weight_copies": 0,
        "weight_matmuls": 0,
    }
    copies: dict[str, tuple[str, int]] = {}
    nested: list[int] = []

    def moves_only(comp: str) -> bool:
        return all(
            i.opcode in MOVE_OPS or (i.opcode == "fusion" and moves_only(i.called("calls")[0]))
            for i in comps[comp]
        )

    def reads_matrix(instr: Instr, comp: str) -> bool:
        """A dot, or a fusion holding one (its parameters are its operands), with an operand
        shaped like a base weight matrix."""
        if instr.opcode == "dot":
            inputs = [by_name[comp][name] for name in instr.operands()]
        elif instr.opcode == "fusion" and is_matmul(instr, comps):
            inputs = [i for i in comps[instr.called("calls")[0]] if i.opcode == "parameter"]
        else:
            return False
        return any(_squeeze(i.dims) in matrices for i in inputs)

    def count_copy(instr: Instr, weight: int) -> None:
        if instr.bytes < threshold:
            return
        stats["large_copies"] += weight
        stats["weight_copies"] += weight * (_squeeze(instr.dims) in weights)
        copies[instr.name] = (f"{instr.opcode} {instr.shape}", weight)

    def walk(comp: str, weight: int) -> dict[str, int]:
        counts = {"fusions": 0, "kernels": 0}
        for instr in comps[comp]:
            if instr.opcode == "while":
                trip = _trip_count(instr)
                nested.append(trip or 0)
                inner = walk(instr.called("body")[0], weight * (trip or 1))
                for k in counts:
                    counts[k] += inner[k] * (trip or 1)
            elif instr.opcode == "conditional":
                branches = instr.called("branch_computations") or [
                    *instr.called("true_computation"),
                    *instr.called("false_computation"),
                ]
                inner = [walk(b, weight) for b in branches]
                for k in counts:
                    counts[k] += max(c[k] for c in inner)
            elif instr.opcode == "call":
                inner = walk(instr.called("to_apply")[0], weight)
                for k in counts:
                    counts[k] += inner[k]
            elif instr.opcode not in FREE_OPS:
                counts["kernels"] += 1
                stats["weight_matmuls"] += weight * reads_matrix(instr, comp)
                if instr.opcode == "fusion":
                    counts["fusions"] += 1
                    if moves_only(instr.called("calls")[0]):
                        count_copy(instr, weight)
                elif instr.opcode in COPY_OPS:
                    count_copy(instr, weight)
        return counts

    stats.update(walk(step, 1))
    stats["step_loops"] = nested
    stats["copies"] = copies
    return stats


def scatter_root(instr: Instr, comps: dict[str, list[Instr]]) -> tuple[Instr, str] | None:
    """(the scatter, the fused computation holding it, or "") when `instr` is a scatter or a
    fusion whose root is one (a write into the KV cache), else None."""
    if instr.opcode == "scatter":
        return instr, ""
    if instr.opcode != "fusion":
        return None
    comp = instr.called("calls")[0]
    root = next((i for i in comps[comp] if i.root), None)
    return (root, comp) if root is not None and root.opcode == "scatter" else None


def decode_loop_of(comps: dict[str, list[Instr]], entry: str) -> Instr | None:
    """The entry's while loop of unknown trip count (the decode loop: it may stop early)."""
    loops = [i for i in comps[entry] if i.opcode == "while" and _trip_count(i) is None]
    return loops[0] if len(loops) == 1 else None


def computation_bytes(text: str, name: str) -> float:
    """XLA's cost analysis (bytes accessed) of computation `name` of an optimised HLO module,
    as if it were the module's entry: its share of the whole program's figure.

    XLA offers its cost analysis for whole modules only, so the module's text is parsed
    again with `name` as its entry (its input/output aliasing, which names the old entry's
    outputs, left out)."""
    from jax._src.lib import xla_client
    from jaxlib import _hlo

    lines = []
    for line in text.splitlines():
        if line.startswith("HloModule"):
            line = line.split(",", 1)[0]
        elif line.startswith("ENTRY "):
            line = line[len("ENTRY ") :]
        elif re.match(rf"%?{re.escape(name)}\s*\(", line):
            line = "ENTRY " + line
        lines.append(line)
    module = _hlo.hlo_module_from_text("\n".join(lines))
    client = jax.devices()[0].client
    return xla_client._xla.hlo_module_cost_analysis(client, module)["bytes accessed"]


def write_overcount(instr: Instr, comp: str, comps: dict[str, list[Instr]], by_name: dict) -> int:
    """What XLA's cost analysis counts for `instr` (of computation `comp`), if it writes the
    KV cache (a scatter, or a fusion whose root is one), beyond what the write moves: twice
    its output (a read and a write of the whole donated buffer) minus twice its updates;
    else 0."""
    found = scatter_root(instr, comps)
    if found is None:
        return 0
    scatter, inner = found
    updates = by_name[inner or comp][scatter.operands()[2]]
    return 2 * (instr.bytes - updates.bytes)


def lookup_overcount(instr: Instr, comps: dict[str, list[Instr]], table: tuple[int, ...]) -> int:
    """What XLA's cost analysis counts for `instr`, if it is a fusion gathering rows of an
    operand shaped `table` (the embedding table), beyond the rows gathered: the whole table
    minus the gathered rows; else 0."""
    if instr.opcode != "fusion":
        return 0
    fused = comps[instr.called("calls")[0]]
    params = {i.name: i for i in fused if i.opcode == "parameter"}
    over = 0
    for gather in (i for i in fused if i.opcode == "gather"):
        operand = params.get(gather.operands()[0])
        if operand is not None and _squeeze(operand.dims) == table:
            over += operand.bytes - gather.bytes
    return over


def overcounts(text: str, table: tuple[int, ...]) -> dict[str, int]:
    """`write_overcount` + `lookup_overcount` summed over the top-level instructions of each
    computation that `bytes_accessed` counts: the entry and the decode loop's body."""
    comps, entry = parse_hlo(text)
    by_name = {c: {i.name: i for i in instrs} for c, instrs in comps.items()}
    loop = decode_loop_of(comps, entry)
    counted = [entry] + ([loop.called("body")[0]] if loop else [])
    return {
        comp: sum(
            write_overcount(i, comp, comps, by_name) + lookup_overcount(i, comps, table)
            for i in comps[comp]
        )
        for comp in counted
    }


def step_bytes(
    text: str, program: float, steps: int, table: tuple[int, ...]
) -> tuple[float, float]:
    """(XLA's bytes per decode step, the same in place): the decode loop's body once plus
    the rest of the program (what runs once per call) over `steps` (see the module
    docstring). A program without a decode loop is one step."""
    comps, entry = parse_hlo(text)
    loop = decode_loop_of(comps, entry)
    over = overcounts(text, table)
    if loop is None:
        return program, program - over[entry]
    body = loop.called("body")[0]
    per_step = computation_bytes(text, body)
    per_call = program - per_step
    raw = per_step + per_call / steps
    return raw, raw - over[body] - over[entry] / steps


def inspect(cfg: ModelConfig, shape: DecodeShape, copy_bytes: int = MIB) -> dict:
    """The figures of the module docstring for one decode shape."""
    start = time.perf_counter()
    compiled, lora, base = compile_decode(cfg, shape)
    compile_s = time.perf_counter() - start
    cost = compiled.cost_analysis()
    program = (cost[0] if isinstance(cost, list | tuple) else cost)["bytes accessed"]
    need = min_bytes(cfg, shape, lora, base)
    text = compiled.as_text()
    stats = hlo_stats(text, copy_bytes, weight_shapes(base, lora), matrix_shapes(base))
    total = sum(need.values())
    table = _squeeze((cfg.vocab_size, cfg.hidden_size))
    per_step, in_place = step_bytes(text, program, shape.steps, table)
    return {
        "min_bytes": total,
        "min_bytes_terms": need,
        "bytes_accessed": int(per_step),
        "bytes_ratio": per_step / total,
        "bytes_in_place": int(in_place),
        "bytes_ratio_in_place": in_place / total,
        "program_bytes": int(program),
        "large_copies": stats["large_copies"],
        "weight_copies": stats["weight_copies"],
        "fusions": stats["fusions"],
        "kernels": stats["kernels"],
        "weight_matmuls": stats["weight_matmuls"],
        "step_loops": stats["step_loops"],
        "copies": stats["copies"],
        "batch": shape.batch,
        "adapters": shape.adapters,
        "context": shape.context,
        "compile_s": round(compile_s, 2),
        "backend": jax.default_backend(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-1.7b")
    p.add_argument("--batch", type=int, default=1, help="cache rows decoding together")
    p.add_argument("--adapters", type=int, default=1, help="distinct adapters among the rows")
    p.add_argument("--context", type=int, default=1024, help="cache positions attended")
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--slots", type=int, default=8, help="the sampler's adapter slots")
    p.add_argument("--steps-per-call", type=int, default=16)
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="default: see default_dtype"
    )
    p.add_argument("--copy-mib", type=float, default=1.0, help="a large copy's output, MiB")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    args = p.parse_args()
    shape = DecodeShape(
        batch=args.batch,
        adapters=args.adapters,
        context=args.context,
        rank=args.rank,
        slots=args.slots,
        steps=args.steps_per_call,
        dtype=args.dtype or default_dtype(args.preset),
    )
    out = inspect(preset_config(args.preset), shape, int(args.copy_mib * MIB))
    gib = 1 << 30
    terms = ", ".join(f"{k} {v / gib:.3f}" for k, v in out["min_bytes_terms"].items())
    print(
        f"{args.preset} decode step ({out['backend']}, {shape.dtype}): batch {shape.batch}, "
        f"{shape.adapters} adapters (rank {shape.rank}), context {shape.context}; "
        f"compiled in {out['compile_s']:.1f}s"
    )
    print(f"  min bytes       {out['min_bytes'] / gib:8.3f} GiB  ({terms})")
    print(
        f"  bytes accessed  {out['bytes_accessed'] / gib:8.3f} GiB  (XLA cost analysis, per "
        f"step of {shape.steps} a call; the program: {out['program_bytes'] / gib:.3f} GiB)"
    )
    print(f"  ratio           {out['bytes_ratio']:8.3f}")
    print(
        f"  in place        {out['bytes_in_place'] / gib:8.3f} GiB  ratio "
        f"{out['bytes_ratio_in_place']:.3f}  (cache writes at their updates' size, embedding "
        "lookups at their rows')"
    )
    if out["step_loops"]:
        print(
            f"  (the step holds loops of {out['step_loops']} iterations, whose body XLA's "
            "cost analysis counts once)"
        )
    print(
        f"  copies >= {args.copy_mib:g} MiB per step: {out['large_copies']} "
        f"({out['weight_copies']} shaped like a weight)"
    )
    for name, (what, times) in sorted(out["copies"].items(), key=lambda kv: kv[1][0]):
        print(f"    {times:4d}x  {what}  ({name})")
    print(f"  fusions per step {out['fusions']}, kernels per step {out['kernels']}")
    print(f"  matmuls reading a base weight matrix per step {out['weight_matmuls']}")
    if args.json:
        print(json.dumps({k: v for k, v in out.items() if k != "copies"}))


if __name__ == "__main__":
    main()
