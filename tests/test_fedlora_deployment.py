"""The fedtrain app in Flower's deployment engine: a SuperLink and two SuperNodes on loopback.

Flower 1.42's deployment engine, started the way an operator would (insecure mode, 127.0.0.1 only):
`flower-superlink` (Fleet, Control and ServerAppIo APIs over HTTP on one port; it starts its own
SuperExec for the ServerApp process), two `flower-supernode`s, each with its own partition in its node
config and its own ClientApp API port, and `flwr run <app folder> <connection> --run-config FILE
--stream` with the connection defined in a private FLWR_HOME. Every process is in its own session and
is terminated (then killed) at the end; SuperExec and app processes exit with their parent.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from gradcodec.integrations.fedlora import app as fl_app  # noqa: E402
from gradcodec.integrations.fedlora.report import read_records  # noqa: E402

pytestmark = pytest.mark.slow
APP_DIR = Path(fl_app.__file__).parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


@contextmanager
def _started(args: list[str], log: Path, env: dict[str, str]):
    """A Flower process in its own session, stopped (SIGTERM, then SIGKILL) when the block ends."""
    with log.open("w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            yield process
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()


def test_a_superlink_and_two_supernodes_on_loopback_complete_two_rounds(tmp_path):
    if not shutil.which("flower-superlink", path=str(BIN)):
        pytest.skip("Flower's deployment commands are not installed next to this Python")
    link, nodes = _free_port(), [_free_port(), _free_port()]
    home, out = tmp_path / "flwr-home", tmp_path / "out"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    overrides = tmp_path / "run-config.toml"
    overrides.write_text(
        'pretrained = false\nnum-clients = 2\nfraction = 1.0\nrounds = 2\nlocal-steps = 2\nbatch-size = 4\n'
        'train-examples = 40\neval-examples = 7\ncodecs = "int8"\nprogress = false\nwait-for-clients-s = 120.0\n'
        f'out-dir = "{out}"\n')
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    superlink = [str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                 "--disable-runtime-dependency-installation"]

    def supernode(i: int) -> list[str]:
        return [str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}", "--host", "127.0.0.1",
                "--port", str(nodes[i]), "--node-config", f"partition-id={i} num-partitions=2", "--max-wait-time", "60"]

    with _started(superlink, tmp_path / "superlink.log", env) as link_process:
        _wait_for_port(link, link_process)
        with _started(supernode(0), tmp_path / "supernode-0.log", env), \
                _started(supernode(1), tmp_path / "supernode-1.log", env):
            run = subprocess.run([str(BIN / "flwr"), "run", str(APP_DIR), "loopback", "--run-config", str(overrides),
                                  "--stream"], env=env, capture_output=True, text=True, timeout=300)
    logs = {p.name: p.read_text()[-3000:] for p in tmp_path.glob("*.log")}
    assert run.returncode == 0, (run.stdout[-3000:], run.stderr[-3000:], logs)
    assert "| `int8` + EF |" in run.stdout  # the ServerApp's table, streamed back by `flwr run --stream`
    records = read_records(out / "rounds.jsonl")
    assert [(r["codec"], r["round"]) for r in records] == [("int8", 0), ("int8", 1), ("int8", 2)], logs
    for r in records[1:]:
        assert r["aggregated"] == [0, 1] and not r["failed"] and r["uncompressed_replies"] == 0
        assert r["uplink_message_bytes"] > r["uplink_payload_bytes"] > 0
        assert r["uplink_message_bytes"] < 0.35 * r["uplink_uncompressed_message_bytes"]
    assert records[2]["eval_loss"] < records[0]["eval_loss"]
