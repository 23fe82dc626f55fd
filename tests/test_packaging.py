"""The package builds without setuptools warnings (pyproject's package data is complete: the demo
assets and the widgets' JS/CSS land in the build), so `pip install -e .` is quiet."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_package_builds_without_setuptools_warnings(tmp_path):
    build = subprocess.run([sys.executable, "-W", "always", "-c",
                            "from setuptools import setup; setup()", "build_py", "--build-lib",
                            str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert "Warning" not in build.stderr, build.stderr
    package = tmp_path / "influence_nb"
    for name in ("demo/assets/model.safetensors", "demo/assets/corpus.parquet",
                 "demo/assets/finetune/adapter_config.json", "_static/influence.js",
                 "_static/influence.css"):
        assert (package / name).is_file(), name
