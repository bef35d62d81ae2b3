"""What `oodlab` shows on the terminal: its own lines, the libraries' logs in a file (``-v``:
on the terminal), errors in full."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from oodlab.console import library_logs, stderr
from tests.helpers import tiny_spec

ROOT = Path(__file__).resolve().parent.parent
# what Ray and MLflow print around a run (Ray Train, its actors, the core worker, Serve, MLflow)
INTERNAL = ("Checkpoint successfully created", "Reporting training result",
            "PlacementGroupCleaner", "core_worker.cc", "graceful_shutdown",
            "Started a local Ray instance", "Downloading artifacts", "mlflow.store")
LOG_LINE = re.compile(r"\[oodlab\] Ray and MLflow logs: (\S+\.log) ")


def _env() -> dict[str, str]:
    """A fresh process that starts its own Ray, like a user's shell."""
    return {k: v for k, v in os.environ.items()
            if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_DASHBOARD_ADDRESS")}


def _oodlab(*argv: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "oodlab", *argv], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_run_shows_progress_and_results_and_logs_ray_and_mlflow_to_a_file(tmp_path):
    """The quickstart's path (`oodlab run`), in a process of its own: without -v no Ray or
    MLflow line reaches stdout or stderr, the epoch line and the log file's path do; with -v
    Ray's lines are on the terminal as before. Both runs at once, to halve the wait."""
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path / "unused")))
    quiet = _oodlab("run", str(spec), "--set", f"workdir={tmp_path / 'quiet'}")
    loud = _oodlab("-v", "run", str(spec), "--set", f"workdir={tmp_path / 'loud'}")
    out, err = quiet.communicate(timeout=600)
    loud_out, loud_err = loud.communicate(timeout=600)

    assert quiet.returncode == 0, out + err
    for text in INTERNAL:
        assert text not in out + err, f"{text!r} on the terminal:\n{out}\n{err}"
    assert re.search(r"\[oodlab\] epoch 1/1 \(step \d+\) loss .* img/s, took \d+:\d\d\)", out), out
    assert "== tiny: method energy_oe" in out and "MLflow run " in out
    logs = LOG_LINE.findall(err)  # on stderr: stdout stays what the command prints
    assert len(logs) == 1 and len(err.splitlines()) == 1, err
    log = Path(logs[0])
    assert log.parent == (tmp_path / "quiet" / "logs").resolve()
    logged = log.read_text()
    assert "Checkpoint successfully created" in logged and "Started a local Ray" in logged
    assert "(TrainController pid=" in logged and "\x1b[36m(" not in logged  # no colours

    assert loud.returncode == 0, loud_out + loud_err
    assert "Checkpoint successfully created" in loud_err
    assert "Reporting training result" in loud_err
    assert re.search(r"\[oodlab\] epoch 1/1 \(step \d+\) loss", loud_out)
    assert not LOG_LINE.search(loud_out + loud_err)
    assert not (tmp_path / "loud" / "logs").exists()


ERROR_SCRIPT = """
import sys
from oodlab.cli import run
from oodlab.cli.main import main

def failing(args):
    sys.stderr.write("2026-01-01 INFO worker.py:1 -- a library line\\n")
    raise RuntimeError("the run failed: loss is nan")

run._cmd_run = failing
sys.exit(main(["run", "missing.yaml", "--set", "workdir=" + sys.argv[1]]))
"""


def test_an_error_prints_in_full_on_the_terminal(tmp_path):
    """A command that fails after the libraries' logs went to the file: its traceback and
    message reach the terminal's stderr, the library line does not."""
    out = subprocess.run([sys.executable, "-c", ERROR_SCRIPT, str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "Traceback (most recent call last)" in out.stderr
    assert "in failing" in out.stderr
    assert "RuntimeError: the run failed: loss is nan" in out.stderr
    assert "a library line" not in out.stderr + out.stdout
    (log,) = (tmp_path / "logs").glob("oodlab-*.log")
    assert f"logs: {log}" in out.stderr and out.stdout == ""
    assert "a library line" in log.read_text()


def test_library_logs_restores_stderr_and_writes_no_file_unless_something_is_logged(
        tmp_path, capsys):
    before = sys.stderr
    with library_logs(tmp_path / "logs") as path:
        assert stderr() is before and sys.stderr is not before
        print("oodlab: error: shown", file=stderr())
    assert sys.stderr is before and not path.exists()
    assert capsys.readouterr().err == "oodlab: error: shown\n"
    with library_logs(tmp_path / "logs", verbose=True) as path:
        assert path is None and sys.stderr is before
