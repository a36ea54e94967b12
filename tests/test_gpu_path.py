"""The GPU path, checked on the CPU: no host sync in a steady-state step, the fused optimizer and foreach EMA equal
to the per-parameter updates they replace, the precision policy, and the model compiling to one graph."""
import copy
from dataclasses import replace

import pytest
import torch

from pixart_fast import distributed
from pixart_fast.model import CONFIGS, PixArt
from pixart_fast.train.loop import autocast_dtype, batch_indices, setup, train_step, update_ema
from pixart_fast.train.recipes import RECIPES

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class CountSyncs:
    """Counts calls of the Tensor methods that read a tensor's value on the host."""

    def __init__(self, monkeypatch):
        self.calls = []
        for name in SYNCS:
            original = getattr(torch.Tensor, name)

            def counted(t, *a, _name=name, _original=original, **k):
                self.calls.append(_name)
                return _original(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("stage", [1, 2])
def test_a_steady_state_step_reads_nothing_back_to_the_host(stage, tmp_path, monkeypatch):
    cfg = replace(RECIPES[stage], model="PixArt-pixel-tiny", route_end=2, batch_size=4, kernels="torch", out=str(tmp_path))
    run = setup(cfg, distributed.Dist(), log=lambda *a: None)
    train_step(run, 0, False)  # the first step may set things up
    # The batches are host work done ahead of the step (the embedded T5 reads its mask on the host): made first.
    ready = {}
    make = run.data.batch
    for step in range(1, 4):
        indices = batch_indices(run.data, step, cfg.batch_size, cfg.seed)
        ready[tuple(indices)] = make(indices)
    monkeypatch.setattr(run.data, "batch", lambda indices, pin_memory=False: ready[tuple(indices)])
    counter = CountSyncs(monkeypatch)
    records = [train_step(run, step, False) for step in range(1, 4)]
    monkeypatch.undo()
    assert counter.calls == []
    assert all(r.shape == (8,) and r.device == run.dist.device for r in records)
    if torch.cuda.is_available():  # on a GPU, CUDA itself says so
        torch.cuda.set_sync_debug_mode("error")
        try:
            train_step(run, 4, False)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_a_non_finite_step_changes_nothing_on_the_device(tmp_path):
    cfg = replace(RECIPES[2], model="PixArt-pixel-tiny", route_end=2, batch_size=4, kernels="torch", t5_train_steps=0,
                  out=str(tmp_path))
    run = setup(cfg, distributed.Dist(), log=lambda *a: None)
    train_step(run, 0, False)
    before = ({k: v.clone() for k, v in run.model.state_dict().items()}, copy.deepcopy(run.opt.state_dict()),
              {k: v.clone() for k, v in run.ema.state_dict().items()})
    hook = run.model.register_forward_hook(lambda module, args, out: out * float("nan"))  # a NaN loss and gradients
    record = train_step(run, 1, False)
    hook.remove()
    assert record[4] == 0 and not torch.isfinite(record[0])  # not updated
    weights = run.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in before[0].items())
    state = run.opt.state_dict()["state"]
    assert all(torch.equal(state[i]["step"], before[1]["state"][i]["step"]) for i in state)  # no step counted
    assert all(torch.equal(state[i]["exp_avg"], before[1]["state"][i]["exp_avg"]) for i in state)
    assert all(torch.equal(run.ema.state_dict()[k], v) for k, v in before[2].items())


def test_fused_adamw_and_foreach_ema_equal_the_per_parameter_updates():
    torch.manual_seed(0)
    model = PixArt(CONFIGS["PixArt-pixel-tiny"], kernels="torch")
    ref = copy.deepcopy(model)
    ema, ref_ema = copy.deepcopy(model), copy.deepcopy(model)
    kw = dict(lr=1e-3, weight_decay=0.03, eps=1e-10)
    fused = torch.optim.AdamW(model.parameters(), fused=True, **kw)
    plain = torch.optim.AdamW(ref.parameters(), foreach=False, **kw)
    for step in range(3):
        for a, b in zip(model.parameters(), ref.parameters()):
            g = torch.randn_like(a)
            a.grad, b.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
        update_ema(list(ema.parameters()), list(model.parameters()), 0.9999, step, torch.tensor(True))
        with torch.no_grad():  # the per-parameter EMA this replaces
            d = min(0.9999, (1 + step) / (10 + step))
            for e, p in zip(ref_ema.parameters(), ref.parameters()):
                e.lerp_(p, 1 - d)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # float rounding: fused kernels reorder ops
    for a, b in zip(ema.parameters(), ref_ema.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_precision_auto_is_bf16_on_cuda_and_fp32_on_a_cpu():
    assert autocast_dtype("auto", torch.device("cuda", 0)) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None
    assert autocast_dtype("fp32", torch.device("cuda", 0)) is None
    assert autocast_dtype("fp16", torch.device("cpu")) is torch.float16


def test_the_model_compiles_to_one_graph_with_the_kernels():
    model = PixArt(CONFIGS["PixArt-pixel-tiny"], kernels="triton").eval()  # the interpreter runs them here
    c = model.config
    x = torch.randn(2, c.in_channels, c.input_size, c.input_size)
    y, mask = torch.randn(2, c.max_tokens, c.caption_channels), torch.ones(2, c.max_tokens, dtype=torch.bool)
    explained = torch._dynamo.explain(model)(x, torch.tensor([3, 500]), y, mask)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
