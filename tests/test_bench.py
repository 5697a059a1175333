"""`gradcodec bench`: size lists, row sets per (workload, size), labels and the JSON file.

These check what the bench reports, not how fast anything is: speed is measured by the bench itself.
"""
import contextlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from gradcodec.bench import load, report, workloads
from gradcodec.cli import main


def bench(tmp_path, *args: str) -> dict:
    """Run `gradcodec bench ARGS` with one repeat; return the JSON file it writes."""
    path = tmp_path / "bench.json"
    assert main(["bench", "--repeats", "1", "--json", str(path), *args]) == 0
    return json.loads(path.read_text())


def test_a_size_list_gives_one_row_set_and_one_copy_timing_per_size(tmp_path, capsys):
    result = bench(tmp_path, "--codecs", "int8;int4", "--size", "1K,4K")
    rows = result["rows"]
    assert [(r["elements"], r["spec"]) for r in rows] == [(1024, "int8"), (1024, "int4"), (4096, "int8"), (4096, "int4")]
    assert all(r["input_bytes"] == 4 * r["elements"] for r in rows)
    # one copy yardstick per size, shared by that size's rows
    assert rows[0]["copy"] == rows[1]["copy"] and rows[2]["copy"] == rows[3]["copy"]
    out = capsys.readouterr().out
    assert "workload gaussian: 1,024 elements" in out and "workload gaussian: 4,096 elements" in out


def test_workloads_of_their_own_size_run_once_whatever_the_size_list(tmp_path):
    saved = tmp_path / "update.pt"
    torch.save({"a": torch.randn(8, 16), "b": torch.randn(16, 8)}, saved)
    result = bench(tmp_path, "--codecs", "int8", "--size", "1K,4K", "--workload", f"file:{saved},gaussian")
    assert [(r["workload"], r["elements"]) for r in result["rows"]] == [
        (f"file:{saved}", 256), ("gaussian", 1024), ("gaussian", 4096)
    ]


@pytest.mark.parametrize("name,tensors,values", [
    ("lora7b", 32 * 4 * 2, 32 * 4 * 2 * 8 * 4096),  # LLaMA-2-7B q/k/v/o r8
    ("lora1b", 16 * 7 * 2, 16 * 16 * (2 * 4096 + 2 * 2560 + 3 * 10240)),  # LLaMA-3.2-1B all-linear r16, GQA k/v
    ("lora8b", 32 * 7 * 2, 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)),  # LLaMA-3-8B all-linear r16, GQA k/v
])
def test_lora_workloads_have_the_real_adapter_shapes(name, tensors, values):
    shapes = workloads.lora_workload_shapes(name)
    assert len(shapes) == tensors and sum(a * b for a, b in shapes.values()) == values


def test_settings_that_only_change_encoding_keep_their_own_label(tmp_path, capsys):
    result = bench(tmp_path, "--codecs", "int4;int4:stochastic=true", "--size", "1K")
    assert [r["codec"] for r in result["rows"]] == ["int4:block=64", "int4:block=64"]
    assert [r["spec"] for r in result["rows"]] == ["int4", "int4:stochastic=true"]
    assert "int4:stochastic=true" in capsys.readouterr().out


def test_size_lists_parse_each_item_and_name_a_bad_one():
    assert workloads.parse_sizes("64K, 1M,16M,64M") == [65536, 2**20, 2**24, 2**26]
    assert workloads.parse_sizes("16M") == [2**24]
    with pytest.raises(ValueError, match="'1Q'"):
        workloads.parse_sizes("64K,1Q")


def test_a_bad_size_is_reported_as_a_usage_error(capsys):
    assert main(["bench", "--size", "64K,,1M"]) == 2
    assert "size ''" in capsys.readouterr().err


def test_rate_distortion_curves_keep_stochastic_and_zstd_variants_apart():
    assert report.family("int8") == report.family("int4:block=32") == "blockwise int"
    assert report.family("int4:stochastic=true") == "blockwise int stochastic"
    assert report.family("int8|zstd") == "blockwise int + zstd"
    assert report.family("topk:ratio=0.01|fp16") == report.family("topk:ratio=0.1|int8") == "topk"


def test_the_plot_has_a_panel_per_workload_and_size(tmp_path):
    png = tmp_path / "rd.png"
    assert main(["bench", "--codecs", "int8;int4", "--size", "1K,4K", "--repeats", "1", "--plot", str(png)]) == 0
    from PIL import Image

    width, height = Image.open(png).size
    assert width > 1.8 * height  # two 6 x 4.5 inch panels side by side


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_load_helpers_run_inside_the_block_and_are_stopped_after_it_even_on_an_error():
    with pytest.raises(KeyboardInterrupt):
        with load.cpu_load(2) as procs:
            assert len(procs) == 2 and all(p.poll() is None for p in procs)
            raise KeyboardInterrupt
    assert all(p.poll() is not None for p in procs)


def test_a_load_helper_exits_when_its_parent_is_killed():
    parent = subprocess.run(
        [sys.executable, "-c",
         "import os\nfrom gradcodec.bench import load\n"
         "with load.cpu_load(1) as procs:\n    print(procs[0].pid, flush=True)\n    os._exit(0)\n"],
        capture_output=True, text=True, timeout=60, cwd="/",
    )
    helper = int(parent.stdout.split()[0])
    deadline = time.monotonic() + 20
    while _alive(helper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(helper)


def test_bench_with_load_records_the_helpers_and_stops_them(tmp_path, monkeypatch):
    started = []
    real = load.cpu_load

    @contextlib.contextmanager
    def recording(n):
        with real(n) as procs:
            started.extend(procs)
            yield procs

    monkeypatch.setattr(load, "cpu_load", recording)
    result = bench(tmp_path, "--codecs", "int8", "--size", "1K", "--load", "1")
    assert result["load_helpers"] == 1 and "1 busy helper processes" in result["machine"]
    assert len(started) == 1 and started[0].poll() is not None


def test_a_negative_load_is_a_usage_error(capsys):
    assert main(["bench", "--size", "1K", "--load", "-1"]) == 2
    assert "--load" in capsys.readouterr().err
