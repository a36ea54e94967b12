"""What the GPU check writes: gpu_check.json (the report, replaced whole before and after every part and item) and
summary.md, the report as markdown whose first line says whether the GPU ran; and the names of the parts, their
labels and the form errors take in the report.
"""
import json
import os
import traceback
from pathlib import Path

from pixart_fast.tables import fmt, markdown_table

SCHEMA = "pixart_fast.gpu_check/2"
JSON_NAME, SUMMARY_NAME = "gpu_check.json", "summary.md"

# In the order they run: what the project most needs to know first (bench/gpu_parts.py says what each measures).
PARTS = ("warmup", "kernels", "train_steps_256", "profile", "token_levers", "fp8_gemm", "energy", "largest_batch",
         "train_steps_512")
LABELS = {
    "warmup": "(a) cold start: every Triton kernel's first calls (compilation)",
    "kernels": "(b) kernels against eager PyTorch and torch.compile, % of roofline, 256 and 1024 tokens",
    "train_steps_256": "(c) PixArt-XL/2 training step, 256 px",
    "profile": "(d) step breakdown: matmul, attention, modulation, optimizer, EMA, other (torch.profiler)",
    "token_levers": "(e) the 256-px step with token masking and routing (0.5 each), images/s against the full step",
    "fp8_gemm": "(f) the block's GEMMs in bf16 and FP8 (torch._scaled_mm), and the step speed-up",
    "energy": "(g) energy per 256-px training image (NVML)",
    "largest_batch": "(h) largest batch at 256 px",
    "train_steps_512": "(i) PixArt-XL/2 training step, 512 px",
}
MODULATE_FAMILY = ("modulate", "gated_residual", "gated_residual_modulate")
GOAL_TOKENS = 256  # PixArt-XL/2 at 256 px


def short_error(error: BaseException) -> str:
    """An error in one line of at most about 600 characters: its type and message."""
    text = f"{type(error).__name__}: {error}".strip()
    return text if len(text) < 600 else text[:600] + " ..."


def error_trace(error: BaseException) -> str:
    """An error's traceback, its middle cut where it runs over 6000 characters."""
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text if len(text) < 6000 else text[:1500] + "\n...\n" + text[-4000:]


def _replace(path: Path, text: str):
    """Write `text` to path through a temporary file and a rename: a reader (or a kill) never sees half of it."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_report(out: Path, report: dict):
    """gpu_check.json and summary.md in the folder `out`, each replaced whole."""
    out.mkdir(parents=True, exist_ok=True)
    _replace(out / JSON_NAME, json.dumps(report, indent=1, default=str) + "\n")
    _replace(out / SUMMARY_NAME, safe_summary(report))


def rows_of(report: dict, kind: str) -> list[dict]:
    """The rows of one kind from every part, in the order the parts ran."""
    return [r for p in report.get("parts", {}).values() for r in p.get("rows", []) if r.get("kind") == kind]


def headline(report: dict) -> str:
    """summary.md's first line: whether the GPU ran, and on what."""
    env = report.get("environment", {})
    if report.get("dry_run"):
        return "# GPU ran: NO (dry run: a rehearsal on the CPU at tiny shapes; nothing here was measured on a GPU)"
    if env.get("cuda_error"):
        return f"# GPU ran: NO (no usable CUDA: {env['cuda_error'][:300]})"
    if not env.get("device"):
        return "# GPU ran: NO (the check stopped before it found a device: see the notes)"
    parts = report.get("parts", {}).values()
    measured = len(report.get("benchmarks", []))
    ok = sum(p.get("status") == "ok" for p in parts)
    state = "finished" if report.get("finished") and report.get("complete") else \
        "stopped early" if report.get("finished") else "killed, or still running"
    card = f"{env['device']} as {env.get('gpu') or 'a GPU not in the table'}"
    if not measured:
        return f"# GPU ran: NO measurement (CUDA started on {card}, but no part measured anything; {state})"
    return f"# GPU ran: yes, {card}: {measured} rows measured, {ok} of {len(parts)} parts ok; {state}"


def _train_table(rows, extra=()) -> list[str]:
    ref = {r["resolution"]: r["images_per_s"] for r in rows if r["variant"] == "diffusers"}
    header = ["variant", "px", "batch", "ms/step", "host ms/step", "images/s", "vs diffusers", "TFLOP/s", "MFU",
              "peak GB", "cold start s"]
    out = []
    for r in rows:
        vs = ref.get(r["resolution"])
        line = [r["variant"] + (f" ({r['compile_mode']})" if r.get("compile_mode") else "") +
                (" [stand-in]" if r.get("stand_in") else ""), r["resolution"], r["batch"],
                fmt(r["seconds_per_step"] * 1e3, ".1f"), fmt(_ms(r.get("host_seconds_per_step")), ".1f"),
                fmt(r["images_per_s"], ".1f"), "-" if not vs else f"{r['images_per_s'] / vs:.2f}x",
                fmt(r["tflops"], ".1f"), fmt(r["mfu"], ".1%"), fmt(r.get("peak_memory_gb"), ".1f"),
                fmt(r.get("cold_start_s"), ".1f")]
        for _, key, spec in extra:
            line.append(fmt(r.get(key), spec) if spec else r.get(key))
        out.append(line)
    return markdown_table(header + [e[0] for e in extra], out)


