"""The GPU the benchmarks run on, its entry in the GPU table, the roofline model of the estimates, and the
board's energy counter.

Peak numbers come from `pixart_fast.gpus.GPUS` (each with its datasheet source), which also maps a CUDA device's
name to its entry (`gpu_key`). Only a GPU found in that table gets a % of peak or an MFU; any other gets its raw
numbers.
"""
import torch

from pixart_fast.gpus import GPU, gpu_key


def device_info() -> dict:
    """{"device": "cuda" | "cpu", "name": device name, "gpu": GPUS key or None}."""
    if not torch.cuda.is_available():
        return {"device": "cpu", "name": "cpu", "gpu": None}
    props = torch.cuda.get_device_properties(0)
    return {"device": "cuda", "name": props.name, "gpu": gpu_key(props.name, props.total_memory)}


def roofline_seconds(flops: float, nbytes: float, gpu: GPU) -> float:
    """The roofline lower bound on the time of a kernel: the slower of computing its FLOPs at the dense bf16
    peak and moving its bytes at the memory bandwidth (perfect overlap, no launch overhead)."""
    return max(flops / (gpu.tflops * 1e12), nbytes / (gpu.bandwidth_gbs * 1e9))


class EnergyMeter:
    """The GPU board's energy counter through NVML (nvmlDeviceGetTotalEnergyConsumption, mJ since the driver
    loaded; Volta and newer). Construct it to find out whether it works: raises RuntimeError saying why not."""

    def __init__(self, device: int = 0):
        try:
            import pynvml  # nvidia-ml-py, optional (the gpu extra): imported only where energy is measured
        except ImportError as e:
            raise RuntimeError("nvidia-ml-py is not installed (pip install -e .[gpu])") from e
        # NVML numbers GPUs its own way (CUDA_VISIBLE_DEVICES does not apply): find torch's device by UUID.
        uuid = f"GPU-{torch.cuda.get_device_properties(device).uuid}"
        try:
            pynvml.nvmlInit()
            self._nvml, self._handle = pynvml, pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self.joules()
        except pynvml.NVMLError as e:
            raise RuntimeError(f"NVML energy counter unavailable: {e}") from e

    def joules(self) -> float:
        """The counter now, J."""
        return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0
