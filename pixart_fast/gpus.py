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
    # The same datasheets' other boards. H100 PCIe: BF16 1,513 TFLOP/s with sparsity = 756.5 dense; 2,000 GB/s
    # HBM2e; 114 SMs; 300-350 W; 80 GB. H100 NVL and H200 NVL: BF16 1,671 with sparsity = 835.5 dense; 3.9 and
    # 4.8 TB/s; up to 400 and 600 W; 94 and 141 GB (the NVL figures from memory of the datasheets, not re-read).
    "H100-PCIe": GPU("H100 PCIe 80GB", 756.5, 2000.0, 350.0, 80.0),
    "H100-NVL": GPU("H100 NVL 94GB", 835.5, 3900.0, 400.0, 94.0),
    "H200-NVL": GPU("H200 NVL 141GB", 835.5, 4800.0, 600.0, 141.0),
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
    """The GPUS key for a CUDA device name, e.g. "NVIDIA A100-SXM4-80GB" -> "A100-80GB", or None: `identify` with
    the name and memory alone."""
    return identify(name, memory_bytes)[0]


# Hopper boards apart from the SXM ones: fewer SMs (H100 PCIe: 114, the others 132) and a lower board power limit
# (PCIe 350 W, H100 NVL 400 W, H200 NVL 600 W; SXM 700 W).
_HOPPER_SMS, _SXM_POWER_W = 132, 700.0


def identify(name: str, memory_bytes: int, sm_count: int | None = None,
             power_limit_w: float | None = None) -> tuple[str | None, str]:
    """(the GPUS key, the evidence) for a CUDA device: its name, memory, and where known its SM count and board
    power limit (NVML's largest settable limit, W). H100 and H200 come as SXM, NVL and (H100) PCIe boards with
    other peaks: the name says "NVL" or "PCIe" on most, and the SM count and power limit tell them apart where it
    does not. PCIe A100s share the SXM card's tensor peak (bandwidth and power are slightly lower)."""
    n = name.upper()
    facts = [f"name {name!r}"] + ([f"{sm_count} SMs"] if sm_count else []) + \
        ([f"power limit {power_limit_w:.0f} W"] if power_limit_w else [])
    why = lambda board: f"{board}: " + ", ".join(facts)  # noqa: E731
    for family in ("H200", "H100"):
        if family not in n:
            continue
        if "NVL" in n:
            return f"{family}-NVL", why("NVL (by name)")
        if "PCIE" in n:  # the H200's PCIe board is the NVL
            return ("H100-PCIe", why("PCIe (by name)")) if family == "H100" else ("H200-NVL", why("NVL (PCIe board)"))
        if family == "H100" and sm_count and sm_count < _HOPPER_SMS:
            return "H100-PCIe", why(f"PCIe (fewer than {_HOPPER_SMS} SMs)")
        if power_limit_w and power_limit_w < 0.9 * _SXM_POWER_W:
            return f"{family}-NVL", why(f"NVL (power limit under the SXM board's {_SXM_POWER_W:.0f} W)")
        if family == "H100" and not power_limit_w and memory_bytes > 90e9:
            return "H100-NVL", why("NVL (94 GB)")
        return family, why("SXM" if power_limit_w else "SXM (no power limit known; NVL and PCIe boards say so "
                                                        "in their names)")
    if "A100" in n:
        return ("A100-80GB" if memory_bytes > 60e9 else "A100-40GB"), why("A100")
    for key, marker in (("V100", "V100"), ("L40S", "L40S"), ("RTX4090", "RTX 4090")):
        if marker in n:
            return key, why(key)
    return None, why("not in the GPU table")
