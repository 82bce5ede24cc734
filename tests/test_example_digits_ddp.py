"""The data-parallel digits example, run as documented: torchrun, two CPU processes."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

from diffprog.examples import digits_ddp


def test_torchrun_two_ranks_then_resume_on_one(
    tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "checkpoints"
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}  # loopback only
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc-per-node", "2", "-m", "diffprog.examples.digits_ddp"]
    command += ["--epochs", "2", "--checkpoint", str(folder), "--timeout", "30"]
    for _ in range(3):  # torchrun's free port can be taken by another job before it binds it
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
        if "address already in use" not in result.stderr.lower():
            break
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "2 rank(s), 1437 training images, global batch 64" in out, out
    for rank in (0, 1):  # each rank's throughput: 718 images per epoch (1437 // 2)
        assert re.search(rf"^rank {rank}: 1436 images in [\d.]+ s, \d+ images/s$", out, re.M), out
    final = re.search(r"final test accuracy: ([\d.]+)%", out)
    assert final is not None and float(final.group(1)) > 50.0, out
    written = sorted(p.name for p in folder.iterdir())
    assert written == ["epoch-1.safetensors", "epoch-2.safetensors"], written
    # The checkpoint of two ranks resumes on one (here, in this process: a group of one).
    digits_ddp.main(["--epochs", "3", "--checkpoint", str(folder), "--resume"])
    out = capsys.readouterr().out
    assert f"resumed from {folder / 'epoch-2.safetensors'} (epoch 2, step 46)" in out, out
    assert "1 rank(s)" in out and "epoch 3:" in out and "epoch 2:" not in out, out
    assert re.search(r"^rank 0: 1437 images in", out, re.M), out  # 22 batches of 64, one of 29
    resumed = re.search(r"final test accuracy: ([\d.]+)%", out)
    assert resumed is not None and float(resumed.group(1)) > float(final.group(1)), out
