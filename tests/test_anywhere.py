"""Every documented command works where a user types it: from the repository root (where `python -m` puts the
root first on sys.path, and the root holds a `kernels/` folder) and from any other folder, with Hugging Face's
package named `kernels` installed (transformers >= 5.25 imports it), and the project installs with pip's build
as the GPU machine installs it."""
import importlib.metadata
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
COMMANDS = ["pixart_fast.train", "pixart_fast.train.ablate", "pixart_fast.train.probe", "pixart_fast.train.encoder",
            "pixart_fast.train.rescore",
            "pixart_fast.sample", "pixart_fast.extract", "pixart_fast.export", "pixart_fast.plan", "pixart_fast.kernels.aot"]


def run(args: list[str], cwd: Path, timeout: int = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)


def readme_command(prefix: str) -> str:
    """The README's first command line starting with `prefix`, as a user copies it."""
    return next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(prefix))


def test_hugging_face_kernels_is_installed_so_the_shadowing_is_tested():
    assert importlib.metadata.version("kernels")  # a test dependency: the tests below mean something with it


def test_the_root_kernels_folder_never_stands_in_for_hugging_faces():
    done = run([sys.executable, "-c", "import kernels, transformers.integrations.hub_kernels; print(kernels.__file__)"],
               ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not done.stdout.strip().startswith(str(ROOT)), done.stdout
    # Without Hugging Face's package (no site-packages at all): `import kernels` fails as if the folder were not
    # there, instead of importing the project's kernels under another name.
    done = run([sys.executable, "-S", "-c", "import kernels"], ROOT)
    assert "ModuleNotFoundError: No module named 'kernels'" in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("where", ["root", "elsewhere"])
@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_answers_help(module, where, tmp_path):
    done = run([sys.executable, "-m", module, "--help"], ROOT if where == "root" else tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python -m "), done.stdout[:200]


def test_a_checkout_that_is_not_installed_runs_from_the_root():
    """Without the install's path mapping (no site-packages processing, so no editable finder; the dependencies
    on PYTHONPATH), `python -m pixart_fast.train` from the root still finds train/ as pixart_fast.train."""
    env = {**ENV, "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    for module in ("pixart_fast.train", "pixart_fast.kernels.aot"):
        done = subprocess.run([sys.executable, "-S", "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.startswith(f"usage: python -m {module}"), done.stdout[:200]


def test_pytest_collects_from_the_root():
    done = run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error" not in done.stdout.lower().splitlines()[-1], done.stdout[-500:]


def test_the_readme_main_command_runs_from_the_root(tmp_path):
    command = readme_command("pip install -e . && ").split(" && ", 1)[1]
    assert command == "python -m pixart_fast.train --stage 2"
    shortened = [sys.executable, *shlex.split(command)[1:], "--steps", "2", "--batch-size", "4", "--num-val", "2",
                 "--sample-steps", "2", "--out", str(tmp_path / "runs")]
    done = run(shortened, ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs/stage2/summary.json").is_file()


def test_pip_builds_and_installs_it_without_build_isolation(tmp_path):
    """`pip install --no-deps --no-build-isolation -e .` from the root, into a new virtual environment that sees
    this one's packages (setuptools and Hugging Face's kernels among them, as on the GPU machine)."""
    venv = tmp_path / "venv"
    # without pip or setuptools of its own: the ones it runs are this environment's, seen through outer.pth
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path)
    (Path(site.stdout.strip()) / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                "--disable-pip-version-check", "-e", "."], ROOT, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    done = run([str(python), "-c", "import pixart_fast.kernels as k, kernels; print(k.__file__, kernels.__file__)"],
               tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = done.stdout.split()
    assert ours == str(ROOT / "kernels" / "__init__.py") and not theirs.startswith(str(ROOT))
