"""benchmarks/gpu_check.sh: what it does without a GPU, and its `--cpu` dry run of every step."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def run(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    environ.pop("TRITON_INTERPRET", None)  # the script's pytest runs set up their own
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=environ, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_exits_cleanly_having_written_nothing(tmp_path):
    result = run(str(tmp_path / "out"))
    assert result.returncode == 0
    assert "no CUDA device here" in result.stdout and "--cpu" in result.stdout
    assert not (tmp_path / "out").exists()


def test_a_failing_step_is_recorded_and_fails_the_run(tmp_path):
    result = run("--cpu", str(tmp_path), env={"PYTHON": "false", "GRADCODEC": "false"})
    assert result.returncode == 1
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["gpu-tests", "kernels", "bench-64K", "bench-256K"]
    assert all(line.split()[2] == "1" for line in summary)


def test_the_folder_defaults_to_out(tmp_path):
    run("--cpu", env={"PYTHON": "false", "GRADCODEC": "false", "OUT": str(tmp_path / "o")})
    assert (tmp_path / "o" / "summary.txt").exists() and (tmp_path / "o" / "env.txt").exists()


@pytest.mark.slow
def test_the_cpu_dry_run_runs_every_step_and_writes_under_one_folder(tmp_path):
    result = run("--cpu", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.count(" exit 0 ") == 4
    bench = json.loads((tmp_path / "bench-64K.json").read_text())
    assert {r["elements"] for r in bench["rows"]} == {65536}
    assert any(r["peer"] for r in bench["rows"]) and any(r["peer"] is None for r in bench["rows"])
    assert json.loads((tmp_path / "kernels.json").read_text())["benchmarks"]
    assert "<testsuite" in (tmp_path / "gpu-tests.xml").read_text()