def _ms(seconds):
    return None if seconds is None else seconds * 1e3


def _kernel_table(rows) -> list[str]:
    by = {}
    for r in rows:
        by.setdefault((r["kernel"], r["tokens"], r["batch"], r["direction"]), {})[r["impl"]] = r
    out = []
    for (kernel, tokens, batch, direction), impls in by.items():
        us = {k: v["seconds_per_call"] * 1e6 for k, v in impls.items()}
        tri = impls.get("triton")
        out.append([kernel, tokens, batch, direction, *(fmt(us.get(k), ".1f") for k in ("triton", "eager", "compile")),
                    "-" if "triton" not in us or "eager" not in us else f"{us['eager'] / us['triton']:.2f}x",
                    "-" if "triton" not in us or "compile" not in us else f"{us['compile'] / us['triton']:.2f}x",
                    "-" if tri is None else fmt(tri.get("stream_seconds_per_call", 0) * 1e6, ".1f"),
                    "-" if tri is None else fmt(_us(tri.get("roofline_s")), ".1f"),
                    "-" if tri is None else fmt(tri.get("pct_roofline"), ".0f"),
                    "-" if tri is None else f"{tri['gb_per_s']:.0f}",
                    "-" if tri is None else fmt(tri.get("launches_per_call"), ".0f")])
    return markdown_table(["kernel", "tokens", "batch", "direction", "triton us", "eager us", "compile us",
                           "triton vs eager", "vs compile", "triton stream us", "roofline us", "triton % roofline",
                           "triton GB/s", "launches"], out)


def _us(seconds):
    return None if seconds is None else seconds * 1e6


def _goal_table(rows) -> list[str]:
    """The kernels' goals at 256-px XL shapes, against what this run measured: every modulate-family
    kernel at >= 80 % of its roofline (forward, and forward + backward); the fused kernels (modulate family and
    cross-attention) >= 1.2x torch.compile of their references, forward + backward; cross-attention forward +
    backward faster than its reference, F.scaled_dot_product_attention with the same mask (eager)."""
    by = {}
    for r in rows:
        if r["tokens"] == GOAL_TOKENS:
            by.setdefault((r["kernel"], r["direction"]), {})[r["impl"]] = r
    out = []

    def add(goal, kernel, direction, value, target, spec):
        out.append([goal, kernel, direction, fmt(value, spec), format(target, spec),
                    "-" if value is None else ("yes" if value >= target else "no")])

    for (kernel, direction), impls in by.items():
        tri, comp, eager = impls.get("triton"), impls.get("compile"), impls.get("eager")
        if kernel in MODULATE_FAMILY:
            add(">= 80 % of roofline", kernel, direction, tri and tri.get("pct_roofline"), 80, ".0f")
        if direction == "fwd+bwd" and (kernel in MODULATE_FAMILY or kernel == "cross_attention"):
            speedup = comp["seconds_per_call"] / tri["seconds_per_call"] if tri and comp else None
            add(">= 1.2x torch.compile", kernel, direction, speedup, 1.2, ".2f")
        if direction == "fwd+bwd" and kernel == "cross_attention":
            speedup = eager["seconds_per_call"] / tri["seconds_per_call"] if tri and eager else None
            add("faster than SDPA (same mask)", kernel, direction, speedup, 1.0, ".2f")
    return markdown_table(["goal", "kernel", "direction", "measured", "goal value", "met"], out)


def _profile_lines(table: dict) -> list[str]:
    out = [f"{table['what']}; {table['variant']}, batch {table['batch']}, {table['config']}: kernels "
           f"{table['kernel_ms_per_step']:.1f} ms per step against a step of {table['step_ms']:.1f} ms (CUDA events; "
           "the difference is time the device waited on the host).", ""]
    out += markdown_table(["category", "ms per step", "%"], [(k, f"{v['ms']:.2f}", f"{v['pct']:.1f}")
                                                             for k, v in table["categories"].items()])
    out += markdown_table(["#", "name", "category", "calls", "ms", "%", "avg us"],
                          [(i + 1, r["name"][:90].replace("|", "/"), r["category"], r["calls"],
                            f"{r['self_us'] / 1e3:.2f}", f"{r['pct']:.1f}", f"{r['avg_us']:.1f}")
                           for i, r in enumerate(table["top"])])
    return out


