"""Helpers the kernel files share: dtypes, the GPU's size, the launch-configuration shape, ahead-of-time specs.

A launch configuration is one dict shape in every kernel file, {"constexprs": {...}, "num_warps", "num_stages"},
read by the launchers (through launch_options) and recorded for aot_specs() (recorded_launches), so the compiled
configurations are the launched ones. Like the kernel files, this imports Triton only through .backend.
"""
from contextlib import contextmanager

import torch

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


@contextmanager
def recorded_launches(namespace: dict, kernels, sms: int):
    """Inside the block, launches of `kernels` (JITFunctions) are recorded instead of run, and the launchers'
    sm_count (looked up in `namespace`, the kernel module's globals()) answers `sms`. Yields the list the launches
    go to, in order.

    aot_specs() runs the real launchers on meta tensors shaped (and strided) as the model's own, so each spec holds
    the very arguments the launcher hands the JIT (kernels/aot.py then specialises them as the JIT does).
    entry: {"fn", "args" (positional), "kwargs" (constexprs, num_warps, num_stages), "grid"}.
    """
    calls = []

    def recorder(fn):
        def run(*args, grid, warmup, **kwargs):
            calls.append({"fn": fn, "args": args, "kwargs": kwargs, "grid": grid})
        return run

    saved_sm_count = namespace.get("sm_count")
    if saved_sm_count is not None:
        namespace["sm_count"] = lambda device: sms
    for fn in kernels:
        fn.run = recorder(fn)  # an instance attribute over JITFunction.run, which fn[grid](...) calls
    try:
        yield calls
    finally:
        if saved_sm_count is not None:
            namespace["sm_count"] = saved_sm_count
        for fn in kernels:
            del fn.run
