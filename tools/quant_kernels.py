"""Time one SwiGLU expert forward with int8 / int4 weights on this CPU: packed kernels against dequantize-then-F.linear.

For each expert shape, compute dtype, T tokens and thread count: the dense F.linear references; int8 per output
channel through torch's `_weight_int8pack_mm` and through dequantize-into-a-scratch-buffer then F.linear; int4 per
group the same way through `_weight_int4pack_mm_for_cpu`; and, where importable, torchao's int8 / int4 weight-only
CPU paths and HQQ's. Also times the dequantize step alone and checks numerics: max abs error against the fp32
expert, packed against dequantize, and whether a token's output bits depend on its batch (each of 16 rows alone
and a batch of 4 against the batch of 16). Median us per forward from blocked_autorange after a warm-up.

    python tools/quant_kernels.py [--shapes tiny-mixtral-32e,tiny-olmoe-64e,wide4096,olmoe-1b-7b] [--tokens 1,4,16]
        [--threads 1,2] [--dtypes float32,bfloat16] [--group-sizes 32,64,128] [--min-run-time 0.2] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.utils import benchmark

from expertflow.embedded import EMBEDDED_MODEL_DIR

# T tokens, H hidden, I intermediate, N out features, K in features, G group size.
# An expert is gate_up (2I, H) and down (H, I): y = down(silu(gate) * up), [gate | up] = gate_up(x).

LIBRARIES = ("torchao", "hqq")


def expert_shapes() -> dict[str, tuple[int, int]]:
    """(H, I) per shape. tiny-olmoe-64e (128, 128) is the shared development model, not shipped in the package."""
    config = json.loads((EMBEDDED_MODEL_DIR / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    return {"tiny-mixtral-32e": (hidden, inter), "tiny-olmoe-64e": (128, 128),
            "wide4096": (hidden, 4096), "olmoe-1b-7b": (2048, 1024)}


@dataclass
class Method:
    name: str
    dtype: torch.dtype
    linears: Callable[[], tuple[Callable, Callable]]     # -> (gate_up, down), each x (T, K) -> (T, N)
    nbytes: int                                           # weights + scales/zeros held per expert
    dequantize: Callable[[], object] | None = None        # the dequantize step alone, where there is one
    family: str = "dense"                                 # packed and dequantize paths of one format share it

    def forward(self, x: Tensor) -> Tensor:
        gate_up, down = self.linears()
        gate, up = gate_up(x).chunk(2, dim=-1)            # (T, I) each
        return down(F.silu(gate) * up)                    # (T, H)


def nbytes(*tensors: Tensor) -> int:
    return sum(t.nelement() * t.element_size() for t in tensors)


def quantize_int8(w: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric per output channel, w = q * scale: q (N, K) int8, scale (N,) in dtype (the kernel wants it so)."""
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8).to(dtype)
    return torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_int4(w: Tensor, group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric per group of G along K, w = q * scale + offset (the group minimum), q in 0..15.
    Returns packed (N, K/2) uint8 (a group's first G/2 values in low nibbles, its second G/2 in high ones, so
    unpacking is two whole-tensor ops), scale and offset (N, K/G, 1) in dtype."""
    n, k = w.shape
    groups = w.view(n, k // group, group)
    low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale, offset = ((high - low) / 15).clamp(min=1e-8).to(dtype), low.to(dtype)
    q = torch.round((groups - offset.float()) / scale.float()).clamp(0, 15).to(torch.uint8)    # (N, K/G, G)
    return (q[..., :group // 2] | (q[..., group // 2:] << 4)).reshape(n, k // 2), scale, offset


def unpack_int4(packed: Tensor, group: int) -> Tensor:
    """(N, K) int32 q in natural order, as `_convert_weight_to_int4pack_for_cpu` takes it."""
    n = packed.shape[0]
    halves = packed.view(n, -1, group // 2)
    return torch.cat((halves & 15, halves >> 4), dim=-1).reshape(n, -1).to(torch.int32)


def dense(w13: Tensor, w2: Tensor, dtype: torch.dtype) -> Method:
    a, b = w13.to(dtype), w2.to(dtype)
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, dtype_name(dtype))
    return Method(f"{name} F.linear", dtype, lambda: (lambda x: F.linear(x, a), lambda x: F.linear(x, b)),
                  nbytes(a, b))


def int8_methods(w13: Tensor, w2: Tensor, dtype: torch.dtype) -> list[Method]:
    (q13, s13), (q2, s2) = quantize_int8(w13, dtype), quantize_int8(w2, dtype)
    held = nbytes(q13, s13, q2, s2)
    packed = Method("int8 packed", dtype, lambda: (
        lambda x: torch.ops.aten._weight_int8pack_mm(x, q13, s13),
        lambda x: torch.ops.aten._weight_int8pack_mm(x, q2, s2)), held, family="int8")
    buf13, buf2 = torch.empty(q13.shape, dtype=dtype), torch.empty(q2.shape, dtype=dtype)

    def dequantize() -> tuple[Tensor, Tensor]:
        # cast, then scale in dtype: one rounding, and faster than a mixed-dtype mul (int8 is exact in bf16)
        return buf13.copy_(q13).mul_(s13[:, None]), buf2.copy_(q2).mul_(s2[:, None])

    def linears() -> tuple[Callable, Callable]:
        a, b = dequantize()
        return (lambda x: F.linear(x, a)), (lambda x: F.linear(x, b))
    return [packed, Method("int8 dequant", dtype, linears, held, dequantize, family="int8")]


def int4_methods(w13: Tensor, w2: Tensor, dtype: torch.dtype, group: int) -> list[Method]:
    parts = [quantize_int4(w, group, dtype) for w in (w13, w2)]
    held = nbytes(*(t for part in parts for t in part))
    tiny = [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpack_int4(p, group), 1),
             torch.stack((s[..., 0].t(), (o.float() + 8 * s.float()).to(dtype)[..., 0].t()), -1).contiguous())
            for p, s, o in parts]                          # tinygemm: w = (q - 8) * scale + zero, (K/G, N, 2)
    (p13, sz13), (p2, sz2) = tiny
    packed = Method(f"int4 g{group} packed", dtype, lambda: (
        lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p13, group, sz13),
        lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, p2, group, sz2)), held, family=f"int4 g{group}")
    bufs = [torch.empty(w.shape, dtype=dtype) for w in (w13, w2)]
    nibbles = [torch.empty_like(p) for p, _, _ in parts]

    def dequantize() -> list[Tensor]:
        for (p, scale, offset), out, scratch in zip(parts, bufs, nibbles):
            n, k = out.shape
            halves = out.view(n, k // group, 2, group // 2)
            halves[:, :, 0] = torch.bitwise_and(p, 15, out=scratch).view(n, k // group, group // 2)
            halves[:, :, 1] = torch.bitwise_right_shift(p, 4, out=scratch).view(n, k // group, group // 2)
            out.view(n, k // group, group).mul_(scale).add_(offset)
        return bufs

    def linears() -> tuple[Callable, Callable]:
        a, b = dequantize()
        return (lambda x: F.linear(x, a)), (lambda x: F.linear(x, b))
    return [packed, Method(f"int4 g{group} dequant", dtype, linears, held, dequantize, family=f"int4 g{group}")]


def torchao_methods(w13: Tensor, w2: Tensor, dtype: torch.dtype, groups: list[int]) -> list[Method]:
    """torchao's CPU weight-only paths: int8 casts the weight per call, mm, then scales the output; int4 is
    Int4OpaqueTensor over the same `_weight_int4pack_mm_for_cpu`."""
    from torchao.prototype.quantization.int4.inference_workflow import (
        PrototypeInt4WeightOnlyConfig,
    )
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def module(w: Tensor, config: object) -> nn.Linear:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=dtype)
        linear.weight.data.copy_(w)
        quantize_(linear, config)
        return linear

    def method(name: str, config: object) -> Method:
        a, b = module(w13, config), module(w2, config)
        held = nbytes(*(getattr(m.weight, n) for m in (a, b) for n in m.weight.tensor_data_names))
        return Method(name, dtype, lambda: (a, b), held, family=name)
    out = [method("torchao int8", Int8WeightOnlyConfig(set_inductor_config=False))]
    return out + [method(f"torchao int4 g{g}", PrototypeInt4WeightOnlyConfig(group_size=g, set_inductor_config=False))
                  for g in groups]


def hqq_methods(w13: Tensor, w2: Tensor, dtype: torch.dtype, groups: list[int]) -> list[Method]:
    """HQQ's own quantizer (half-quadratic zero/scale fit); on a CPU it dequantizes in dtype, then matmul."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    def module(w: Tensor, bits: int, group: int | None) -> HQQLinear:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data.copy_(w)
        return HQQLinear(linear, BaseQuantizeConfig(nbits=bits, group_size=group), compute_dtype=dtype, device="cpu")

    def method(name: str, bits: int, group: int | None) -> Method:
        a, b = module(w13, bits, group), module(w2, bits, group)
        held = nbytes(*(t for m in (a, b) for t in (m.W_q, m.meta["scale"], m.meta["zero"])))
        return Method(name, dtype, lambda: (a, b), held, lambda: (a.dequantize(), b.dequantize()), family=name)
    return [method("hqq int8", 8, None)] + [method(f"hqq int4 g{g}", 4, g) for g in groups]


def build_methods(hidden: int, inter: int, dtypes: list[torch.dtype], groups: list[int],
                  libraries: list[str]) -> list[Method]:
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(2 * inter, hidden, generator=gen) * 0.02       # (2I, H)
    w2 = torch.randn(hidden, inter, generator=gen) * 0.02            # (H, I)
    methods = [dense(w13, w2, torch.float32)]                        # the reference, always first
    for dtype in dtypes:
        methods += [] if dtype == torch.float32 else [dense(w13, w2, dtype)]
        methods += int8_methods(w13, w2, dtype)
        methods += [m for g in groups for m in int4_methods(w13, w2, dtype, g)]
        methods += torchao_methods(w13, w2, dtype, groups) if "torchao" in libraries else []
        methods += hqq_methods(w13, w2, dtype, groups) if "hqq" in libraries else []
    return methods


def median_us(fn: Callable, arg: Tensor | None, threads: int, min_run_time: float) -> tuple[float, float]:
    for _ in range(3):                                   # warm-up: first calls allocate and pick kernels
        fn() if arg is None else fn(arg)
    stmt = "fn()" if arg is None else "fn(x)"
    m = benchmark.Timer(stmt, globals={"fn": fn, "x": arg}, num_threads=threads).blocked_autorange(
        min_run_time=min_run_time)
    return m.median * 1e6, m.iqr * 1e6


def check_numerics(methods: list[Method], hidden: int, threads: int) -> dict[str, dict]:
    """Per method at this thread count: error against fp32, bits alone vs in a batch of 16, and the T=16 output."""
    torch.set_num_threads(threads)
    x = torch.randn(16, hidden, generator=torch.Generator().manual_seed(1))      # (16, H)
    reference = methods[0].forward(x)
    out = {}
    for m in methods:
        xs = x.to(m.dtype)
        batch = m.forward(xs)
        alone = torch.cat([m.forward(xs[i:i + 1]) for i in range(16)])
        out[m.name + str(m.dtype)] = {
            "output": batch, "max_abs_error": (batch.float() - reference).abs().max().item(),
            "rms_relative_error": ((batch.float() - reference).norm() / reference.norm()).item(),
            "rows_alone_equal": torch.equal(alone, batch), "batch4_equal": torch.equal(m.forward(xs[:4]), batch[:4])}
    return out


def time_forwards(shape: str, methods: list[Method], hidden: int, args: argparse.Namespace) -> list[dict]:
    rows = []
    for threads in args.threads:
        for tokens in args.tokens:
            x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(2))      # (T, H)
            reference = None
            for m in methods:
                us, iqr = median_us(m.forward, x.to(m.dtype), threads, args.min_run_time)
                reference = reference or us                                            # methods[0]: fp32
                rows.append({"shape": shape, "method": m.name, "dtype": dtype_name(m.dtype), "tokens": tokens,
                             "threads": threads, "median_us": us, "iqr_us": iqr, "vs_fp32": us / reference,
                             "weight_bytes": m.nbytes})
    return rows


