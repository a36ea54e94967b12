"""Helpers the kernel files share: dtypes, the GPU's size, the launch-configuration shape, ahead-of-time specs.

A launch configuration is one dict shape in every kernel file, {"constexprs": {...}, "num_warps", "num_stages"},
read by the launchers (through launch_options) and by aot_specs() (through aot_spec), so the compiled
configurations are the launched ones. Like the kernel files, this imports Triton only through .backend.
"""
import inspect

import torch

from .backend import tl

# torch dtype -> Triton's name for it in a signature ("*bf16" is a bf16 pointer).
TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
SUPPORTED_DTYPES = tuple(TRITON_DTYPE)  # the dtypes every kernel reads and writes; arithmetic is fp32


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the CPU interpreter runs as one 'SM')."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def launch_config(num_warps: int, num_stages: int = 1, **constexprs) -> dict:
    """A kernel's launch configuration: {"constexprs": {name: value}, "num_warps", "num_stages"}."""
    return {"constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages}


def launch_options(config: dict) -> dict:
    """A launch configuration as launch keywords: kernel[grid](*args, **launch_options(config))."""
    return {**config["constexprs"], "num_warps": config["num_warps"], "num_stages": config["num_stages"]}


def aot_signature(fn, pointers: dict, constexprs: dict, scalar_types: dict | None = None) -> tuple[dict, dict]:
    """(signature, constexprs) of `fn` for triton.compile: pointers as given, constexprs, scalars i32 unless named.

    pointers: {arg: "*bf16", ...}; a pointer given as None is one the launcher passes as None (Triton specialises it
    away), so it becomes a constexpr None, appended to the returned constexprs. scalar_types: {arg: "fp32", ...}
    for the scalar arguments that are not i32 (names `fn` lacks are ignored, so one dict serves several kernels).
    The signature lists every argument of `fn` in order.
    """
    scalar_types = scalar_types or {}
    unknown = (set(pointers) | set(constexprs)) - set(fn.arg_names)
    missing = {name for name, param in inspect.signature(fn.fn).parameters.items()
               if param.annotation is tl.constexpr} - set(constexprs)
    if unknown or missing:
        raise ValueError(f"aot_signature({fn.__name__}): arguments it does not have {sorted(unknown)}, "
                         f"constexprs without a value {sorted(missing)}")
    signature, constexprs = {}, dict(constexprs)
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name] or "constexpr"
            if pointers[name] is None:
                constexprs[name] = None
        else:
            signature[name] = scalar_types.get(name, "i32")
    return signature, constexprs


def aot_spec(name: str, fn, config: dict, pointers: dict, scalar_types: dict | None = None) -> dict:
    """One aot_specs() entry (kernels/aot.py): {"name", "fn", "signature", "constexprs", "num_warps", "num_stages"}."""
    signature, constexprs = aot_signature(fn, pointers, config["constexprs"], scalar_types)
    return {"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
            "num_warps": config["num_warps"], "num_stages": config["num_stages"]}
