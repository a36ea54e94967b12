"""Benchmarks: `pytest bench/ --benchmark-only [--benchmark-json FILE]`; `python bench/summary.py FILE` turns the
JSON into markdown.

GPU benchmarks (kernels, PixArt-XL/2 training steps, the largest batch, energy) need CUDA and skip elsewhere,
saying why. The rest runs everywhere: a small training step against diffusers on the CPU, activation memory
saved for backward, the ahead-of-time kernel report, and the roofline estimates. Every benchmark records what
it measured in extra_info under "kind"; a number that was not measured sits in a row marked "estimate": true.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers / diffusers are imported: never the hub

import pytest  # noqa: E402

from gpus import device_info  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--train-res", default="256,512,1024",
                     help="image sizes (px, comma-separated) of the PixArt-XL/2 training-step benchmarks on a GPU")


@pytest.fixture(scope="session")
def device() -> dict:
    """{"device": "cuda" | "cpu", "name", "gpu": the planner's GPUS key or None}."""
    return device_info()


@pytest.fixture
def cuda_device(device) -> dict:
    """The device, for benchmarks that only mean something on a GPU: skips on a machine without CUDA."""
    if device["device"] != "cuda":
        pytest.skip("needs a CUDA GPU and this machine has none; test_bench_estimates.py gives labelled estimates")
    return device


@pytest.fixture(scope="session")
def train_resolutions(request) -> set[int]:
    return {int(r) for r in request.config.getoption("--train-res").split(",")}



class PrintedSummary:
    """Shows what the benchmarks print (the CPU ratio ours/diffusers, memory per image, the estimate table, the
    kernel report) in the terminal summary, so `pytest bench/ --benchmark-only` reports it without -s."""

    def __init__(self):
        self.printed = []  # (test id, text)

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed and report.capstdout.strip():
            self.printed.append((report.nodeid, report.capstdout.strip()))

    def pytest_terminal_summary(self, terminalreporter):
        if self.printed:
            terminalreporter.section("what the benchmarks measured")
            for nodeid, text in self.printed:
                terminalreporter.write_line(f"{nodeid}\n{text}\n")


def pytest_configure(config):
    config.pluginmanager.register(PrintedSummary(), "pixart_fast_printed_summary")
