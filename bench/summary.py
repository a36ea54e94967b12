"""Turn a pytest-benchmark JSON into a markdown summary the README can quote.

    pytest bench/ --benchmark-only --benchmark-json bench.json
    python bench/summary.py bench.json [-o BENCHMARKS.md]

Measured numbers and estimates are kept apart: every table built from rows marked "estimate" says so in its
heading and in its column names. Benchmarks that were skipped (no GPU) are absent from the JSON and from here.
"""
import argparse
import json
from pathlib import Path

from pixart_fast.tables import fmt, markdown_table

MIB = 2**20


def summarize(data: dict) -> str:
    """The markdown summary of one pytest-benchmark JSON document."""
    infos = [b["extra_info"] for b in data["benchmarks"] if b.get("extra_info", {}).get("kind")]
    by_kind = {}
    for info in infos:
        by_kind.setdefault(info["kind"], []).append(info)
    machine = data.get("machine_info", {})
    devices = sorted({i["device"] for i in infos if i.get("device")})
    cpu = machine.get("cpu", {})
    out = ["# pixart_fast benchmarks", "",
           f"Run {data.get('datetime', '?')} on {cpu.get('brand_raw', machine.get('processor', '?'))} "
           f"({cpu.get('count', '?')} CPU threads); devices used: {', '.join(devices) or '?'}.",
           "Command: `pytest bench/ --benchmark-only --benchmark-json FILE`, then `python bench/summary.py FILE`.", ""]
    gpu_kinds = {"kernel", "train_step", "largest_batch", "energy"}
    if not gpu_kinds & set(by_kind):
        out += ["No GPU took part in this run: every GPU figure below is an **estimate** from the roofline model "
                "of bench/test_bench_estimates.py, never a measurement.", ""]

    if "cpu_train_step" in by_kind:
        out += ["## Training step on the CPU: ours against diffusers (measured)", ""]
        out += markdown_table(["config", "batch", "ours ms", "diffusers ms", "ours / diffusers"],
                              [(i["config"], i["batch"], f"{i['ours_median_s'] * 1e3:.1f}",
                                f"{i['diffusers_median_s'] * 1e3:.1f}", f"{i['ratio_ours_over_diffusers']:.3f}")
                               for i in by_kind["cpu_train_step"]])
        out += ["Medians; the two steps alternate round by round so both see the same machine load.", ""]

    if "activation_memory" in by_kind:
        rows = by_kind["activation_memory"]
        ref = next((i for i in rows if i["model"] == "diffusers"), None)
        out += ["## Activation memory saved for backward, per 256-px image (measured, fp32)", ""]
        out += markdown_table(["variant", "MiB per block", "vs diffusers",
                               "PixArt-XL/2 MiB (extrapolated: base + 28 blocks)"],
                              [(i["variant"], f"{i['per_block_bytes'] / MIB:.2f}",
                                "-" if ref is None else f"{i['per_block_bytes'] / ref['per_block_bytes']:.3f}",
                                f"{i['xl2_extrapolated_bytes'] / MIB:.0f}") for i in rows])
        out += ["Distinct storages of the tensors autograd saves (saved_tensors_hooks), parameters excluded; "
                "XL width (D = 1152), 0 and 1 blocks, batch 1.", ""]

    if "aot" in by_kind:
        info = by_kind["aot"][0]
        spills = "".join(f"; {s}" for s in info["spilling"])
        out += ["## Ahead-of-time kernel compilation, sm_80 and sm_90 (measured by ptxas, no GPU needed)", "",
                f"{info['compilations']} compilations, largest register count {info['max_registers']}, "
                f"{len(info['spilling'])} with register spills{spills}.", ""]
        pairs = {}  # (kernel, config) -> {target: row}
        for r in info["rows"]:
            pairs.setdefault((r["kernel"], r["config"]), {})[r["target"]] = r
        out += markdown_table(["kernel", "registers sm_80", "registers sm_90", "spill bytes", "shared bytes (max)"],
                              [(kernel, by.get("sm_80", {}).get("registers", "-"),
                                by.get("sm_90", {}).get("registers", "-"),
                                sum(r["spill_bytes"] for r in by.values()), max(r["shared_bytes"] for r in by.values()))
                               for (kernel, config), by in pairs.items()])

    if "kernel" in by_kind:
        out += ["## Kernels on the GPU (measured)", ""]
        out += markdown_table(["kernel", "tokens", "batch", "impl", "direction", "us per call", "GB/s", "% peak BW",
                               "TFLOP/s", "device"],
                              [(i["kernel"], i["tokens"], i["batch"], i["impl"], i["direction"],
                                f"{i['seconds_per_call'] * 1e6:.1f}", f"{i['gb_per_s']:.0f}",
                                fmt(i["pct_peak_bandwidth"], ".0f"), f"{i['tflops']:.1f}", i["device"])
                               for i in by_kind["kernel"]])

    for kind, title in (("train_step", "PixArt-XL/2 training step on the GPU (measured)"),
                        ("largest_batch", "Largest batch that fits (measured)"),
                        ("energy", "Energy per training image (measured, NVML board counter)")):
        if kind not in by_kind:
            continue
        out += [f"## {title}", ""]
        header = ["variant", "px", "batch", "images/s", "TFLOP/s", "MFU", "peak GB", "device"]
        extra = {"largest_batch": ["probes"], "energy": ["J/image", "mean W"]}.get(kind, [])
        rows = []
        for i in by_kind[kind]:
            row = [i["variant"], i["resolution"], i["batch"], f"{i['images_per_s']:.1f}", f"{i['tflops']:.0f}",
                   fmt(i["mfu"], ".1%"), f"{i['peak_memory_gb']:.1f}", i["device"]]
            if kind == "largest_batch":
                row.append(i["probes"])
            if kind == "energy":
                row += [f"{i['joules_per_image']:.2f}", f"{i['mean_watts']:.0f}"]
            rows.append(row)
        out += markdown_table(header + extra, rows)

    if "estimates" in by_kind:
        info = by_kind["estimates"][0]
        out += ["## Estimates (roofline model, not measured)", "",
                "Lower bounds on time from the GPU table's dense bf16 peak and memory bandwidth: kernels take "
                "max(FLOPs / peak, bytes / bandwidth); a training step takes its matrix-product FLOPs (3 x forward) "
                "at peak plus AdamW's 28 bytes per parameter at bandwidth. Elementwise work is left out.", ""]
        out += markdown_table(["GPU", "px", "batch", "estimate: s/step", "estimate: images/s", "estimate: MFU"],
                              [(r["gpu"], r["resolution"], r["batch"], f"{r['seconds']:.3f}",
                                f"{r['images_per_s']:.0f}", f"{r['mfu']:.1%}") for r in info["train_rows"]])
        out += markdown_table(["GPU", "kernel", "tokens", "batch", "direction", "MB moved", "estimate: us", "bound"],
                              [(r["gpu"], r["kernel"], r["tokens"], r["batch"], r["direction"],
                                f"{r['bytes'] / 1e6:.0f}", f"{r['seconds'] * 1e6:.0f}", r["bound"])
                               for r in info["kernel_rows"]])
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Markdown summary of a `pytest bench/ --benchmark-json FILE` result")
    parser.add_argument("json", help="the pytest-benchmark JSON file")
    parser.add_argument("-o", "--output", help="write the markdown here (default: print it)")
    args = parser.parse_args(argv)
    text = summarize(json.loads(Path(args.json).read_text()))
    if args.output:
        Path(args.output).write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
