"""The README's set-up commands are the ones CI and users actually run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _command(comment: str) -> str:
    match = re.search(rf"^\s*(python3 .+?)\s+# {comment}$", README, flags=re.MULTILINE)
    assert match, f"README has no command marked '# {comment}'"
    return match.group(1)


def test_readme_opens_with_the_demo_and_test_commands() -> None:
    head = "\n".join(README.splitlines()[:15])
    assert _command("the main job") in head
    assert _command("the tests") in head
    assert _command("the main job").endswith("adabatch demo")
    assert _command("the tests").endswith("python3 -m pytest")


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci_lines[-1] == _command("the tests")


def test_readme_quickstart_uses_the_public_names() -> None:
    import adabatch

    for name in ("AdaptiveBatchSampler", "BatchSizeScheduler", "schedules", "bn_safe_min_batch_size"):
        assert hasattr(adabatch, name)
        assert name in README
