"""The README's recipe: Flower's own simulation engine on fedkern's data, models and kernels."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
MARK = "# Flower's run_simulation"


def recipe() -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if b.startswith(MARK)]
    assert len(blocks) == 1, "the README has one Flower simulation recipe"
    return blocks[0]


@pytest.mark.skipif(not README.exists(), reason="README.md is not beside the tests")
def test_flower_simulation_recipe_runs_and_learns():
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "RAY_DEDUP_LOGS": "0"}
    done = subprocess.run([sys.executable, "-c", recipe()], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracy = float(re.search(r"test accuracy ([0-9.]+)", done.stdout).group(1))
    # every client trains every round, so nothing is left to Flower's (unseeded) sampling:
    # fedkern's own loop gives 0.558 after these three rounds; chance is 0.1
    assert accuracy > 0.4, done.stdout[-2000:]
