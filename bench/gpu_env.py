"""What the GPU check runs on, for its report: Python, the packages' versions, the host, the git commit; whether
CUDA works (and if not, torch.cuda.init()'s error with the driver and CUDA versions); and the card: its name,
SMs, memory and board power limit (NVML), the entry of the GPU table they identify (SXM, NVL or PCIe) and the
peaks MFU and % of peak are taken against.
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
from pixart_fast.gpus import GPUS, identify

ROOT = Path(__file__).resolve().parent.parent


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvml():
    """(pynvml initialised, None), or (None, why not: nvidia-ml-py missing, or NVML did not start)."""
    try:
        import pynvml  # nvidia-ml-py, optional: the driver's facts where it is installed
        pynvml.nvmlInit()
        return pynvml, None
    except Exception as e:  # noqa: BLE001
        return None, short_error(e)


def driver_facts() -> dict:
    """The driver's version and the CUDA version it supports, from NVML, /proc and nvidia-smi where each answers."""
    facts = {}
    nvml, why = _nvml()
    if nvml is not None:
        try:
            facts["driver"] = nvml.nvmlSystemGetDriverVersion()
            cuda = nvml.nvmlSystemGetCudaDriverVersion_v2()
            facts["driver_cuda"] = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except Exception as e:  # noqa: BLE001
            facts["nvml_error"] = short_error(e)
    else:
        facts["nvml_error"] = why
    try:
        facts["proc_driver"] = Path("/proc/driver/nvidia/version").read_text().splitlines()[0].strip()
    except OSError:
        pass
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,power.max_limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        facts["nvidia_smi"] = (smi.stdout.strip() or smi.stderr.strip())[:300]
    except (OSError, subprocess.SubprocessError) as e:
        facts["nvidia_smi"] = f"not run ({short_error(e)})"
    return facts


def cuda_probe() -> dict:
    """Whether CUDA works: torch.cuda.init() and one kernel on device 0. {"usable": bool, "error": text or
    absent, "cuda_available": torch.cuda.is_available(), "torch_cuda": the CUDA torch was built with, and the
    driver's facts}."""
    probe = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
             "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        torch.cuda.init()
        x = torch.ones(4, device="cuda")
        if (x + 1).sum().item() != 8:
            raise RuntimeError("a CUDA kernel gave a wrong sum")
        probe["usable"] = True
    except Exception as e:  # noqa: BLE001
        probe["usable"], probe["error"] = False, short_error(e)
    probe.update(driver_facts())
    return probe


def power_limit_w(index: int = 0) -> tuple[float | None, str]:
    """The board's largest settable power limit, W, and where it came from (NVML, else nvidia-smi); None where
    neither says."""
    nvml, _ = _nvml()
    reads = []
    if nvml is not None:
        def handle():
            try:  # NVML numbers GPUs its own way (CUDA_VISIBLE_DEVICES does not apply): torch's device by UUID
                return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(index).uuid}")
            except Exception:  # noqa: BLE001
                return nvml.nvmlDeviceGetHandleByIndex(index)
        reads += [("NVML max power limit", lambda: nvml.nvmlDeviceGetPowerManagementLimitConstraints(handle())[1] / 1e3),
                  ("NVML default power limit", lambda: nvml.nvmlDeviceGetPowerManagementDefaultLimit(handle()) / 1e3)]
    reads.append(("nvidia-smi power.max_limit", lambda: float(subprocess.run(
        ["nvidia-smi", "--query-gpu=power.max_limit", "--format=csv,noheader,nounits", f"--id={index}"],
        capture_output=True, text=True, timeout=20).stdout.split()[0])))
    for source, read in reads:
        try:
            return read(), source
        except Exception:  # noqa: BLE001 - the next source
            continue
    return None, "neither NVML nor nvidia-smi gave a power limit"


def card() -> dict:
    """Device 0: name, SMs, memory, power limit, and the GPU table's entry they identify, with its peaks."""
    props = torch.cuda.get_device_properties(0)
    watts, source = power_limit_w(0)
    key, why = identify(props.name, props.total_memory, props.multi_processor_count, watts)
    gpu = GPUS.get(key)
    return dict(device=props.name, gpu=key, identified_as=why, sm_count=props.multi_processor_count,
                memory_gb=round(props.total_memory / 1e9, 1), power_limit_w=watts, power_limit_source=source,
                capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                device_count=torch.cuda.device_count(), peak_name=None if gpu is None else gpu.name,
                peak_bf16_tflops=None if gpu is None else gpu.tflops,
                peak_bandwidth_gbs=None if gpu is None else gpu.bandwidth_gbs)


def environment(check: Check, project: str) -> dict:
    """The environment as the report holds it. Sets check.device ("cuda"; "cpu" in a dry run; None where a real
    run finds no usable CUDA, env["cuda_error"] then saying why) and check.gpu_key. project: where pixart_fast
    was imported from (gpu_check.ensure_importable)."""
    env = {
        "python": sys.version.split()[0], "platform": platform.platform(), "host": socket.gethostname(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
        "triton": _version("triton"), "transformers": _version("transformers"), "diffusers": _version("diffusers"),
        "nvidia-ml-py": _version("nvidia-ml-py"), "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "pixart_fast": project,
    }
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine, or no .git in the copy
        env["git_commit"] = None
    probe = cuda_probe()
    env["cuda"] = probe
    env["cuda_available"] = probe["cuda_available"]
    if check.dry:
        check.device, env["device"], env["gpu"] = "cpu", "cpu", None
        if probe["usable"]:
            check.report["notes"].append("dry run: a CUDA GPU is present but unused")
    elif probe["usable"]:
        env.update(card())
        check.device, check.gpu_key = "cuda", env["gpu"]
        if env["gpu"] is None:
            check.report["notes"].append(f"{env['device']} is not in pixart_fast.gpus.GPUS: no MFU or % of peak")
    else:
        check.device, env["device"], env["gpu"] = None, None, None
        env["cuda_error"] = probe["error"]
    try:
        import workloads  # here, guarded: a failure to import it is recorded, not fatal
        env["diffusers_importable"] = workloads.PixArtTransformer2DModel is not None
        if workloads.DIFFUSERS_IMPORT_ERROR is not None:
            env["diffusers_import_error"] = short_error(workloads.DIFFUSERS_IMPORT_ERROR)
    except Exception as e:  # noqa: BLE001
        env["diffusers_importable"] = False
        env["workloads_import_error"] = short_error(e)
    return env
