"""The GPU table: each GPU's dense bf16 peak, memory bandwidth, power and memory from its datasheet, the names that
mean it, and the entry a CUDA device's name belongs to. The planner, the roofline model of the kernels and the
benchmarks all read their peaks from here.
"""
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    name: str
    tflops: float  # dense (no sparsity) bf16 tensor-core TFLOP/s with fp32 accumulation; fp16 on V100 (no bf16)
    bandwidth_gbs: float  # memory bandwidth, GB/s (1e9 bytes/s)
    tdp_w: float  # board power limit, W
    memory_gb: float  # memory capacity, GB


GPUS = {
    # NVIDIA A100 Tensor Core GPU datasheet (2021): BF16 312 TFLOP/s dense (624 with sparsity); HBM2 1,555 GB/s
    # (40GB) and HBM2e 2,039 GB/s (80GB SXM); max TDP 400 W (SXM).
    "A100-40GB": GPU("A100 SXM4 40GB", 312.0, 1555.0, 400.0, 40.0),
    "A100-80GB": GPU("A100 SXM4 80GB", 312.0, 2039.0, 400.0, 80.0),
    # NVIDIA H100 Tensor Core GPU datasheet: H100 SXM BF16 1,979 TFLOP/s with sparsity = 989.5 dense;
    # 3.35 TB/s HBM3; max TDP up to 700 W; 80 GB.
    "H100": GPU("H100 SXM5 80GB", 989.5, 3350.0, 700.0, 80.0),
    # NVIDIA H200 Tensor Core GPU datasheet: H200 SXM BF16 1,979 TFLOP/s with sparsity = 989.5 dense;
    # 4.8 TB/s HBM3e; max TDP up to 700 W; 141 GB.
    "H200": GPU("H200 SXM 141GB", 989.5, 4800.0, 700.0, 141.0),
    # NVIDIA Tesla V100 datasheet: V100 SXM2 125 TFLOP/s fp16 tensor (no bf16); 900 GB/s HBM2; 300 W; 32 GB.
    "V100": GPU("V100 SXM2 32GB", 125.0, 900.0, 300.0, 32.0),
    # NVIDIA L40S datasheet: BF16 tensor 362.05 TFLOP/s dense (733 with sparsity); 864 GB/s GDDR6; 350 W; 48 GB.
    "L40S": GPU("L40S 48GB", 362.05, 864.0, 350.0, 48.0),
    # NVIDIA Ada Lovelace GPU architecture whitepaper (v2.1), GeForce RTX 4090: BF16 tensor with FP32
    # accumulate 165.2 TFLOP/s dense (330.4 with sparsity); 1,008 GB/s GDDR6X; 450 W total graphics power; 24 GB.
    "RTX4090": GPU("GeForce RTX 4090 24GB", 165.2, 1008.0, 450.0, 24.0),
}

# Other names the planner accepts for a GPUS key. A bare part name means the part most sold now: A100 the 80 GB
# SXM4 (H100, H200 and V100 are GPUS keys themselves: the SXM entries above).
GPU_ALIASES = {"A100": "A100-80GB", "4090": "RTX4090"}


def _gpu_token(name: str) -> str:
    """A GPU name as compared: without case, spaces, hyphens or underscores ("a100 80gb" == "A100-80GB")."""
    return re.sub(r"[\s_-]", "", name).upper()


_GPU_NAMES = {**{_gpu_token(k): k for k in GPUS}, **{_gpu_token(a): k for a, k in GPU_ALIASES.items()}}


def gpu_names() -> str:
    """The names `resolve_gpu` accepts, for help and errors: "A100-40GB, A100-80GB (or A100), H100, ..."."""
    aliases = {}
    for alias, key in GPU_ALIASES.items():
        aliases.setdefault(key, []).append(alias)
    return ", ".join(f"{k} (or {', '.join(aliases[k])})" if k in aliases else k for k in GPUS)


def resolve_gpu(name: str) -> str:
    """The GPUS key a GPU name means: a key or an alias of GPU_ALIASES, in any case, spaces, hyphens and
    underscores ignored: "a100" -> "A100-80GB", "h100" -> "H100", "a100_40gb" -> "A100-40GB".
    Raises ValueError, listing the accepted names, for any other name."""
    key = _GPU_NAMES.get(_gpu_token(str(name)))
    if key is None:
        raise ValueError(f"unknown GPU {name!r}; known (any case): {gpu_names()}")
    return key


def gpu_key(name: str, memory_bytes: int) -> str | None:
    """The GPUS key for a CUDA device name, e.g. "NVIDIA A100-SXM4-80GB" -> "A100-80GB", or None.

    PCIe A100s share the SXM card's tensor peak (bandwidth and power are slightly lower); H100 PCIe and NVL
    have other peaks and are not in the table."""
    n = name.upper()
    if "H200" in n:
        return "H200"
    if "H100" in n and "PCIE" not in n and "NVL" not in n:
        return "H100"
    if "A100" in n:
        return "A100-80GB" if memory_bytes > 60e9 else "A100-40GB"
    for key, marker in (("V100", "V100"), ("L40S", "L40S"), ("RTX4090", "RTX 4090")):
        if marker in n:
            return key
    return None
