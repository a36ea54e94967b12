"""Bytes and FLOPs of each kernel call at PixArt-XL/2 training shapes, and its roofline time on A100 / H100 / H200.

The calls are the launches aot_specs() records (the real launchers on meta tensors, bf16 autocast, the model's
dtypes and strides) at B * T = 32768 tokens per call: B = 128 / 32 / 8 at T = 256 / 1024 / 4096.

- bytes: every tensor argument of the launch read or written once (a strided (B, D) view counts its B * D
  elements; a tile a kernel reads again from L2, as cross-attention's k / v, is not charged again). Of these,
  "private" bytes are the kernel's own bookkeeping, not the op's inputs or outputs: LayerNorm mean / rstd,
  attention logsumexp, and fp32 partial sums (*_PART; cross-attention's dk / dv when its backward is split) that
  PyTorch sums afterwards. The grids are the ones
  recorded off a GPU, where the modulation backward assumes 4 programs per SM (on a GPU its launcher reads the
  compiled kernel's count), so its partial-sum bytes are those of that grid.
- FLOPs: tensor-core matrix products, 2 m n k each, at the true sizes (head dim 72, caption length 120, not the
  padded blocks): cross-attention 2 products forward, 5 backward (q k^T recomputed, dv, dp, dq, dk); the other
  kernels do only pointwise work and row reductions, counted as 0.
- roofline: max(bytes / bandwidth, FLOPs / dense bf16 peak), the GPU figures from pixart_fast.gpus.GPUS
  (datasheets). A time no GPU measured is a goal, not a result.
"""
import importlib
import math

import torch

from pixart_fast.gpus import GPUS
from pixart_fast.tables import text_table

from .targets import KERNEL_MODULES, SM_COUNT

TOKENS = (256, 1024, 4096)
TOKENS_PER_CALL = 32768
REGIME = "bf16 autocast"
# The GPUs of the report, each with the compile target (kernels/targets.py) whose SM count sizes its grids.
ROOFLINE_GPUS = {"A100-80GB": "sm_80", "H100": "sm_90", "H200": "sm_90"}
PRIVATE_ARGS = ("MEAN", "RSTD", "LSE")  # and every *_PART
MATRIX_PRODUCTS = {"cross_attn_fwd": 2, "cross_attn_bwd": 5}


def _shape_kwargs(module: str, tokens: int) -> dict:
    """aot_specs() keywords for one token count: patch_copy takes the latent side, the others the tokens."""
    return {"sizes": (2 * math.isqrt(tokens),)} if module == "patch_copy" else {"tokens": (tokens,)}


def launch_bytes(spec: dict) -> tuple[int, int]:
    """(bytes, private bytes) one recorded launch moves: each tensor argument once. Private: the arguments the
    spec lists under "private", by default PRIVATE_ARGS and every *_PART."""
    total = private = 0
    for name, arg in zip(spec["fn"].arg_names, spec["args"]):
        if isinstance(arg, torch.Tensor):
            size = arg.numel() * arg.element_size()
            total += size
            is_private = name in spec["private"] if "private" in spec else (name in PRIVATE_ARGS or
                                                                           name.endswith("_PART"))
            private += size if is_private else 0
    return total, private


def launch_flops(spec: dict) -> int:
    """Tensor-core FLOPs of one recorded launch (see the module docstring)."""
    products = MATRIX_PRODUCTS.get(spec["name"], 0)
    if not products:
        return 0
    args = dict(zip(spec["fn"].arg_names, spec["args"]))
    B, N, H, Dh = args["Q"].shape
    return products * 2 * B * N * H * args["K"].shape[1] * Dh


def roofline_rows(tokens=TOKENS, gpus=ROOFLINE_GPUS) -> list[dict]:
    """One row per (kernel launch, token count, GPU) of the bf16-autocast training step, for every kernel module
    of the compile report.

    row: {"kernel", "tokens", "batch", "gpu", "bytes", "private_bytes", "flops", "memory_us", "compute_us",
    "roofline_us", "bound" ("memory" or "compute")}.
    """
    rows = []
    for gpu_key, target in gpus.items():
        gpu = GPUS[gpu_key]
        for T in tokens:
            batch = TOKENS_PER_CALL // T
            for module_name in KERNEL_MODULES:
                module = importlib.import_module(f".{module_name}", __package__)
                specs = module.aot_specs(sms=SM_COUNT[target], batch=batch, capability=int(target[3:]),
                                         **_shape_kwargs(module_name, T))
                for spec in (s for s in specs if s["call"].startswith(REGIME)):
                    nbytes, private = launch_bytes(spec)
                    flops = launch_flops(spec)
                    memory_us, compute_us = nbytes / gpu.bandwidth_gbs / 1e3, flops / gpu.tflops / 1e6
                    rows.append({"kernel": spec["name"], "tokens": T, "batch": batch, "gpu": gpu_key,
                                 "bytes": nbytes, "private_bytes": private, "flops": flops,
                                 "memory_us": memory_us, "compute_us": compute_us,
                                 "roofline_us": max(memory_us, compute_us),
                                 "bound": "memory" if memory_us >= compute_us else "compute"})
    return rows


def format_roofline(rows: list[dict]) -> str:
    """The rows as a text table: one line per kernel and token count, the roofline time on each GPU."""
    gpus = list(dict.fromkeys(r["gpu"] for r in rows))
    lines = {}
    for r in rows:
        key = (r["kernel"], r["tokens"])
        lines.setdefault(key, {"kernel": r["kernel"], "T": str(r["tokens"]), "B": str(r["batch"]),
                               "MB": f"{r['bytes'] / 1e6:.1f}", "private MB": f"{r['private_bytes'] / 1e6:.1f}",
                               "GFLOP": f"{r['flops'] / 1e9:.1f}"})
        lines[key][f"{r['gpu']} us"] = f"{r['roofline_us']:.1f} ({r['bound'][0]})"
    header = ["kernel", "T", "B", "MB", "private MB", "GFLOP"] + [f"{g} us" for g in gpus]
    text = text_table(header, [[line.get(h, "-") for h in header] for line in lines.values()], right=False)
    return (f"Roofline at PixArt-XL/2 shapes, {REGIME}, {TOKENS_PER_CALL} tokens per call (MB: bytes moved, each "
            f"tensor argument once, on the {gpus[0]}'s grid; private: statistics and fp32 partial sums; us: max(bytes / bandwidth, FLOPs / "
            "dense bf16 peak), m = memory-, c = compute-bound; datasheet figures from pixart_fast.gpus.GPUS, "
            f"goals until a GPU measures them)\n{text}")