def _fp8_lines(rows, part) -> list[str]:
    out = markdown_table(["layer", "GEMM", "tokens", "m x k x n", "bf16 us", "FP8 GEMM us", "FP8 + casts us",
                          "speed-up (GEMM)", "speed-up (with casts)", "bf16 TFLOP/s", "FP8 TFLOP/s", "rel. error"],
                         [(r["layer"], r["gemm"], r["tokens"], f"{r['m']}x{r['k']}x{r['n']}", f"{r['bf16_s'] * 1e6:.1f}",
                           f"{r['fp8_gemm_s'] * 1e6:.1f}", f"{r['fp8_total_s'] * 1e6:.1f}",
                           f"{r['speedup_gemm']:.2f}x", f"{r['speedup_total']:.2f}x", f"{r['bf16_tflops']:.0f}",
                           f"{r['fp8_tflops']:.0f}", f"{r['rel_error']:.3f}") for r in rows])
    gain = part.get("step_gain") or []
    if gain:
        out += [f"The step's speed-up if a layer's three GEMMs ran in FP8 in every block, casts included; "
                f"{part.get('step_gain_note')}:", ""]
        out += markdown_table(["layer", "saved ms per step", "step ms", "step speed-up"],
                              [(g["layer"], f"{g['saved_ms']:.2f}", fmt(g["step_ms"], ".1f"),
                                fmt(g["step_speedup"], ".3f")) for g in gain])
    return out


def _card_line(env: dict) -> str:
    if not env.get("gpu") and env.get("device") in (None, "cpu"):
        return f"Device: {env.get('device') or 'none'}."
    return (f"Card: {env.get('device')}, {env.get('memory_gb')} GB -> table entry {env.get('gpu')}, "
            f"{env.get('identified_as')} (power limit from {env.get('power_limit_source')}). MFU and % of peak "
            f"against {env.get('peak_name')}: {env.get('peak_bf16_tflops')} TFLOP/s dense bf16, "
            f"{env.get('peak_bandwidth_gbs')} GB/s.")


