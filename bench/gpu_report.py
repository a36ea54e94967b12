"""What the GPU check writes: gpu_check.json (the report, rewritten after every item) and summary.md, the report
as markdown tables; and the names of the parts, their labels and the form errors take in the report.
"""
import json
import traceback
from pathlib import Path

from pixart_fast.tables import fmt, markdown_table

SCHEMA = "pixart_fast.gpu_check/1"
JSON_NAME, SUMMARY_NAME = "gpu_check.json", "summary.md"

PARTS = ("train_steps_256", "energy", "profile", "kernels", "largest_batch", "train_steps_512")
LABELS = {
    "kernels": "(a) kernels against eager PyTorch and torch.compile, PixArt-XL/2 shapes, 256 and 1024 tokens",
    "train_steps_256": "(b) PixArt-XL/2 training step, 256 px",
    "train_steps_512": "(b) PixArt-XL/2 training step, 512 px",
    "largest_batch": "(c) largest batch at 256 px",
    "energy": "(d) energy per 256-px training image (NVML)",
    "profile": "(e) torch.profiler: top 25 CUDA kernels of one training step",
}
WARMUP_STEPS = 3  # untimed training steps before the timed ones: the parts run them, summary.md says so
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


def write_report(out: Path, report: dict):
    """gpu_check.json (replaced whole, never half-written) and summary.md in the folder `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    tmp.replace(out / JSON_NAME)
    (out / SUMMARY_NAME).write_text(safe_summary(report))


def _train_table(rows, extra=()) -> list[str]:
    ref = {r["resolution"]: r["images_per_s"] for r in rows if r["variant"] == "diffusers"}
    header = ["variant", "px", "batch", "ms/step", "images/s", "vs diffusers", "TFLOP/s", "MFU", "peak GB",
              "warm-up s"]
    out = []
    for r in rows:
        vs = ref.get(r["resolution"])
        line = [r["variant"] + (f" ({r['compile_mode']})" if r.get("compile_mode") else ""), r["resolution"],
                r["batch"], fmt(r["seconds_per_step"] * 1e3, ".1f"), fmt(r["images_per_s"], ".1f"),
                "-" if not vs else f"{r['images_per_s'] / vs:.2f}x", fmt(r["tflops"], ".1f"), fmt(r["mfu"], ".1%"),
                fmt(r.get("peak_memory_gb"), ".1f"), fmt(r.get("warmup_s"), ".1f")]
        for _, key, spec in extra:
            line.append(fmt(r.get(key), spec) if spec else r.get(key))
        out.append(line)
    return markdown_table(header + [e[0] for e in extra], out)


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
                    "-" if tri is None else f"{tri['gb_per_s']:.0f}",
                    "-" if tri is None else fmt(tri["pct_peak_bandwidth"], ".0f"),
                    "-" if tri is None else fmt(tri.get("pct_roofline"), ".0f")])
    return markdown_table(["kernel", "tokens", "batch", "direction", "triton us", "eager us", "compile us",
                           "triton speed-up vs eager", "vs compile", "triton GB/s", "triton % peak BW",
                           "triton % roofline"], out)


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
    out = [f"{table['what']}; {table['variant']}, batch {table['batch']}, {table['config']}; total "
           f"{table['total_us'] / 1e3:.1f} ms over {table['distinct']} distinct names.", ""]
    out += markdown_table(["category", "ms", "%"], [(k, f"{v['us'] / 1e3:.2f}", f"{v['pct']:.1f}")
                                                   for k, v in table["categories"].items()])
    out += markdown_table(["#", "name", "category", "calls", "self ms", "%", "avg us"],
                          [(i + 1, r["name"][:90].replace("|", "/"), r["category"], r["calls"],
                            f"{r['self_us'] / 1e3:.2f}", f"{r['pct']:.1f}", f"{r['avg_us']:.1f}")
                           for i, r in enumerate(table["top"])])
    return out


def summarize(report: dict) -> str:
    env = report.get("environment", {})
    out = ["# pixart_fast one-shot GPU check" + (" (DRY RUN: CPU, tiny shapes, nothing measured on a GPU)"
                                                 if report.get("dry_run") else ""), "",
           f"Started {report.get('started')}, finished {report.get('finished') or 'not finished'}, "
           f"{report.get('elapsed_s')} s (budget {report.get('budget_s')} s, hard limit {report.get('limit_s')} s); "
           f"complete: {report.get('complete')}.",
           f"Device: {env.get('device', '?')} (planner key {env.get('gpu')}, bf16 peak {env.get('peak_bf16_tflops')} "
           f"TFLOP/s, {env.get('peak_bandwidth_gbs')} GB/s); torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, "
           f"triton {env.get('triton')}, diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, "
           f"python {env.get('python')}; commit {env.get('git_commit')}.",
           f"Command: `{report.get('command')}`; torch.compile mode for training steps: {report.get('compile_mode')}.",
           ""]
    inst = report.get("install", {})
    out += ["## Install", "", f"- project: {inst.get('project')}", f"- diffusers: {inst.get('diffusers')}", ""]
    for note in report.get("notes", []):
        out.append(f"- note: {note}")
    out += ["## Parts", ""]
    rows = []
    for name, part in report.get("parts", {}).items():
        bad = [i for i in part.get("items", []) if i["status"] not in ("ok",)]
        detail = "; ".join([*(part.get("notes") or []), *([part["error"]] if part.get("error") else []),
                            *(f"{i['name']}: {i.get('error') or i['status']}" for i in bad[:6]),
                            *([f"... {len(bad) - 6} more"] if len(bad) > 6 else [])])
        smoke = part.get("smoke")
        if smoke:
            detail = (detail + "; " if detail else "") + f"dry-run smoke on the CPU: {smoke.get('status')}"
        rows.append((name, part.get("label"), part.get("status"), part.get("seconds"),
                     detail.replace("|", "/").replace("\n", " ")[:700]))
    out += markdown_table(["part", "what", "status", "s", "notes / errors"], rows)

    infos = [b["extra_info"] for b in report.get("benchmarks", [])]
    kinds = {}
    for i in infos:
        kinds.setdefault(i["kind"], []).append(i)
    if "train_step" in kinds:
        out += ["## PixArt-XL/2 training step (measured; bf16 autocast, fused AdamW)", "",
                "MFU = pixart_fast.flops.flops_per_image x batch / step time / the GPU's dense bf16 peak. "
                "Peak GB: torch.cuda.max_memory_allocated over the timed steps. Warm-up: the first "
                f"{WARMUP_STEPS} steps (compilation included).", ""]
        out += _train_table(kinds["train_step"])
    if "kernel" in kinds:
        out += ["## Kernels (measured; per call, median)", "",
                "Speed-up = other implementation's time / Triton's (above 1: Triton faster). Forward runs with "
                "gradients enabled, as in training.", ""]
        out += _kernel_table(kinds["kernel"])
        out += [f"## Kernel goals at {GOAL_TOKENS} tokens (measured here against them)", "",
                "Measured: Triton's % of kernels/roofline.py's roofline time, or the other implementation's time "
                "/ Triton's.", ""]
        out += _goal_table(kinds["kernel"])
    if "largest_batch" in kinds:
        out += ["## Largest batch at 256 px (measured)", ""]
        out += _train_table(kinds["largest_batch"], [("probes", "probes", None), ("search s", "search_seconds", ".1f")])
    if "energy" in kinds:
        out += ["## Energy per training image (measured, NVML board counter)", ""]
        out += _train_table(kinds["energy"], [("J/image", "joules_per_image", ".2f"), ("mean W", "mean_watts", ".0f")])
    profile = report.get("parts", {}).get("profile", {}).get("table")
    if profile:
        out += ["## Profile of one training step (measured)", ""] + _profile_lines(profile)

    smokes = {n: p["smoke"] for n, p in report.get("parts", {}).items() if p.get("smoke")}
    if smokes:
        out += ["## Dry-run smoke (CPU, tiny shapes: proves the code paths, measures nothing of interest)", ""]
        for name, smoke in smokes.items():
            out += [f"### {name}: {smoke.get('status')}", ""]
            if smoke.get("note"):
                out += [smoke["note"], ""]
            srows = smoke.get("rows") or []
            if srows and srows[0]["kind"] == "kernel":
                out += _kernel_table(srows)
            elif srows:
                out += _train_table(srows, [("probes", "probes", None)] if srows[0]["kind"] == "largest_batch" else [])
            if smoke.get("table"):
                table = dict(smoke["table"], top=smoke["table"]["top"][:10])
                out += _profile_lines(table)
            not_run = {}
            for i in smoke.get("items", []):
                if i["status"] != "ok":
                    not_run.setdefault(i.get("error") or i["status"], []).append(i["name"])
            for why, names in not_run.items():
                out += [f"Not run ({why}): {len(names)}: " + ", ".join(names[:8]) +
                        (f", ... {len(names) - 8} more" if len(names) > 8 else ""), ""]

    errors = [(n, p) for n, p in report.get("parts", {}).items() if p.get("traceback")]
    errors += [(f"{n} / {i['name']}", i) for n, p in report.get("parts", {}).items()
               for i in [*p.get("items", []), *(p.get("smoke") or {}).get("items", [])] if i.get("traceback")]
    if errors:
        out += ["## Errors", ""]
        for name, e in errors[:12]:
            out += [f"### {name}", "", "```", e["traceback"].strip()[-2500:], "```", ""]
    return "\n".join(out) + "\n"


def safe_summary(report: dict) -> str:
    """summarize, or (should it fail) a page saying so: the JSON holds everything anyway."""
    try:
        return summarize(report)
    except Exception as e:  # noqa: BLE001
        return (f"# pixart_fast one-shot GPU check\n\nThe summary could not be written ({short_error(e)}); "
                f"everything is in {JSON_NAME}.\n\n```\n{error_trace(e)}\n```\n")
