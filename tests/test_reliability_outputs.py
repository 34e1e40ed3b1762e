"""Reliability of what qtool writes (issue 16, A, B and F): never over an input, every I/O failure
one clear line and its exit code, odd paths and read-only or small mounts (docs/reliability.md)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import subprocess
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import FUSED, ROOT, fused, fused_recipe, matmul_chain, save_npy_folder, with_fused_recipe
from qtool import api
from qtool.cli.main import main
from qtool.errors import EXIT_BROKEN_PIPE, EXIT_SIDE_FILE, WriteError
from qtool.io import artifacts


@pytest.fixture
def small(tmp_path):
    """m/model.onnx (one MatMul), m/data (16 samples), m/r.yaml: a project folder."""
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(matmul_chain(), str(folder / "model.onnx"))
    rng = np.random.RandomState(1)
    save_npy_folder(folder / "data", [rng.randn(1, 8) for _ in range(16)])
    (folder / "r.yaml").write_text("version: 1\n")
    return folder


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(*args, env=None, cwd=None):
    args = with_fused_recipe(list(args))
    return CliRunner(env=env).invoke(main, [str(a) for a in args]) if cwd is None else _in(cwd, args, env)


def _in(cwd, args, env):
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner(env=env).invoke(main, [str(a) for a in args])
    finally:
        os.chdir(previous)


def qtool(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qtool", *map(str, args)], cwd=ROOT, **kwargs)


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A tmpfs mounted at `folder` for the test (root in a container that allows mounts), else skip."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; this test runs as an ordinary user here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# --- A. outputs never over inputs -----------------------------------------------------------


def test_junit_naming_the_model_is_refused(small):
    before = digest(small / "model.onnx")
    result = run("quantize", small / "model.onnx", "--data", small / "data", "--output", small.parent / "out",
                 "--junit", small / "model.onnx")
    assert result.exit_code == 2 and "--junit file would overwrite the input model" in result.stderr
    assert digest(small / "model.onnx") == before and not (small.parent / "out").exists()


def test_step_summary_naming_the_model_is_refused(small):
    before = digest(small / "model.onnx")
    result = run("quantize", small / "model.onnx", "--data", small / "data", "--output", small.parent / "out",
                 env={"GITHUB_STEP_SUMMARY": str(small / "model.onnx")})
    assert result.exit_code == 2 and "GITHUB_STEP_SUMMARY file would overwrite the input model" in result.stderr
    assert digest(small / "model.onnx") == before


def test_sensitivity_cache_naming_the_model_is_refused_without_overwrite_too(small):
    before = digest(small / "model.onnx")
    result = run("sensitivity", small / "model.onnx", "--data", small / "data", "--output", small.parent / "s",
                 "--cache", small / "model.onnx")
    assert result.exit_code == 2 and "--cache file would overwrite the input model" in result.stderr
    assert digest(small / "model.onnx") == before


@pytest.mark.parametrize("command", ["junit", "cache", "table"])
def test_a_file_inside_a_data_folder_is_never_written(small, command):
    """A fresh user replaced a calibration sample with a JUnit file, a cache and a table, each exit 0."""
    sample = sorted((small / "data").iterdir())[0]
    before = digest(sample)
    args = {"junit": ("quantize", small / "model.onnx", "--data", small / "data", "--output", small.parent / "out",
                      "--junit", sample),
            "cache": ("sensitivity", small / "model.onnx", "--data", small / "data", "--output", small.parent / "s",
                      "--cache", sample),
            "table": ("calibrate", small / "model.onnx", "--data", small / "data", "--output", sample, "--overwrite")}
    result = run(*args[command])
    assert result.exit_code == 2 and f"would be written inside the input folder {small / 'data'}" in result.stderr
    assert digest(sample) == before and not (small.parent / "out").exists()


@pytest.mark.parametrize("option", ["--junit", "--cache"])
def test_a_file_qtool_did_not_write_is_not_replaced_by_a_junit_file_or_a_cache(small, tmp_path, option):
    """New-user finding 5: `--cache important.txt` (and `--junit`) replaced the user's notes with exit 0."""
    notes = tmp_path / "important.txt"
    notes.write_text("notes\n")
    command = "quantize" if option == "--junit" else "sensitivity"
    (small / "r.yaml").write_text(FUSED)  # a tiny model: see FUSED
    args = (command, small / "model.onnx", "--recipe", small / "r.yaml", "--data", small / "data", "--output")
    result = run(*args, tmp_path / "o1", option, notes)
    assert result.exit_code == 2 and f"{notes}: {option} file exists and is not a" in result.stderr
    assert notes.read_text() == "notes\n" and not (tmp_path / "o1").exists()
    (tmp_path / "again.txt").write_text("")  # an empty file holds nothing to lose; our own is replaced again
    assert run(*args, tmp_path / "o2", option, tmp_path / "again.txt").exit_code == 0
    assert run(*args, tmp_path / "o3", option, tmp_path / "again.txt").exit_code == 0
    assert run(*args, tmp_path / "o4", option, notes, "--overwrite").exit_code == 0  # asked for in so many words
    assert notes.read_text() != "notes\n"


