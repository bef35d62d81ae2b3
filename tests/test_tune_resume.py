"""A search whose `oodlab tune` process is SIGKILLed mid-search, then resumed.

It uses :mod:`tests.test_tune`'s set-up, in a module of its own so that `make test`'s two
workers can run it beside the ASHA search: each takes minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import ray

from oodlab.search.tune import TRIAL_TAG, run_search
from oodlab.spec.search_space import load_space
from tests.test_tune import _setup, _trial_runs

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]


def test_killed_search_resumes_without_rerunning_finished_trials(ray_session, tmp_path):
    """SIGKILL the `oodlab tune` driver after two trials, resume, count trials and runs."""
    # two trials at a time (FIFO: no decision depends on their order): the first two overlap,
    # and the third starts when one of them ends, so it is under way when the driver is killed
    spec, spec_path, space_path = _setup(tmp_path, epochs=2, num_samples=3, max_concurrent=2,
                                         scheduler={"name": "fifo"})
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {"RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT)])}
    cmd = [sys.executable, "-m", "oodlab", "tune", str(spec_path), "--space", str(space_path),
           "--name", "s2", "--no-promote"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line)
            if "[oodlab tune] trial 2/3" in line:
                time.sleep(3)  # the search state is saved right after each trial event
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert any("trial 2/3" in line for line in seen), "".join(seen[-40:])
    before = {r.info.run_id: r for r in _trial_runs(spec, "s2")}
    finished = {i: r.info.end_time for i, r in before.items() if r.info.status == "FINISHED"}
    assert len(finished) >= 2, [r.info.status for r in before.values()]

    out = run_search(spec, load_space(space_path), space_path, name="s2", resume=True)
    assert len(out.trials) == 3
    runs = _trial_runs(spec, "s2")
    trial_ids = [r.data.tags[TRIAL_TAG] for r in runs]
    assert len(runs) == 3 and len(set(trial_ids)) == 3  # one MLflow run per trial, no rerun
    after = {r.info.run_id: r for r in runs}
    assert all(after[i].info.end_time == end for i, end in finished.items())  # not rerun
    assert all(r.info.status == "FINISHED" for r in runs)
    study = optuna.load_study(study_name="s2", storage=out.study_storage)
    assert len([t for t in study.trials if t.state.is_finished()]) == 3