def time_dequantize(shape: str, methods: list[Method], args: argparse.Namespace) -> list[dict]:
    return [{"shape": shape, "method": m.name, "dtype": dtype_name(m.dtype), "threads": threads,
             "median_us": median_us(m.dequantize, None, threads, args.min_run_time)[0]}
            for threads in args.threads for m in methods if m.dequantize is not None]


def numerics(shape: str, methods: list[Method], hidden: int, threads: list[int]) -> list[dict]:
    """Errors at the first thread count; batch invariance at each; bits across thread counts; packed vs dequant."""
    runs = [check_numerics(methods, hidden, n) for n in threads]
    first_of_family = {}
    rows = []
    for m in methods:
        key = m.name + str(m.dtype)
        first = runs[0][key]
        twin = first_of_family.setdefault((m.family, m.dtype), m)
        rows.append({
            "shape": shape, "method": m.name, "dtype": dtype_name(m.dtype),
            "max_abs_error": first["max_abs_error"], "rms_relative_error": first["rms_relative_error"],
            "batch_invariant": {n: run[key]["rows_alone_equal"] and run[key]["batch4_equal"]
                                for n, run in zip(threads, runs)},
            "same_bits_across_threads": all(torch.equal(run[key]["output"], first["output"]) for run in runs),
            "vs_packed_max_abs": None if twin is m or m.family == "dense" else
            (first["output"].float() - runs[0][twin.name + str(m.dtype)]["output"].float()).abs().max().item()})
    return rows


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def available_libraries(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    found = [name for name in wanted if importlib.util.find_spec(name) is not None]
    return found, {name: "not importable here" for name in wanted if name not in found}


def print_tables(result: dict, args: argparse.Namespace) -> None:
    console = Console()
    console.width = max(console.width, 160)              # squeezed columns are unreadable in a log file
    cells = [(n, t) for n in args.threads for t in args.tokens]
    for shape in args.shapes:
        hidden, inter = result["shapes"][shape]["hidden"], result["shapes"][shape]["intermediate"]
        table = Table("method", "dtype", "KiB", *(f"T={t} {n}th us (x fp32)" for n, t in cells),
                      title=f"{shape}: one expert forward, H={hidden} I={inter}, median us (ratio to fp32 F.linear)")
        rows = [r for r in result["forward"] if r["shape"] == shape]
        for r in rows:
            if (r["threads"], r["tokens"]) == cells[0]:
                same = {(s["threads"], s["tokens"]): s for s in rows if (s["method"], s["dtype"]) ==
                        (r["method"], r["dtype"])}
                table.add_row(r["method"], r["dtype"], f"{r['weight_bytes'] / 1024:,.0f}",
                              *(f"{same[c]['median_us']:,.0f} ({same[c]['vs_fp32']:.2f}x)" for c in cells))
        console.print(table)
    table = Table("shape", "method", "dtype", *(f"dequantize {n}th us" for n in args.threads),
                  title="the dequantize step alone, both matrices of one expert")
    for r in result["dequantize"]:
        if r["threads"] == args.threads[0]:
            same = [s for s in result["dequantize"] if (s["shape"], s["method"], s["dtype"]) ==
                    (r["shape"], r["method"], r["dtype"])]
            table.add_row(r["shape"], r["method"], r["dtype"], *(f"{s['median_us']:,.0f}" for s in same))
    console.print(table)
    table = Table("shape", "method", "dtype", "max abs err vs fp32", "rms err / rms", "vs packed (max abs)",
                  *(f"batch-invariant {n}th" for n in args.threads), "same bits across threads",
                  title="numerics at T=16 (batch-invariant: each row alone and a batch of 4 equal the batch of 16)")
    for r in result["numerics"]:
        table.add_row(r["shape"], r["method"], r["dtype"], f"{r['max_abs_error']:.2e}",
                      f"{r['rms_relative_error']:.3f}",
                      "" if r["vs_packed_max_abs"] is None else f"{r['vs_packed_max_abs']:.2e}",
                      *("yes" if r["batch_invariant"][n] else "NO" for n in args.threads),
                      "yes" if r["same_bits_across_threads"] else "NO")
    console.print(table)


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="tiny-mixtral-32e,tiny-olmoe-64e,wide4096,olmoe-1b-7b")
    p.add_argument("--tokens", type=int_list, default=[1, 4, 16])
    p.add_argument("--threads", type=int_list, default=[1, 2])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--group-sizes", type=int_list, default=[32, 64, 128], help="int4 groups along K")
    p.add_argument("--libraries", default=",".join(LIBRARIES),
                   help="optional libraries to time where importable ('none' for none)")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds blocked_autorange runs each timing")
    p.add_argument("--json", action="store_true", help="end with one JSON line of every figure")
    args = p.parse_args()
    shapes = expert_shapes()
    args.shapes = args.shapes.split(",")
    if unknown := [s for s in args.shapes if s not in shapes]:
        p.error(f"unknown shapes {unknown}; known: {', '.join(shapes)}")
    dtypes = [getattr(torch, name, None) for name in args.dtypes.split(",")]
    if not all(isinstance(d, torch.dtype) and d.is_floating_point for d in dtypes):
        p.error(f"--dtypes {args.dtypes}: want floating dtypes by torch name, e.g. float32,bfloat16")
    libraries, skipped = available_libraries([] if args.libraries == "none" else args.libraries.split(","))
    result = {"torch": torch.__version__, "threads": args.threads, "tokens": args.tokens,
              "group_sizes": args.group_sizes, "libraries": libraries, "skipped": skipped,
              "shapes": {s: {"hidden": shapes[s][0], "intermediate": shapes[s][1]} for s in args.shapes},
              "forward": [], "dequantize": [], "numerics": []}
    for shape in args.shapes:
        methods = build_methods(*shapes[shape], dtypes, args.group_sizes, libraries)
        result["forward"] += time_forwards(shape, methods, shapes[shape][0], args)
        result["dequantize"] += time_dequantize(shape, methods, args)
        result["numerics"] += numerics(shape, methods, shapes[shape][0], args.threads)
    print_tables(result, args)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
