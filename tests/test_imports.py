"""What the Ray driver imports: it never builds a dataset or a model, so the heavy libraries must stay out of it
(each Ray process pays their memory, and a run's process tree must stay below Flower's)."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

HEAVY = ("datasets", "pandas", "pyarrow", "peft", "transformers", "bitsandbytes", "dp_accounting")


def test_ray_driver_path_imports_no_heavy_library():
    # a fresh interpreter: this test session has imported all of them already
    script = ("import sys, fedsim.cli, actors.runtime, actors.aggregator\n"
              "from fedsim.validation import load_config\n"
              "load_config('fedsim/quickstart.yaml')\n"
              f"print(' '.join(name for name in {HEAVY!r} if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == []
