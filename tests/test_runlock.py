"""One writer per run directory: the lock names its holder and dies with it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedsim.runlock import DirectoryInUse, run_lock

from conftest import REPO

HOLD = """import sys, time
from fedsim.runlock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""  # a process holding the lock of the directory it is given


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with run_lock(tmp_path):
        # flock locks belong to an open file, so a second open in this same process is refused like another process
        with pytest.raises(DirectoryInUse, match=rf"{tmp_path} is in use by process {os.getpid()} \(started "):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released with the block
        pass


def test_the_lock_dies_with_its_holder_even_by_sigkill(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(DirectoryInUse, match=f"in use by process {holder.pid} "):
            with run_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    with run_lock(tmp_path):  # the file it left behind names it, but does not block
        assert f'"pid": {os.getpid()}' in (tmp_path / ".lock").read_text()
