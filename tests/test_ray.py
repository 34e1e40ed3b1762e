"""--executor ray on a real local Ray cluster: a head node and a second node on 127.0.0.1, one CPU each.

One cluster serves the module (started with `ray start --block`, stopped by ending those two
processes). Trials and calibration shards must give what one process gives: the same tuned recipe
and model bytes, the same ranking, byte-identical calibration tables; and the same ranking when a
node's raylet is killed mid-search (its trials are retried on the head node by Ray).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import SAMPLE, fused, save_npy_folder

from qtool.search import api as search_api

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="the test extra installs ray; without it --executor ray is a usage error")

BIN = Path(sys.executable).parent
QTOOL = BIN / "qtool"
RAY = BIN / "ray"
METHODS = ("minmax", "percentile", "entropy", "mse")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def raylet_of(node_manager_port: int) -> int | None:
    """The pid of the raylet listening on this node manager port (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if words and words[0].endswith(b"raylet") and f"--node_manager_port={node_manager_port}".encode() in words:
            return int(entry.name)
    return None


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """(address, node manager port of the second node): a head and a second node, one CPU each."""
    port, worker_port = free_port(), free_port()
    logs = tmp_path_factory.mktemp("ray")
    token = logs / "auth_token"  # Ray's token authentication, with a token of this cluster's own
    token.write_text(os.urandom(16).hex())
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    saved = {key: os.environ.get(key) for key in auth}
    os.environ.update(auth)  # for every client: the qtool commands and drivers this module starts
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    # Ray's session files (and its ray_current_cluster note) in a folder of our own, short enough for
    # its Unix sockets, removed afterwards: nothing is left in the machine's /tmp/ray
    temp = Path(tempfile.mkdtemp(prefix="qtool-ray-"))
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats", "--block",
              f"--temp-dir={temp}"]
    started = []
    try:
        started.append(subprocess.Popen([str(RAY), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                                         "--include-dashboard=false", *common], env=env,
                                        stdout=open(logs / "head.log", "w"), stderr=subprocess.STDOUT))
        address = f"127.0.0.1:{port}"
        _wait_started(started[0], logs / "head.log")
        started.append(subprocess.Popen([str(RAY), "start", f"--address={address}", "--node-ip-address=127.0.0.1",
                                         f"--node-manager-port={worker_port}", *common], env=env,
                                        stdout=open(logs / "node.log", "w"), stderr=subprocess.STDOUT))
        _wait_started(started[1], logs / "node.log")
        yield address, worker_port
    finally:
        for process in reversed(started):  # `ray start --block` stops its node's processes when it ends
            process.send_signal(signal.SIGTERM)
        for process in reversed(started):
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(temp, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _wait_started(process: subprocess.Popen, log: Path, seconds: float = 90) -> None:
    """Until `ray start` says its node runs (it has registered with the head by then)."""
    deadline = time.monotonic() + seconds
    while "Ray runtime started" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline and process.poll() is None, log.read_text(errors="replace")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """test_tune.py's MatMul chain whose layer 3 sees one channel near +1000."""
    from test_tune import hostile_model

    folder = tmp_path_factory.mktemp("hostile")
    onnx.save(hostile_model(), folder / "model.onnx")
    rng = np.random.default_rng(1)
    save_npy_folder(folder / "calib", [rng.standard_normal((1, 16)) for _ in range(32)])
    save_npy_folder(folder / "eval", [rng.standard_normal((1, 16)) for _ in range(32)])
    (folder / "recipe.yaml").write_text(fused("version: 1\nvalidation:\n  gates: {min_sqnr_db: 12}\n"))  # a tiny model: see FUSED
    return folder


def qtool(*args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.run([str(QTOOL), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env)


def test_tune_on_ray_writes_what_one_process_writes(cluster, hostile, tmp_path):
    address, _ = cluster
    common = [hostile / "model.onnx", "--recipe", hostile / "recipe.yaml", "--data", hostile / "calib",
              "--validation-data", hostile / "eval", "--latency-runs", "0", "--quiet"]
    local = qtool("tune", *common, "--jobs", "1", "--output", tmp_path / "local")
    assert local.returncode == 0, local.stderr
    remote = qtool("tune", *common, "--executor", "ray", "--ray-address", address, "--output", tmp_path / "ray")
    assert remote.returncode == 0, remote.stderr
    for name in ("recipe.tuned.yaml", "model.onnx"):
        assert (tmp_path / "ray" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name
    search = json.loads((tmp_path / "ray" / "report.json").read_text())["search"]
    assert search["executor"]["kind"] == "ray" and search["jobs"] == 2 and search["executor"]["lost_trials"] == []
    assert search["executor"]["shipped_bytes"] > (hostile / "model.onnx").stat().st_size  # model, eval set, table


def test_sensitivity_on_ray_ranks_as_one_process(cluster, tmp_path):
    address, _ = cluster
    common = [SAMPLE / "model.onnx", "--recipe", "int8", "--data", SAMPLE / "calib", "--validation-data",
              SAMPLE / "eval", "--samples", "32", "--json"]
    local = qtool("sensitivity", *common, "--output", tmp_path / "local")
    remote = qtool("sensitivity", *common, "--output", tmp_path / "ray", "--executor", "ray", "--ray-address", address)
    assert local.returncode == 0 and remote.returncode == 0, (local.stderr, remote.stderr)
    assert json.loads(remote.stdout)["sensitivity"]["rows"] == json.loads(local.stdout)["sensitivity"]["rows"]


@pytest.mark.parametrize("method", METHODS)
def test_sharded_calibration_table_is_byte_identical(cluster, tmp_path, method):
    address, _ = cluster
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\ncalibration: {{method: {method}, batch_size: 4, workers: 0}}\n")
    common = [SAMPLE / "model.onnx", "--recipe", recipe, "--data", SAMPLE / "calib", "--quiet"]
    local = qtool("calibrate", *common, "--output", tmp_path / "local.json")
    remote = qtool("calibrate", *common, "--output", tmp_path / "ray.json", "--executor", "ray", "--ray-address", address)
    assert local.returncode == 0 and remote.returncode == 0, (local.stderr, remote.stderr)
    assert (tmp_path / "ray.json").read_bytes() == (tmp_path / "local.json").read_bytes()


@pytest.mark.parametrize("command", ["tune", "sensitivity", "quantize", "calibrate"])
def test_a_model_past_the_limit_is_refused_on_ray_before_anything_runs(cluster, tmp_path, monkeypatch, command):
    """Its weights stay in files of this machine (qtool.io.external); trials and calibration shards got
    their absolute paths, which only a task on this machine can read. Exit 2, saying why, nothing written."""
    from click.testing import CliRunner
    from test_large_models import lower_limit
    from qtool.cli.main import main

    address, _ = cluster
    folder = tmp_path / "large"
    folder.mkdir()
    onnx.save_model(onnx.load(SAMPLE / "model.onnx"), str(folder / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="weights.bin", size_threshold=0)
    lower_limit(monkeypatch)  # 16 KiB: the sample model is past it
    out = tmp_path / ("table.json" if command == "calibrate" else "out")
    (tmp_path / "recipe.yaml").write_text("version: 1\nvalidation:\n  gates: {min_cosine: 0.99}\n")
    extra = ["--recipe", str(tmp_path / "recipe.yaml")] if command == "tune" else []
    result = CliRunner().invoke(main, [command, str(folder / "model.onnx"), "--data", str(SAMPLE / "calib"),
                                       "--output", str(out), "--executor", "ray", "--ray-address", address, *extra])
    assert result.exit_code == 2, result.output
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: {folder / 'model.onnx'}: --executor ray takes models under protobuf's 2 GB limit")
    assert "--executor local" in line and not out.exists()


def test_without_ray_the_error_says_what_to_install(tmp_path):
    """A Python where `import ray` fails (a stand-in package that raises): exit 2, one line."""
    blocker = tmp_path / "blocker" / "ray"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('no ray here')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker.parent)}
    result = subprocess.run([str(QTOOL), "sensitivity", str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"),
                             "--output", str(tmp_path / "o"), "--executor", "ray"],
                            capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "Error: --executor ray needs Ray, which is not installed: pip install 'qtool-onnx[ray]'"]


def test_an_address_where_nothing_listens_is_exit_2_naming_it_not_a_hang(tmp_path):
    """Ray retried its connection for many minutes; a TCP probe (CONNECT_TIMEOUT_S, 10 s) answers first."""
    address = f"127.0.0.1:{free_port()}"
    result = qtool("calibrate", SAMPLE / "model.onnx", "--data", SAMPLE / "calib", "--output", tmp_path / "t.json",
                   "--executor", "ray", "--ray-address", address, timeout=60)  # a hang fails here
    assert result.returncode == 2, result.stderr
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: --ray-address {address}: nothing answers there (") and "ray start --head" in line
    assert not (tmp_path / "t.json").exists()


def test_quiet_holds_for_rays_notes_on_the_local_instance(tmp_path):
    """New-user finding 19: with a token in ~/.ray and RAY_AUTH_MODE unset, Ray logged "Token authentication
    is enabled for this Ray cluster..." on stderr through -q. A local instance, in a temporary folder."""
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(os.urandom(16).hex())
    temp = Path(tempfile.mkdtemp(prefix="qtool-ray-"))  # short: Ray's Unix sockets live there
    env = {key: value for key, value in os.environ.items()
           if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env.update(HOME=str(home), RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0")
    try:
        result = subprocess.run([str(QTOOL), "sensitivity", str(SAMPLE / "model.onnx"), "--data", str(SAMPLE / "calib"),
                                 "--samples", "2", "--output", str(tmp_path / "o"), "--executor", "ray", "--jobs", "1",
                                 "-q"], capture_output=True, text=True, timeout=120, env=env)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ("", "")


def test_ctrl_c_cancels_the_trials_and_keeps_the_best_so_far(cluster, tmp_path):
    from test_tune import ppocr_recipe
    from conftest import shared_model

    address, _ = cluster
    folder, out = shared_model("ppocr_cls"), tmp_path / "tuned"
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    process = subprocess.Popen([str(QTOOL), "tune", str(folder / "model.onnx"), "--recipe", str(ppocr_recipe(tmp_path)),
                                "--data", str(folder / "calib"), "--validation-data", str(folder / "eval"),
                                "--output", str(out), "--quiet", "--executor", "ray", "--ray-address", address],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 120
    while not (out / "report.json").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    assert (out / "report.json").exists(), process.communicate()
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    report = json.loads((out / "report.json").read_text())
    assert report["interrupted"] and (out / "model.onnx").is_file() and (out / "recipe.tuned.yaml").is_file()


KILL_DRIVER = """
import json, os, signal, sys
from pathlib import Path
from qtool.search import api
sample, out, address, pid = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
killed = []

def kill_the_node(stage, done, total):
    if stage == "sensitivity" and done >= 1 and not killed:
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)

result = api.sensitivity(sample / "model.onnx", sample / "calib", "int8", out, validation_data=sample / "eval",
                         samples=32, executor="ray", ray_address=address, progress=kill_the_node)
print(json.dumps({"killed": killed, "rows": result.rows, "executor": result.report["sensitivity"]["executor"]}))
"""


def test_a_killed_node_still_ends_with_the_same_ranking(cluster, tmp_path):
    """Runs last: the second node's raylet is killed after the first trial; Ray retries its trials."""
    address, worker_port = cluster
    local = search_api.sensitivity(SAMPLE / "model.onnx", SAMPLE / "calib", "int8", tmp_path / "local",
                                   validation_data=SAMPLE / "eval", samples=32)
    raylet = raylet_of(worker_port)
    assert raylet is not None
    driver = subprocess.run([sys.executable, "-c", KILL_DRIVER, str(SAMPLE), str(tmp_path / "ray"), address,
                             str(raylet)], capture_output=True, text=True, timeout=300)
    assert driver.returncode == 0, driver.stderr[-3000:]
    remote = json.loads(driver.stdout.strip().splitlines()[-1])
    assert remote["killed"] == [raylet] and raylet_of(worker_port) is None
    assert remote["executor"]["lost_trials"] == []
    assert json.loads(json.dumps(local.rows)) == remote["rows"]