@pytest.mark.parametrize("command", ["quantize", "compare", "sensitivity", "tune", "ort-table"])
def test_overwrite_does_not_delete_a_folder_qtool_did_not_write(small, tmp_path, command):
    """New-user finding: `--output eval/ --overwrite` (a typo for out/) deleted the evaluation set, exit 0."""
    (small / "r.yaml").write_text(fused("version: 1\nvalidation:\n  gates: {min_cosine: 0.5}\n"))
    model, data = small / "model.onnx", small / "data"
    args = {"quantize": ("quantize", model, "--data", data),
            "compare": ("compare", model, model, "--data", data),
            "sensitivity": ("sensitivity", model, "--recipe", small / "r.yaml", "--data", data, "--samples", 2),
            "tune": ("tune", model, "--recipe", small / "r.yaml", "--data", data, "--latency-runs", 0),
            "ort-table": ("calibrate", model, "--data", data, "--format", "ort-table")}[command]
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "0000.npy").write_bytes(b"user data")
    result = run(*args, "--output", precious, "--overwrite")
    assert result.exit_code == 2 and f"{precious}: output folder holds 0000.npy and is not a" in result.stderr
    assert [p.name for p in precious.iterdir()] == ["0000.npy"]
    (tmp_path / "empty").mkdir()
    assert run(*args, "--output", tmp_path / "empty", "--overwrite").exit_code == 0  # nothing to lose
    again = run(*args, "--output", tmp_path / "empty", "--overwrite")  # an earlier run's output is replaced
    assert again.exit_code == 0, again.output


def test_init_over_its_own_model_is_refused(small):
    before = digest(small / "model.onnx")
    result = run("init", small / "model.onnx", "--output", small / "model.onnx", "--overwrite")
    assert result.exit_code == 2 and "recipe file would overwrite the input model" in result.stderr
    assert digest(small / "model.onnx") == before


def test_calibrate_over_its_recipe_is_refused(small):
    result = run("calibrate", small / "model.onnx", "--data", small / "data", "--recipe", small / "r.yaml",
                 "--output", small / "r.yaml", "--overwrite")
    assert result.exit_code == 2 and "calibration table would overwrite the input" in result.stderr
    assert (small / "r.yaml").read_text() == "version: 1\n"


