"""The public API: what a user imports from `pixart_fast` and `pixart_fast.kernels`, and the PyTorch path with
Triton not installed."""
import pathlib
import subprocess
import sys
import textwrap

import torch

import pixart_fast
import pixart_fast.kernels
import pixart_fast.patcher
from pixart_fast.kernels import (cross_attention, gated_residual, gated_residual_modulate, modulate, patchify,
                                 unpatchify)


def test_every_public_name_imports_from_the_top_level():
    for name in pixart_fast.__all__:
        assert getattr(pixart_fast, name) is not None, name
    assert {"PixArt", "PixArtConfig", "CONFIGS", "DiT", "reparameterize", "Diffusion", "TextEncoder", "load_any",
            "patch", "unpatch"} <= set(pixart_fast.__all__)
    assert callable(pixart_fast.patch) and pixart_fast.patch is pixart_fast.patcher.patch
    assert callable(pixart_fast.unpatch)


def test_the_front_door_builds_trains_and_patches():
    from pixart_fast import CONFIGS, DiT, Diffusion, PixArt, patch, unpatch

    model = PixArt(CONFIGS["PixArt-pixel-tiny"], kernels="torch")
    c = model.config
    x = torch.randn(2, c.in_channels, c.input_size, c.input_size)
    y, mask = torch.randn(2, c.max_tokens, c.caption_channels), torch.ones(2, c.max_tokens)
    loss = Diffusion(learn_sigma=c.learn_sigma).training_losses(
        lambda xt, tt: model(xt, tt, y, mask), x, torch.tensor([1, 900]), torch.randn_like(x))["loss"].mean()
    loss.backward()
    assert torch.isfinite(loss)
    dit = DiT(CONFIGS["PixArt-pixel-tiny"])
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    report = patch(dit, backend="torch")
    assert report.swapped and dit.state_dict().keys() == before.keys()
    unpatch(dit)


def test_kernels_are_functions_not_modules():
    B, T, D = 2, 3, 8
    x, s = torch.randn(B, T, D), torch.randn(B, D)
    assert torch.allclose(modulate(x, s, s, backend="torch"),
                          torch.nn.functional.layer_norm(x, (D,), eps=1e-6) * (1 + s[:, None]) + s[:, None])
    assert torch.allclose(gated_residual(x, s, x, backend="torch"), x + s[:, None] * x)
    h, m = gated_residual_modulate(x, s, x, s, s, backend="torch")
    assert h.shape == m.shape == x.shape
    q, kv = torch.randn(B, 4, 2, 8), torch.randn(B, 5, 2, 8)
    assert cross_attention(q, kv, kv, backend="torch").shape == q.shape
    img = torch.randn(B, 4, 8, 8)
    assert patchify(img, 2, backend="torch").shape == (B, 16, 16)
    assert unpatchify(torch.randn(B, 16, 16), 2, 4, 8, 8, backend="torch").shape == (B, 4, 8, 8)
    for name in pixart_fast.kernels.__all__:
        assert callable(getattr(pixart_fast.kernels, name)) and not isinstance(getattr(pixart_fast.kernels, name),
                                                                                type(sys)), name


def test_import_pixart_fast_is_cheap():
    code = "import sys, pixart_fast; print(sorted(m for m in ('torch', 'transformers', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


NO_TRITON = textwrap.dedent("""
    import sys
    sys.modules["triton"] = None  # `import triton` raises ImportError, find_spec says not installed
    import torch
    from pixart_fast import CONFIGS, PixArt
    from pixart_fast.kernels import modulate
    from pixart_fast.plan import main as plan_main
    from pixart_fast.train.loop import train
    from pixart_fast.train.recipes import RECIPES
    from dataclasses import replace

    for kernels in ("torch", "auto"):
        model = PixArt(CONFIGS["PixArt-pixel-tiny"], kernels=kernels)
        c = model.config
        out = model.eval()(torch.randn(1, c.in_channels, c.input_size, c.input_size), torch.tensor([3]),
                           torch.randn(1, 4, c.caption_channels), torch.ones(1, 4))
        assert torch.isfinite(out).all()
    try:
        modulate(torch.randn(1, 2, 8), torch.randn(1, 8), torch.randn(1, 8), backend="triton")
    except ModuleNotFoundError as e:
        print("refused:", e)
    plan_main(["--json"])
    summary = train(replace(RECIPES[2], model="PixArt-pixel-tiny", route_end=2, steps=2, batch_size=2, num_val=2, sample_steps=2,
                            out=sys.argv[1]), progress=False)
    assert summary["steps"] == 2
    assert sys.modules.get("triton") is None
    print("ok without triton")
""")


def test_the_pytorch_path_the_trainer_and_the_planner_work_without_triton(tmp_path):
    env = {"TRITON_INTERPRET": "0", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", NO_TRITON, str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: backend='triton' needs Triton, which cannot be imported here" in done.stdout
    assert done.stdout.rstrip().endswith("ok without triton")


def test_the_readme_kernel_example_runs_as_written():
    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## The kernels as functions"):]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "from pixart_fast.kernels import" in code
    namespace = {}
    exec(compile(code, "README.md (kernels example)", "exec"), namespace)
    assert namespace["out"].shape == (2, 64, 16, 72) and namespace["image"].shape == (2, 8, 16, 16)
