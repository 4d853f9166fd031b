"""Node loss on a multi-node Ray cluster (three nodes on this machine, `ray.cluster_utils.Cluster`):
generations and a training run survive the kill of the node they run on. The scenario runs in its own
process (tests/multinode_scenario.py): it needs a Ray cluster of its own, which cannot share this
process with the session's local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

HERE = Path(__file__).resolve().parent
TIMEOUT_S = int(os.environ.get("GENSERVE_MULTINODE_TIMEOUT_S", "900"))


def test_node_kill_ends_every_job_and_training_resumes_on_another_node(tmp_path: Path, tiny_models):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("GENSERVE_SETTINGS_JSON", None)
    models = tiny_models["sd1"].root.parent
    result = subprocess.run([sys.executable, str(HERE / "multinode_scenario.py"), str(tmp_path / "mn"), str(models)],
                            env=env, cwd=HERE.parent, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-6000:])
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["failed_on_node_loss"] >= 1 and figures["training_attempts"] >= 2
