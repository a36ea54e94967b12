"""The word probe (`python -m pixart_fast.train.probe`) and the diffusion methods it stands on."""
from dataclasses import replace

import pytest
import torch

from pixart_fast.cli import UserError
from pixart_fast.data import SIZES, ShapeScenes, render
from pixart_fast.diffusion import Diffusion
from pixart_fast.train.loop import train
from pixart_fast.train.probe import changed, main, probe
from pixart_fast.train.recipes import RECIPES


def test_noised_and_predict_x0_match_diffusers_and_invert_each_other():
    diffusers = pytest.importorskip("diffusers", reason="diffusers not installed")
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([300, 300, 300])
    for prediction in ("eps", "v", "flow"):
        d = Diffusion(learn_sigma=False, prediction=prediction)
        x_t, snr = d.noised(x0, t, noise), d.snr(300)
        if prediction == "flow":  # x_s = (1 - s) x0 + s noise, s = 0.3
            torch.testing.assert_close(x_t, 0.7 * x0 + 0.3 * noise)
            assert snr == pytest.approx(0.7**2 / 0.3**2)
            target = noise - x0
        else:
            torch.testing.assert_close(x_t, ref.add_noise(x0, noise, t))
            abar = ref.alphas_cumprod[300].item()
            assert snr == pytest.approx(abar / (1 - abar), rel=1e-5)
            target = noise if prediction == "eps" else ref.get_velocity(x0, noise, t)
        # a model that predicts its target exactly gives back the clean sample
        torch.testing.assert_close(d.predict_x0(lambda x, tt: target, x_t, t), x0, rtol=1e-4, atol=1e-4)


def scenes(n=8):
    data = ShapeScenes(length=n, split="val")
    return [data[i]["truth"] for i in range(n)]


def test_the_probe_tells_a_model_that_reads_the_words_from_one_that_ignores_them():
    truths = scenes()
    images = torch.stack([render(s) for s in truths])
    def as_said(truth, scene):  # redraw each object at the size its (maybe swapped) word names
        return replace(scene, objects=tuple(replace(o, radius=o.radius * SIZES[o.size] / SIZES[t.size])
                                            for o, t in zip(scene.objects, truth.objects)))

    by_caption = {c.caption: render(as_said(s, c)) for s in truths
                  for c in (s, changed(s, "shape"), changed(s, "size"))}
    reader = lambda x_t, t, captions: torch.stack([by_caption[c] for c in captions])  # noqa: E731 draws the words
    ignorer = lambda x_t, t, captions: images  # noqa: E731 draws the truth whatever the caption says
    d = Diffusion(learn_sigma=False, prediction="v")
    read, ignored = (probe(f, images, truths, [100, 600], d) for f in (reader, ignorer))
    for row in read:
        assert row["true"]["shape"] == 1.0 and row["true"]["size"] == 1.0
        assert row["shape changed"]["shape"] < 0.2 and row["size changed"]["size"] == 0.0
        assert row["shape changed"]["colour"] == 1.0  # only the changed word's check moves
    for row in ignored:
        assert row["shape changed"] == row["true"] == row["size changed"]
    # a chain from each noised render: the samples a function of x_t and t, scored against the true scenes
    sampled = probe(reader, images, truths, [100], d, sample_fn=lambda x_t, t, captions: reader(x_t, t, captions))
    assert sampled[0]["sampled"] == sampled[0]["true"] and "sampled" not in read[0]
    assert [r["t"] for r in read] == [100, 600] and read[0]["snr"] > read[1]["snr"]


def test_changed_scenes_keep_everything_but_the_word():
    for s in scenes():
        shapes, sizes = changed(s, "shape"), changed(s, "size")
        for o, a, b in zip(s.objects, shapes.objects, sizes.objects):
            assert a.shape != o.shape and replace(a, shape=o.shape) == o
            assert b.size == {"small": "large", "large": "small"}.get(o.size, o.size) and replace(b, size=o.size) == o
    with pytest.raises(ValueError, match="'shape' or 'size'"):
        changed(s, "colour")


def test_the_command_probes_a_checkpoint(tmp_path, capsys, reference_kernels):
    cfg = replace(RECIPES[2], model="PixArt-pixel-tiny", route_end=2, steps=2, batch_size=2, num_val=2, sample_steps=2,
                  kernels="torch", t5_train_steps=0, out=str(tmp_path))
    summary = train(cfg, progress=False)
    ckpt = f"{summary['checkpoint']}/ema.safetensors"
    # two sampler steps: each model call runs for every timestep and held-out scene
    assert main([ckpt, "--num-val", "3", "--timesteps", "100,500", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "v-prediction, 3 held-out scenes" in out
    rows = [line for line in out.splitlines() if line.startswith("| 100 ") or line.startswith("| 500 ")]
    assert len(rows) == 2 and all(len(r.split("|")) == 12 for r in rows)  # with shape and size sampled from t
    # the checkpoint's folder stands for its EMA weights
    assert main([summary["checkpoint"], "--num-val", "3", "--timesteps", "100,500", "--steps", "2"]) == 0
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][-2:] == rows
    assert main([ckpt, "--num-val", "3", "--timesteps", "100,500", "--steps", "0"]) == 0
    assert all(len(line.split("|")) == 10 for line in capsys.readouterr().out.splitlines() if line.startswith("| "))
    for bad, message in (("100,x", "integers"), ("1000", r"\[0, 1000\)")):
        with pytest.raises(UserError, match=message):
            main([ckpt, "--timesteps", bad])
    with pytest.raises(UserError, match=r"--steps 20: must be in \[0, 11\]"):
        main([ckpt, "--timesteps", "10,500"])
