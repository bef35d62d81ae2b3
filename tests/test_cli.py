"""The ``oodlab`` command: every subcommand's ``--help`` works and names it, ``--help`` loads
no heavy library, and bad input is one ``oodlab: error:`` line with exit code 2."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from oodlab import __version__
from oodlab.cli.main import EXIT_BAD_INPUT, build_parser, main

ROOT = Path(__file__).resolve().parent.parent

# every command line that has its own --help (a group's actions included)
COMMANDS = [["run"], ["oe-select"], ["results"], ["tune"], ["promote"], ["data"],
            ["data", "list"], ["serve"], ["report"], ["submit"], ["jobs"], ["jobs", "list"],
            ["jobs", "status"], ["jobs", "logs"], ["jobs", "stop"], ["tune-posthoc"]]
TOP_LEVEL = sorted({c[0] for c in COMMANDS})


def _help(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_subcommand(capsys):
    out = _help([], capsys)
    assert out.startswith("usage: oodlab")
    for command in TOP_LEVEL:
        assert re.search(rf"^    {command}\s", out, re.M), command


def test_parser_has_exactly_the_documented_subcommands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == TOP_LEVEL


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_subcommand_help(argv, capsys):
    out = _help(argv, capsys)
    assert out.startswith(f"usage: oodlab {' '.join(argv)}"), out[:200]


def test_help_imports_no_heavy_library():
    code = ("import sys\nfrom oodlab.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'numpy', 'oodlab.data.types') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_workers_and_replicas_import_no_plotting_or_scikit_learn():
    """What a Serve replica imports loads no Ray Train (about 0.5 s a process); what it, a
    Ray Train worker and a Tune trial import loads no scikit-learn (1.5 s) and no matplotlib
    (0.5 s) until a metric or a figure needs them; the first metric and figure find theirs.
    A Ray Train worker's own module loads no MLflow."""
    heavy = "print(sorted(m for m in ('ray.train', 'sklearn', 'matplotlib') if m in sys.modules))"
    code = "\n".join([
        "import sys", "import oodlab.serve.app", heavy,
        "import oodlab.train.pipeline, oodlab.search.tune", heavy,
        "from oodlab.detect.metrics import auroc", "from oodlab.track import plots",
        "assert auroc([1.0, 2.0], [0.0]) == 1.0",
        "plots.close(plots.epoch_figure({'val/auroc': [(0, 0.5), (1, 0.7)]}))", heavy])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-3:] == [
        "[]", "['ray.train']", "['matplotlib', 'ray.train', 'sklearn']"]
    # a Ray Train worker runs oodlab.train.loop: no MLflow (1.3 s) unless a figure is logged
    code = ("import sys\nimport oodlab.train.loop\n"
            "print(sorted(m for m in ('mlflow', 'sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("argv", [["run"], ["oe-select"], ["results", "--name", "t", "--out",
                                                           "t.md"],
                                  ["tune", "--space", "search_spaces/quickstart.yaml"],
                                  ["submit"]], ids=lambda a: a[0])
def test_bad_spec_path_is_one_error_line_and_exit_2(argv, tmp_path, capsys):
    missing = tmp_path / "no_such_spec.yaml"
    assert main([argv[0], str(missing), *argv[1:]]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oodlab: error:"), captured.err
    assert "no_such_spec.yaml" in lines[0]
    assert captured.out == ""


def test_python_dash_m_version():
    out = subprocess.run([sys.executable, "-m", "oodlab", "--version"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"oodlab {__version__}"


def test_python_dash_m_bad_spec_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "oodlab", "run", str(tmp_path / "x.yaml")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == EXIT_BAD_INPUT
    assert out.stderr.count("oodlab: error:") == 1 and "Traceback" not in out.stderr


def test_data_errors_exit_2_and_other_errors_propagate(monkeypatch, capsys):
    from oodlab.cli import run
    from oodlab.data.types import DataError, DatasetNotFoundError
    from oodlab.errors import ModelReferenceError

    for err in (DataError("bad data"), DatasetNotFoundError("no such set"),
                ModelReferenceError("no such model")):
        monkeypatch.setattr(run, "_cmd_run", lambda args, err=err: (_ for _ in ()).throw(err))
        assert main(["run", "x.yaml"]) == EXIT_BAD_INPUT
        assert capsys.readouterr().err == f"oodlab: error: {err}\n"
    monkeypatch.setattr(run, "_cmd_run", lambda args: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):  # a bug stays a traceback
        main(["run", "x.yaml"])