def summarize(report: dict) -> str:
    env = report.get("environment", {})
    dry = report.get("dry_run")
    where = "dry run: CPU, tiny shapes" if dry else "measured"
    out = [headline(report), "",
           f"Started {report.get('started')}, finished {report.get('finished') or 'not finished'}, "
           f"{report.get('elapsed_s')} s (budget {report.get('budget_s')} s, hard limit {report.get('limit_s')} s); "
           f"complete: {report.get('complete')}.", _card_line(env),
           f"torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, triton {env.get('triton')}, diffusers "
           f"{env.get('diffusers')}, transformers {env.get('transformers')}, python {env.get('python')}; commit "
           f"{env.get('git_commit')}.",
           f"Command: `{report.get('command')}`; torch.compile mode for training steps: {report.get('compile_mode')}.",
           ""]
    cuda = env.get("cuda") or {}
    if env.get("cuda_error"):
        out += ["## CUDA did not start", "", f"- torch.cuda.init(): {env['cuda_error']}",
                f"- torch {env.get('torch')} built for CUDA {cuda.get('torch_cuda')}; "
                f"torch.cuda.is_available(): {cuda.get('cuda_available')}",
                *(f"- {k}: {cuda[k]}" for k in ("driver", "driver_cuda", "proc_driver", "nvidia_smi", "nvml_error",
                                                  "CUDA_VISIBLE_DEVICES") if cuda.get(k) is not None), ""]
    inst = report.get("install", {})
    out += ["## Install", "", f"- project: {inst.get('project')}", f"- diffusers: {inst.get('diffusers')}", ""]
    for note in report.get("notes", []):
        out.append(f"- note: {note}")
    out += ["", "## Parts", ""]
    rows = []
    for name, part in report.get("parts", {}).items():
        bad = [i for i in part.get("items", []) if i["status"] != "ok"]
        detail = "; ".join([*(part.get("notes") or []), *([part["error"]] if part.get("error") else []),
                            *(f"{i['name']}: {i.get('error') or i['status']}" for i in bad[:6]),
                            *([f"... {len(bad) - 6} more"] if len(bad) > 6 else [])])
        rows.append((name, part.get("label"), part.get("status"), part.get("started_s"), part.get("seconds"),
                     part.get("limit_s"), detail.replace("|", "/").replace("\n", " ")[:700]))
    out += markdown_table(["part", "what", "status", "started at s", "s", "limit s", "notes / errors"], rows)

    cold = rows_of(report, "cold_start")
    trains = rows_of(report, "train_step")
    if cold or trains:
        out += [f"## Cold start ({where})", "",
                "First calls, timed apart and left out of every other number: Triton's compilation of each kernel "
                "(forward, then forward + backward), and each training variant's first step (torch.compile, "
                "autotuning, the optimizer's state, the allocator).", ""]
        out += markdown_table(["what", "first fwd s", "first fwd+bwd s / first step s", "build s"],
                              [*((f"{r['kernel']} T{r['tokens']} ({r['impl']})", fmt(r["first_fwd_s"], ".2f"),
                                  fmt(r["first_fwd_bwd_s"], ".2f"), "-") for r in cold),
                               *((f"step {r['variant']} {r['resolution']} px", "-", fmt(r.get("cold_start_s"), ".2f"),
                                  fmt(r.get("build_s"), ".2f")) for r in trains)])
    if trains:
        out += [f"## PixArt-XL/2 training step ({where}; bf16 autocast, fused AdamW)", "",
                "ms/step: median of CUDA events between back-to-back steps (the device's time); host ms/step: the "
                "host clock over the same steps. MFU = pixart_fast.flops.flops_per_image x batch / step time / the "
                "card's dense bf16 peak. Peak GB: torch.cuda.max_memory_allocated over the timed steps.", ""]
        out += _train_table(trains)
    kernels = rows_of(report, "kernel")
    if kernels:
        out += [f"## Kernels ({where}; per call, median)", "",
                "us: device time, the kernels' summed duration from torch.profiler (no launch gaps, no host "
                "time); stream us: CUDA events between back-to-back calls (where it exceeds the device time, the "
                "host's launches are the limit). Roofline: kernels/roofline.py for this card. Speed-up = other "
                "implementation's time / Triton's (above 1: Triton faster). Forward runs with gradients enabled.", ""]
        out += _kernel_table(kernels)
        out += [f"## Kernel goals at {GOAL_TOKENS} tokens ({where})", ""]
        out += _goal_table(kernels)
    profile = report.get("parts", {}).get("profile", {}).get("table")
    if profile:
        out += [f"## Step breakdown ({where})", ""] + _profile_lines(profile)
    gemms = rows_of(report, "gemm_fp8")
    if gemms:
        out += [f"## GEMMs in bf16 and FP8 ({where})", "",
                "FP8: e4m3 operands with one scale per tensor (torch._scaled_mm, fp32 accumulation); 'with casts' "
                "adds each operand's amax, scale and cast (and transpose, where FP8's layout needs it), compiled. "
                "Each GEMM pays both its operands' casts (a real recipe shares some). Rel. error: FP8 against bf16.",
                ""]
        out += _fp8_lines(gemms, report["parts"].get("fp8_gemm", {}))
    levers = rows_of(report, "token_levers")
    if levers:
        out += [f"## Token masking and routing, 256 px ({where}; ours, Triton kernels, not compiled)", "",
                "Masking drops a fraction of each image's tokens after the patch embedding (the loss reads the kept "
                "patches); routing sends a fraction of the rest past blocks 1 to depth - 2. TFLOP/s and MFU count "
                "the FLOPs the step really runs (pixart_fast.flops with the same ratios).", ""]
        out += _train_table(levers, [("levers", "levers", None), ("vs full", "speedup_vs_full", ".2f")])
    largest = rows_of(report, "largest_batch")
    if largest:
        out += [f"## Largest batch at 256 px ({where})", ""]
        out += _train_table(largest, [("probes", "probes", None), ("search s", "search_seconds", ".1f")])
    energy = rows_of(report, "energy")
    if energy:
        out += [f"## Energy per training image ({where}, NVML board counter)", ""]
        out += _train_table(energy, [("J/image", "joules_per_image", ".2f"), ("mean W", "mean_watts", ".0f")])

    errors = [(n, p) for n, p in report.get("parts", {}).items() if p.get("traceback")]
    errors += [(f"{n} / {i['name']}", i) for n, p in report.get("parts", {}).items()
               for i in p.get("items", []) if i.get("traceback")]
    if errors:
        out += ["## Errors", ""]
        for name, e in errors[:12]:
            out += [f"### {name}", "", "```", e["traceback"].strip()[-2500:], "```", ""]
    return "\n".join(out) + "\n"


def safe_summary(report: dict) -> str:
    """summarize, or (should it fail) the headline and a page saying so: the JSON holds everything anyway."""
    try:
        return summarize(report)
    except Exception as e:  # noqa: BLE001
        try:
            first = headline(report)
        except Exception:  # noqa: BLE001
            first = "# GPU ran: unknown (the summary failed: see gpu_check.json)"
        return (f"{first}\n\nThe summary could not be written ({short_error(e)}); everything is in {JSON_NAME}."
                f"\n\n```\n{error_trace(e)}\n```\n")
