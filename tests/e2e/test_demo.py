"""``adpa demo`` on the embedded default, exactly as a new user runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.e2e


def test_demo_on_the_embedded_default_passes(tmp_path: Path) -> None:
    """With no configuration: SQLite, filesystem broker, a real prefork worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ADPA_")}
    env["PYTHONPATH"] = str(PROJECT_ROOT)

    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from producer.cli import main; main()",
            "demo",
            "--jobs",
            "100",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = " ".join(result.stdout.split())
    assert re.search(
        r"demo passed: 100/100 sample jobs succeeded, 3/3 bad jobs failed", summary
    )
    assert "2 bad submissions refused" in summary
    documents = list((tmp_path / ".adpa" / "documents").rglob("*.md"))
    assert len(documents) == 100
    assert (tmp_path / ".adpa" / "adpa.sqlite3").is_file()
