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


def compute_capability(device: torch.device) -> int | None:
    """major * 10 + minor of a CUDA device (80 for A100, 90 for H100); None elsewhere."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the CPU interpreter runs as one 'SM')."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


# Occupancy rules of sm_80 / sm_90 (CUDA C++ Programming Guide, compute capability table): 65536 registers per SM,
# allocated per warp in units of 256; at most 32 resident blocks; 1 KB of shared memory reserved per block.
SM_REGISTERS, SM_BLOCKS, REGISTER_ALLOCATION_UNIT, SHARED_RESERVED_PER_BLOCK = 65536, 32, 256, 1024
# Programs per SM the launchers assume where nothing is compiled for a GPU (the CPU interpreter, the meta tensors
# of aot_specs()): with one 'SM', four programs per sample keep the backward's partial sums exercised.
NOMINAL_PROGRAMS_PER_SM = 4


def programs_per_sm(registers: int, shared_bytes: int, num_warps: int, sm_shared_bytes: int,
                    sm_threads: int) -> tuple[int, str]:
    """Resident programs (blocks) per SM of a kernel and what limits them ("registers", "shared", "threads" or
    "blocks"), from its registers per thread, shared memory and warps and the SM's shared memory and threads."""
    warp_registers = -(-registers * 32 // REGISTER_ALLOCATION_UNIT) * REGISTER_ALLOCATION_UNIT
    limits = {
        "registers": (SM_REGISTERS // warp_registers) // num_warps,
        "threads": sm_threads // (32 * num_warps),
        "blocks": SM_BLOCKS,
        "shared": sm_shared_bytes // (shared_bytes + SHARED_RESERVED_PER_BLOCK),
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def compiled_programs_per_sm(kernel, args: tuple, options: dict, device: torch.device) -> int:
    """Programs per SM of `kernel` as the JIT compiles it for this launch (its registers and shared memory read
    from the compiled kernel, as Triton's fused-softmax tutorial does; kernels/aot.py reads the same ahead of time).
    Compiles (once: the JIT caches it) without launching. NOMINAL_PROGRAMS_PER_SM off a GPU."""
    if device.type != "cuda":
        return NOMINAL_PROGRAMS_PER_SM
    compiled = kernel.warmup(*args, grid=(1,), **options)
    compiled._init_handles()  # loads the cubin: n_regs is the driver's count
    props = torch.cuda.get_device_properties(device)
    return programs_per_sm(compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps,
                           props.shared_memory_per_multiprocessor, props.max_threads_per_multi_processor)[0]


def tokens_per_program(B: int, T: int, slots: int, min_tokens: int) -> int:
    """Tokens of one sample a program walks, so that its B * n programs run on `slots` (SMs x programs per SM) in
    the least time: waves x (tokens per program + 1), the + 1 for a program's own rows (about one token row's
    traffic: the (B, D) vectors a forward reads, the fp32 partial sums a backward writes). Each program takes
    >= min_tokens tokens (or all T); the fewest programs among equals."""
    best = None
    for n in range(1, max(1, T // min_tokens) + 1):
        rows = -(-T // n)
        programs = B * -(-T // rows)
        cost = -(-programs // slots) * (rows + 1)
        if best is None or cost < best[0]:
            best = (cost, rows)
    return best[1]


def launch_config(num_warps: int, num_stages: int = 1, **constexprs) -> dict:
    """A kernel's launch configuration: {"constexprs": {name: value}, "num_warps", "num_stages"}."""
    return {"constexprs": constexprs, "num_warps": num_warps, "num_stages": num_stages}


def launch_options(config: dict) -> dict:
    """A launch configuration as launch keywords: kernel[grid](*args, **launch_options(config))."""
    return {**config["constexprs"], "num_warps": config["num_warps"], "num_stages": config["num_stages"]}


@contextmanager
def recorded_launches(namespace: dict, kernels, sms: int, capability: int | None = None):
    """Inside the block, launches of `kernels` (JITFunctions) are recorded instead of run, and the launchers'
    sm_count and compute_capability (looked up in `namespace`, the kernel module's globals()) answer `sms` and
    `capability`. Yields the list the launches go to, in order.

    aot_specs() runs the real launchers on meta tensors shaped (and strided) as the model's own, so each spec holds
    the very arguments the launcher hands the JIT (kernels/aot.py then specialises them as the JIT does).
    entry: {"fn", "args" (positional), "kwargs" (constexprs, num_warps, num_stages), "grid"}.
    """
    calls = []

    def recorder(fn):
        def run(*args, grid, warmup, **kwargs):
            calls.append({"fn": fn, "args": args, "kwargs": kwargs, "grid": grid})
        return run

    answers = {"sm_count": lambda device: sms, "compute_capability": lambda device: capability}
    saved = {name: namespace[name] for name in answers if name in namespace}
    namespace.update({name: answers[name] for name in saved})
    for fn in kernels:
        fn.run = recorder(fn)  # an instance attribute over JITFunction.run, which fn[grid](...) calls
    try:
        yield calls
    finally:
        namespace.update(saved)
        for fn in kernels:
            del fn.run
