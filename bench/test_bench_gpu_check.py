"""How long the GPU check's rehearsal takes: `bash bench/gpu_check.sh --dry-run` runs every part's code at tiny
shapes on the CPU, and must stay well under a minute so that it is run before every GPU window."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT_S = 60


def test_gpu_check_dry_run_wall_time(benchmark, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT", "WHEELS")}
    env.update(OMP_NUM_THREADS="1", PYTHON=sys.executable, HF_HUB_OFFLINE="1")

    def dry_run():
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]

    benchmark.pedantic(dry_run, rounds=1, iterations=1)
    seconds = benchmark.stats.stats.max
    benchmark.extra_info.update(seconds=seconds, limit_s=LIMIT_S)
    assert seconds < LIMIT_S, f"the dry run took {seconds:.0f} s (limit {LIMIT_S} s)"