@pytest.mark.parametrize("given", ["", ".", ".."])
def test_output_naming_the_working_folder_or_a_parent_is_refused(small, given):
    (small / ".git").mkdir()
    (small / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    result = run("quantize", "model.onnx", "--data", "data", "--output", given, "--overwrite", cwd=small)
    assert result.exit_code == 2 and "would replace the working folder" in result.stderr
    assert (small / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n" and (small / "model.onnx").is_file()


def test_a_hard_link_to_the_model_counts_as_the_model(small):
    os.link(small / "model.onnx", small.parent / "alias.onnx")
    before = digest(small / "model.onnx")
    result = run("quantize", small / "model.onnx", "--data", small / "data", "--output", small.parent / "out",
                 "--junit", small.parent / "alias.onnx")
    assert result.exit_code == 2 and "would overwrite the input model" in result.stderr
    assert digest(small / "model.onnx") == before


def test_junit_naming_the_external_data_is_refused(tmp_path):
    model = matmul_chain(width=64)
    onnx.save(model, str(tmp_path / "model.onnx"), save_as_external_data=True, location="weights.bin",
              size_threshold=0)
    data = save_npy_folder(tmp_path / "data", np.ones((4, 1, 64)))
    before = digest(tmp_path / "weights.bin")
    result = run("quantize", tmp_path / "model.onnx", "--data", data, "--output", tmp_path / "out",
                 "--junit", tmp_path / "weights.bin")
    assert result.exit_code == 2 and "would overwrite the model's external data" in result.stderr
    assert digest(tmp_path / "weights.bin") == before


def test_output_folder_holding_the_recipes_validation_data_is_refused(small):
    save_npy_folder(small.parent / "out" / "eval", np.ones((4, 1, 8)))
    (small / "r.yaml").write_text("version: 1\nvalidation:\n  data: ../out/eval\n")
    result = run("quantize", small / "model.onnx", "--data", small / "data", "--recipe", small / "r.yaml",
                 "--output", small.parent / "out", "--overwrite")
    assert result.exit_code == 2 and "output folder would contain the input" in result.stderr
    assert len(list((small.parent / "out" / "eval").iterdir())) == 4


# --- B. every I/O error: exit 2 (or 4 for a side file), one line ------------------------------


def test_junit_naming_a_folder_is_refused_before_the_run(small):
    (small.parent / "gates").mkdir()
    result = run("quantize", small / "model.onnx", "--data", small / "data", "--output", small.parent / "out",
                 "--junit", small.parent / "gates")
    assert result.exit_code == 2 and "--junit file is a folder" in result.stderr
    assert not (small.parent / "out").exists()


def test_junit_on_a_read_only_mount_exits_4_naming_it_after_complete_artifacts(small, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        result = run("quantize", small / "model.onnx", "--data", small / "data", "--output", tmp_path / "out",
                     "--junit", ro / "gates.xml")
    assert result.exit_code == EXIT_SIDE_FILE, result.output
    last = result.stderr.splitlines()[-1]
    assert last.startswith(f"Error: {ro / 'gates.xml'}: cannot write: Read-only file system")
    assert last.endswith(f"(the artifacts in {tmp_path / 'out'} are complete)")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"model.onnx", "report.json", "report.md", "report.html"}


@pytest.mark.parametrize("command", ["quantize", "compare"])
@pytest.mark.parametrize("gate_fails", [True, False])
def test_a_failed_gate_is_still_said_when_the_junit_file_cannot_be_written(small, tmp_path, command, gate_fails):
    """New-user finding 2: exit 4 and only the JUnit error hid a failed gate (report.json said passed: false)."""
    (tmp_path / "not-a-folder").write_text("x")
    junit = tmp_path / "not-a-folder" / "gates.xml"  # its folder cannot be made: the JUnit write fails
    gate = "min_sqnr_db=150" if gate_fails else "min_cosine=0.5"
    if command == "quantize":
        (small / "g.yaml").write_text(FUSED + "validation:\n  gates:\n    {}: {}\n".format(*gate.split("=")))
        args = ("quantize", small / "model.onnx", "--data", small / "data", "--recipe", small / "g.yaml")
    else:
        assert run("quantize", small / "model.onnx", "--data", small / "data", "--output", tmp_path / "q",
                   "--no-bench").exit_code == 0
        args = ("compare", small / "model.onnx", tmp_path / "q" / "model.onnx", "--data", small / "data",
                "--gate", gate)
    result = run(*args, "--output", tmp_path / "out", "--junit", junit)
    lines = result.stderr.splitlines()
    assert lines[-1].startswith(f"Error: {junit}") and lines[-1].endswith(f"(the artifacts in {tmp_path / 'out'} "
                                                                          "are complete)")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    if gate_fails:
        assert result.exit_code == 1, result.output
        assert any(line.startswith("gate min_sqnr_db: FAILED") for line in lines[:-1])
        assert report["passed"] is False
    else:
        assert result.exit_code == EXIT_SIDE_FILE, result.output
        assert report["passed"] is True


def test_calibration_table_on_a_read_only_mount_exits_2(small, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        result = run("calibrate", small / "model.onnx", "--data", small / "data", "--output", ro / "t.json")
    assert result.exit_code == 2 and f"{ro / 't.json'}: cannot write: Read-only file system" in result.stderr


@pytest.mark.parametrize("command", ["quantize", "calibrate", "compare"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(small, tmp_path, command):
    """A new user's quantize --output on a read-only mount calibrated and validated, then exited 2
    'cannot create the output folder'; tune would search first. Now one line before any work."""
    (tmp_path / "not-a-folder").write_text("x")
    results = [_refused_run(small, command, tmp_path / "not-a-folder" / "out") + ("Not a directory",)]
    if os.geteuid() == 0 and command == "quantize":
        with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
            results.append(_refused_run(small, command, ro / "out") + ("Read-only file system",))
    for result, written, why in results:
        assert result.exit_code == 2, result.output
        action = "write" if command == "calibrate" else "create the output folder"
        assert result.stderr.splitlines() == [f"Error: {written}: cannot {action}: {why}"]  # no progress line before
        assert not list(tmp_path.glob("**/*.qtool-tmp"))


def _refused_run(small, command, target: Path):
    """(the result, the path its error names) of `command` writing to `target`."""
    if command == "compare":
        return run("compare", small / "model.onnx", small / "model.onnx", "--data", small / "data",
                   "--output", target), target
    if command == "calibrate":
        return run("calibrate", small / "model.onnx", "--data", small / "data", "--output", target / "t.json"), \
            target / "t.json"
    return run("quantize", small / "model.onnx", "--data", small / "data", "--output", target), target


def test_calibration_table_on_a_full_disk_exits_2_and_leaves_nothing(small, tmp_path):
    with tmpfs(tmp_path / "full", "size=64k") as full:
        with contextlib.suppress(OSError):
            (full / "filler").write_bytes(b"x" * (1 << 20))
        result = run("calibrate", small / "model.onnx", "--data", small / "data", "--output", full / "t.json")
        left = sorted(p.name for p in full.iterdir())
    assert result.exit_code == 2 and "cannot write: No space left on device" in result.stderr
    assert left == ["filler"]


def test_init_on_a_read_only_mount_exits_2(small, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        result = run("init", small / "model.onnx", "--output", ro / "recipe.yaml")
    assert result.exit_code == 2 and "cannot write: Read-only file system" in result.stderr


def test_json_to_a_full_stdout_exits_2(small):
    with open("/dev/full", "w") as full:
        done = qtool("inspect", small / "model.onnx", "--json", stdout=full, stderr=subprocess.PIPE, text=True,
                     timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr == "Error: stdout: cannot write: No space left on device\n"


def test_a_closed_stdout_pipe_ends_quietly(small):
    process = subprocess.Popen([sys.executable, "-m", "qtool", "inspect", str(small / "model.onnx"), "--json"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # `| true`: the reader is gone before qtool writes
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == EXIT_BROKEN_PIPE and stderr == ""


def test_an_ascii_only_locale_prints_the_summary_in_ascii(small, tmp_path):
    """As with LC_ALL=C PYTHONUTF8=0: stdout's encoding is ASCII (the summary's title holds a →)."""
    result = CliRunner(charset="ascii").invoke(main, [*with_fused_recipe(["quantize", str(small / "model.onnx")]), "--data",
                                                      str(small / "data"), "--output", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    result.stdout_bytes.decode("ascii")  # nothing but ASCII
    assert "qtool quantize -> " in result.stdout


def test_no_usable_temporary_folder_is_one_clear_error(tmp_path, monkeypatch):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        monkeypatch.setattr(tempfile, "tempdir", str(ro))
        with pytest.raises(WriteError, match="no usable temporary folder .*Read-only file system; set TMPDIR"):
            with artifacts.temporary_folder("qtool-trials-"):
                pass


def test_an_output_that_is_a_mount_point_has_its_contents_replaced(small, tmp_path):
    with tmpfs(tmp_path / "out", "size=4m") as out:
        (out / "old.txt").write_text("old")
        (out / "report.json").write_text('{"schema_version": 1, "command": "quantize"}')  # an earlier run's
        result = run("quantize", small / "model.onnx", "--data", small / "data", "--output", out, "--overwrite")
        names = {p.name for p in out.iterdir()}
        still_mounted = os.path.ismount(out)
    assert result.exit_code == 0, result.output
    assert names == {"model.onnx", "report.json", "report.md", "report.html"} and still_mounted


# --- C. staging: signals held while it is made, a dead writer's removed -----------------------


def test_signals_are_held_while_a_staging_path_is_created():
    """Held even with other threads running (ONNX Runtime's, a pool's): any thread may take the signal."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    held = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with artifacts.signals_deferred():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                held = True  # reached: the signal waits for the block's end
    finally:
        stop.set()
        other.join()
    assert held


def test_staging_left_by_a_dead_process_is_removed_by_the_next_run(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = artifacts.staging_name().split(".")[2].split("-")[0]  # this host's tag
    stale = tmp_path / f".{dead.pid}.{host}-0a1b2c3d.qtool-tmp"
    stale.mkdir()
    (stale / "model.onnx").write_text("half")
    stale_file = tmp_path / f".{dead.pid}.{host}-deadbeef.qtool-tmp"
    stale_file.write_text("half")
    kept = [tmp_path / f".{os.getppid()}.{host}-0a1b2c3d.qtool-tmp",  # a running writer's
            tmp_path / f".{dead.pid}.{'0' if host != '000000' else '1'}{host[1:]}-0a1b2c3d.qtool-tmp",  # another host's
            tmp_path / ".out.x1y2.qtool-tmp"]  # no pid in the name: not provably dead
    for path in kept:
        path.mkdir()
    artifacts.write_artifacts(tmp_path / "out", False, {"a.txt": lambda path: path.write_text("a")})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*(path.name for path in kept), "out"])


# --- F. smaller -------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_output_folders_honour_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        artifacts.write_artifacts(tmp_path / "out", False, {"a.txt": lambda path: path.write_text("a")})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == mode


def test_an_output_name_of_250_characters_is_written(tmp_path):
    output = tmp_path / ("o" * 250)
    artifacts.write_artifacts(output, False, {"a.txt": lambda path: path.write_text("a")})
    artifacts.write_artifacts(output, True, {"b.txt": lambda path: path.write_text("b")})
    assert [p.name for p in output.iterdir()] == ["b.txt"] and [p.name for p in tmp_path.iterdir()] == [output.name]


def test_the_report_names_the_model_that_was_loaded_when_the_file_is_replaced(small, tmp_path):
    model = small / "model.onnx"
    loaded = digest(model)
    replaced = []

    def progress(stage, done, total):
        if not replaced:  # another writer replaces the file while the run goes on
            onnx.save(matmul_chain(seed=7), str(model))
            replaced.append(digest(model))

    result = api.quantize(model, small / "data", fused_recipe(), output_dir=tmp_path / "out", progress=progress)
    assert replaced and replaced[0] != loaded
    assert result.report["inputs"]["model"]["sha256"] == loaded
    assert json.loads((tmp_path / "out" / "report.json").read_text())["inputs"]["model"]["sha256"] == loaded


def test_a_folder_as_model_says_it_is_a_folder(tmp_path):
    result = run("inspect", tmp_path)
    assert result.exit_code == 2 and result.stderr == f"Error: {tmp_path}: is a folder, not a model file; " \
                                                      "give the .onnx file inside it\n"


def test_a_fifo_as_model_says_what_it_is_without_blocking(small, tmp_path):
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    result = run("quantize", fifo, "--data", small / "data", "--output", tmp_path / "out")
    assert result.exit_code == 2 and "is not a regular file (a FIFO" in result.stderr



def test_every_test_named_in_docs_reliability_exists():
    text = (ROOT / "docs" / "reliability.md").read_text(encoding="utf-8")
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)`", text)
    assert len(named) >= 40
    for file, name in named:
        assert re.search(rf"^def {name}\(", (ROOT / "tests" / file).read_text(encoding="utf-8"), re.M), (file, name)
