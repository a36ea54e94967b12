"""Grids of the modulation kernels sized from measured occupancy: the programs
per SM read from the compiled kernel, the tokens per program chosen for whole waves."""
import math
from types import SimpleNamespace

import pytest
import torch

from pixart_fast.kernels import utils
from pixart_fast.kernels.utils import NOMINAL_PROGRAMS_PER_SM, compiled_programs_per_sm, tokens_per_program

XL = [(128, 256), (32, 1024), (8, 4096)]  # (B, T) at 32768 tokens per call


def _waves(B, T, rows, slots):
    return B * math.ceil(T / rows) / slots


@pytest.mark.parametrize("sms", [108, 132])
@pytest.mark.parametrize("programs", [2, 3, 4])  # what kernels/aot.py reports for the modulation backward kernels
def test_whole_waves_at_xl_shapes(sms, programs):
    """At every XL shape the chosen grid fills its last wave to >= 96 % and is no slower, in waves x (tokens per
    program + 1), than the grid that assumed 4 programs per SM (the issue's 2.07-2.37 waves rounded up to 3)."""
    slots = programs * sms
    for B, T in XL:
        rows = tokens_per_program(B, T, slots, 8)
        waves = _waves(B, T, rows, slots)
        assert rows >= 8 and waves / math.ceil(waves) >= 0.96, (B, T, rows, waves)
        assumed = max(8, math.ceil(T / math.ceil(4 * sms / B)))  # the former rule
        assert math.ceil(waves) * (rows + 1) <= math.ceil(_waves(B, T, assumed, slots)) * (assumed + 1), (B, T)


def test_a_small_batch_splits_the_tokens_and_a_short_sequence_does_not():
    assert tokens_per_program(1, 77, 4, 8) == 20  # 4 programs: one wave of the interpreter's 4 slots
    assert tokens_per_program(2, 7, 4, 8) == 7  # fewer than 8 tokens: one program per sample
    assert tokens_per_program(8, 4096, 264, 8) == 125  # 33 programs per sample: 264, one H100 wave at 2 per SM


def test_programs_per_sm_are_read_from_the_compiled_kernel(monkeypatch):
    """On a GPU: the compiled kernel's registers, shared memory and warps against the device's SM (here a stand-in
    compiled kernel and H100 properties); off a GPU the nominal count, nothing compiled."""
    compiled = SimpleNamespace(n_regs=64, metadata=SimpleNamespace(shared=64, num_warps=16), _init_handles=lambda: None)
    calls = []

    class Kernel:
        def warmup(self, *args, grid, **options):
            calls.append((args, grid, options))
            return compiled

    props = SimpleNamespace(shared_memory_per_multiprocessor=228 * 1024, max_threads_per_multi_processor=2048)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    assert compiled_programs_per_sm(Kernel(), (1, 2), {"num_warps": 16}, torch.device("cuda", 0)) == 2
    assert calls == [((1, 2), (1,), {"num_warps": 16})]
    compiled.n_regs = 40  # modulate_bwd: 40 registers, 16 warps -> 3 programs per SM
    assert compiled_programs_per_sm(Kernel(), (), {}, torch.device("cuda", 0)) == 3
    assert compiled_programs_per_sm(Kernel(), (), {}, torch.device("cpu")) == NOMINAL_PROGRAMS_PER_SM
    assert len(calls) == 2
    assert utils.programs_per_sm(64, 64, 16, 228 * 1024, 2048) == (2, "registers")
