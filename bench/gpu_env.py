"""What the GPU check runs on, for its report: Python, the packages' versions, the host, the git commit, and the
GPU with its entry in the GPU table (peaks, or a note that it has none) and driver.
"""
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

from gpu_guard import Check
from gpu_report import short_error
from gpus import device_info
from pixart_fast.gpus import GPUS

ROOT = Path(__file__).resolve().parent.parent


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(check: Check, project: str) -> dict:
    """The environment as the report holds it; sets check.device ("cuda", or "cpu" for a dry run or without CUDA)
    and check.gpu_key. project: where pixart_fast was imported from (gpu_check.ensure_importable)."""
    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"), "transformers": _version("transformers"), "diffusers": _version("diffusers"),
        "nvidia-ml-py": _version("nvidia-ml-py"), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    env["pixart_fast"] = project
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine, or no .git in the copy
        env["git_commit"] = None
    cuda = torch.cuda.is_available()
    env["cuda_available"] = cuda
    if cuda and not check.dry:
        info = device_info()
        props = torch.cuda.get_device_properties(0)
        env.update(device=info["name"], gpu=info["gpu"],
                   capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                   sm_count=props.multi_processor_count, memory_gb=round(props.total_memory / 1e9, 1),
                   device_count=torch.cuda.device_count())
        check.device, check.gpu_key = "cuda", info["gpu"]
        gpu = GPUS.get(info["gpu"])
        env["peak_bf16_tflops"] = None if gpu is None else gpu.tflops
        env["peak_bandwidth_gbs"] = None if gpu is None else gpu.bandwidth_gbs
        if gpu is None:
            check.report["notes"].append(f"{info['name']} is not in pixart_fast.gpus.GPUS: no MFU or % of peak")
        try:
            import pynvml  # nvidia-ml-py, optional (the gpu extra): the driver's version where it is installed
            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # noqa: BLE001
            env["driver"] = f"unknown ({short_error(e)})"
    else:
        check.device = "cpu"
        env["device"] = "cpu"
        env["gpu"] = None
        if cuda:
            check.report["notes"].append("dry run: a CUDA GPU is present but unused")
    try:
        import workloads  # here, guarded: a failure to import it is recorded, not fatal
        env["diffusers_importable"] = workloads.PixArtTransformer2DModel is not None
        if workloads.DIFFUSERS_IMPORT_ERROR is not None:
            env["diffusers_import_error"] = short_error(workloads.DIFFUSERS_IMPORT_ERROR)
    except Exception as e:  # noqa: BLE001
        env["diffusers_importable"] = False
        env["workloads_import_error"] = short_error(e)
    return env
