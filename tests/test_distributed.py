"""Training under torchrun on the CPU (gloo, 127.0.0.1 only): 2 processes take the same steps as 1 process at the same
global batch, rank 0 alone writes, a 2-process checkpoint resumes in 1 process, alignment ended by --repa-steps
keeps DDP going, FSDP2 agrees too (its validation autoguided), and so do 2 nodes of 1 process each (two torchrun
launchers meeting at a rendezvous), resumed on 2 nodes."""
import json
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from pixart_fast import distributed
from pixart_fast.checkpoints import load_safetensors
from pixart_fast.cli import UserError
from pixart_fast.distributed import Dist
from pixart_fast.train.loop import train
from pixart_fast.train.recipes import RECIPES
from pixart_fast.train.rescore import rescore

STEPS = 3
FLAGS = dict(model="PixArt-pixel-tiny", steps=STEPS, batch_size=4, save_every=2, log_every=1, num_val=2,
             sample_steps=2, kernels="torch", t5_train_steps=0, route_end=2, lr_decay=0.0)  # the rate held: see ATOL
ATOL = 1e-6  # fp32 reduction-order noise after 3 steps is ~1e-7; one step moves weights by ~1e-4


ENV = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(launcher: list[str], out, *flags: str) -> list[str]:
    """torchrun with the launcher's flags, running `python -m pixart_fast.train --stage 2` with FLAGS."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in FLAGS.items()]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "pixart_fast.train", "--stage=2", *args,
            f"--out={out}", *flags]


def torchrun(nproc: int, out, *flags: str) -> str:
    """`python -m pixart_fast.train --stage 2 ...` under torchrun with nproc CPU processes on a free local port;
    returns its stderr."""
    cmd = train_command(["--nnodes=1", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
                         f"--master-port={free_port()}"], out, *flags)
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done.stderr


def two_nodes(out, *flags: str) -> None:
    """The same on 2 "nodes" of 1 process: two torchrun launchers, --node-rank 0 and 1, meeting at the static
    rendezvous on 127.0.0.1 (on real machines: the first node's address), --out shared by both."""
    port, nodes = free_port(), []
    try:
        for rank in (0, 1):
            log = open(out.parent / f"{out.name}-node{rank}.log", "w")
            nodes.append((subprocess.Popen(train_command(
                ["--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}", "--master-addr=127.0.0.1",
                 f"--master-port={port}"], out, *flags), env=ENV, stdout=log, stderr=subprocess.STDOUT), log))
        for node, log in nodes:
            node.wait(timeout=300)
    finally:
        for node, log in nodes:
            node.kill()
            log.close()
    for rank, (node, log) in enumerate(nodes):
        assert node.returncode == 0, f"node {rank}: " + open(log.name).read()[-5000:]


def weights(out, step, name="model"):
    return load_safetensors(out / "stage2" / "checkpoints" / f"step-{step:07d}" / f"{name}.safetensors")


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: the same run in this process, world size 1."""
    out = tmp_path_factory.mktemp("one")
    train(replace(RECIPES[2], **FLAGS, out=str(out)), progress=False)
    return out


def test_two_processes_equal_one_and_resume_in_one(one_process, tmp_path):
    stderr = torchrun(2, tmp_path / "two")
    assert "deprecated" not in stderr, stderr[-3000:]  # the DDP wrapper uses the installed torch's switches
    for name in ("model", "ema"):
        assert max_diff(weights(tmp_path / "two", STEPS, name), weights(one_process, STEPS, name)) <= ATOL, name
    assert max_diff(weights(one_process, STEPS), weights(one_process, STEPS - 1)) > 100 * ATOL  # the steps count
    # rank 0 alone wrote: one metrics line per step, with the global batch's loss
    lines = [json.loads(line) for line in (tmp_path / "two/stage2/metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (one_process / "stage2/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]
    assert [m["loss"] for m in lines if "loss" in m] == pytest.approx([m["loss"] for m in ref if "loss" in m], abs=1e-5)
    assert (tmp_path / "two/stage2/summary.json").exists() and (tmp_path / "two/stage2/samples").is_dir()

    # the 2-process checkpoint of step 2 (optimizer state saved whole) continues in one process
    resumed = replace(RECIPES[2], **FLAGS, out=str(tmp_path / "resumed"),
                      resume=str(tmp_path / "two/stage2/checkpoints/step-0000002"))
    train(resumed, progress=False)
    for name in ("model", "ema"):
        assert max_diff(weights(tmp_path / "resumed", STEPS, name), weights(one_process, STEPS, name)) <= ATOL, name


def test_two_processes_equal_one_after_alignment_ends(tmp_path):
    # after --repa-steps the projector gets no gradient from the loss, and DDP still waits for one every step
    align = dict(repa_depth=1, repa_target_depth=2, repa_steps=2, steps=4)
    train(replace(RECIPES[2], **{**FLAGS, **align}, out=str(tmp_path / "one")), progress=False)
    torchrun(2, tmp_path / "two", *(f"--{k.replace('_', '-')}={v}" for k, v in align.items()))
    for name in ("model", "ema"):
        two, one = (without_key_biases(weights(tmp_path / run, 4, name)) for run in ("two", "one"))
        assert max_diff(two, one) <= ATOL, name


def without_key_biases(state: dict) -> dict:
    """The weights less the key third of each qkv bias: a key bias adds the same logit to every key of a query,
    which softmax ignores, so its exact gradient is 0 and AdamW turns the rounding noise it gets (here from the
    aligned block, ~1e-12) into lr-sized steps that differ between any two reduction orders."""
    out = dict(state)
    for k, v in state.items():
        if k.endswith("attn.qkv.bias"):
            d = v.numel() // 3
            out[k] = torch.cat([v[:d], v[2 * d:]])
    return out


def test_fsdp_equals_one_process_and_its_checkpoint_resumes_in_one(one_process, tmp_path):
    # its final validation is autoguided by the step-2 checkpoint: the guide stands beside the sharded EMA model
    torchrun(2, tmp_path / "fsdp", "--fsdp=true", "--guide-step=2")
    for name in ("model", "ema"):
        assert max_diff(weights(tmp_path / "fsdp", STEPS, name), weights(one_process, STEPS, name)) <= ATOL, name
    logged = [json.loads(line)["val"] for line in (tmp_path / "fsdp/stage2/metrics.jsonl").read_text().splitlines()
              if '"val"' in line]
    again = {grids: rescore(tmp_path / "fsdp/stage2", cfg_scale=RECIPES[2].cfg_scale, sample_steps=2, num_val=2,
                            guide_step=guide_step, grids=tmp_path / grids, log=lambda line: None)[-1]
             for guide_step, grids in ((2, "guided"), (0, "plain"))}  # in one process, unsharded
    assert json.dumps(again["guided"]["scores"], sort_keys=True) == json.dumps(logged[-1], sort_keys=True)
    name = f"step-{STEPS:07d}.png"  # the trainer's grid is the guided one
    assert (tmp_path / "guided" / name).read_bytes() == (tmp_path / "fsdp/stage2/samples" / name).read_bytes()
    assert (tmp_path / "plain" / name).read_bytes() != (tmp_path / "fsdp/stage2/samples" / name).read_bytes()
    resumed = replace(RECIPES[2], **FLAGS, out=str(tmp_path / "resumed"),
                      resume=str(tmp_path / "fsdp/stage2/checkpoints/step-0000002"))
    train(resumed, progress=False)
    assert max_diff(weights(tmp_path / "resumed", STEPS), weights(one_process, STEPS)) <= ATOL


def test_two_nodes_equal_one_process_and_resume_on_two_nodes(one_process, tmp_path):
    out = tmp_path / "nodes"
    two_nodes(out, "--report-to=tensorboard")
    for name in ("model", "ema"):
        assert max_diff(weights(out, STEPS, name), weights(one_process, STEPS, name)) <= ATOL, name
    ended = {name: weights(out, STEPS, name) for name in ("model", "ema")}
    # killed after logging step 3, before its checkpoint: both nodes resume from step 2 and end bit-identically
    shutil.rmtree(out / "stage2/checkpoints/step-0000003")
    two_nodes(out, "--report-to=tensorboard", "--resume=latest")
    for name in ("model", "ema"):
        again = weights(out, STEPS, name)
        assert all(torch.equal(again[k], ended[name][k]) for k in again), name
    lines = [json.loads(line) for line in (out / "stage2/metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines if "loss" in m] == [1, 2, 3]
    assert len(list((out / "stage2/tensorboard").glob("events.out.tfevents.*"))) == 2  # rank 0's, one a launch


def test_ranks_that_start_from_different_weights_stop_with_one_line(tmp_path, monkeypatch):
    """Nodes that do not share --out: one resumes from a checkpoint, another sees none."""
    def all_reduce_with(other):  # gloo's MAX over this rank and another holding `other`
        return lambda values, op: values.copy_(torch.maximum(values, torch.tensor([*other, *(-v for v in other)])))

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce_with((3, 1)))
    assert Dist(rank=0, world_size=2).agree(3, 1)
    assert not Dist(rank=0, world_size=2).agree(0, 1) and not Dist(rank=0, world_size=2).agree(3, 0)
    monkeypatch.setattr(Dist, "agree", lambda self, *values: False)
    with pytest.raises(UserError, match="the processes do not start from the same checkpoint or weights .*: put --out "
                                        "on a file system every node shares, at the same path"):
        train(replace(RECIPES[2], **FLAGS, out=str(tmp_path)), progress=False)
    assert not (tmp_path / "stage2/checkpoints").exists()  # nothing trained


def test_each_rank_takes_its_slice_of_the_global_batch():
    assert [Dist(rank=r, world_size=4).slice(8) for r in range(4)] == [slice(2 * r, 2 * r + 2) for r in range(4)]
    assert Dist().slice(5) == slice(0, 5)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 processes"):
        Dist(rank=0, world_size=4).slice(6)
    values = torch.tensor([1.0, 2.0])
    assert torch.equal(Dist().mean(values), values)
