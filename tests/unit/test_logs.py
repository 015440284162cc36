"""Logging as a library: the host program's logging decides, not ours."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import PROJECT_ROOT

SCRIPT = """
from producer.client import JobClient
from models.settings import load_settings
import structlog

JobClient("adpa_00000000_x", load_settings()).close()
log = structlog.get_logger("producer.client")
log.info("jobs_submitted", count=1)
log.warning("job_enqueue_deferred", unsent=1)
"""


def test_the_library_keeps_stdout_clean_and_follows_stdlib_levels(
    tmp_path: Path,
) -> None:
    """Unconfigured hosts see warnings on stderr (stdlib's default), no info lines."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "job_enqueue_deferred" in result.stderr
    assert "jobs_submitted" not in result.stderr
