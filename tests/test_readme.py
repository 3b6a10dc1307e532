"""The README documents what the code does: its options table matches utils.Config, its commands match CI."""
import dataclasses
import os
import re

from conftest import REPO

from utils import Config


def readme():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return f.read()


def shown_default(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return str(value)


def test_options_table_matches_config():
    rows = dict(re.findall(r"^\| `--(\w+)` \| `([^`]*)` \|", readme(), flags=re.M))
    fields = {f.name: shown_default(f.default) for f in dataclasses.fields(Config)}
    assert rows == fields


def test_ci_runs_the_readme_test_command():
    command = re.search(r"Run the tests.*?```bash\n(.+?)\n```", readme(), flags=re.S).group(1).strip()
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci_lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    assert ci_lines[-1] == command
    assert any("pip install" in line and "-r requirements-dev.txt" in line for line in ci_lines)
    with open(os.path.join(REPO, "requirements-dev.txt"), encoding="utf-8") as f:
        assert "-r requirements.txt" in [line.strip() for line in f]  # the student's runtime, then the kit's tools
