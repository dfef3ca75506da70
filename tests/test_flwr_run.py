"""`flwr run .` with the app's default configuration runs the same tuning as `fedmerge simulate`.

Flower packs the app into a bundle (FAB) that carries no .safetensors, so this is also the
test that the demo parents are found from a bundle-imported copy of the packages.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
[superlink]
default = "local"

[superlink.local]
address = ":local:"
options.num-supernodes = 3
options.backend.client-resources.num-cpus = 1
options.backend.client-resources.num-gpus = 0.0
"""


def _stop_local_superlink(flwr_home: Path) -> None:
    """`flwr run` leaves a detached local SuperLink (and its executor) running: stop them."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "flower-superlink" in cmd and str(flwr_home) in cmd:
            for p in [*proc.children(recursive=True), proc]:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()


@pytest.mark.slow
def test_flwr_run_default_config_matches_simulate(tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG)
    out = tmp_path / "flwr-out"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    pyproject = (ROOT / "pyproject.toml").read_bytes()
    try:
        proc = subprocess.run(
            ["flwr", "run", str(ROOT), "--stream", "--run-config", f'out="{out}" grid-points=3'],
            env=env, capture_output=True, text=True, timeout=400,
        )
    finally:
        _stop_local_superlink(home)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and (out / "report.json").is_file(), log[-3000:]
    assert (ROOT / "pyproject.toml").read_bytes() == pyproject  # flwr run must not rewrite it
    report = json.loads((out / "report.json").read_text())

    from simulation.runner import run_simulation

    sim = run_simulation(out=tmp_path / "sim-out", recipe_fields={"search": {"grid_points": 3}})
    expected = json.loads((sim.out / "report.json").read_text())
    assert [t["lambda"] for t in report["tune"]] == [0.0, 0.5, 1.0]
    for got, want in zip(report["tune"], expected["tune"], strict=True):
        assert (got["auroc"], got["auprc"], got["n"]) == (want["auroc"], want["auprc"], want["n"])
    assert report["lambda_star"] == expected["lambda_star"]
    assert report["test"]["parent_b"]["auroc"] == expected["test"]["parent_b"]["auroc"]
    assert report["contributing_sites"] == ["site-0", "site-1", "site-2"]
