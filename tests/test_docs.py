"""Docs that match the code: every config key is documented, every README command exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from pydantic import BaseModel

from featurerec.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def _keys(model: type[BaseModel]) -> list[tuple[str, str]]:
    """(section, key) for every field of every section model."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += [(name, k) for _, k in _keys(ann)] or [(name, name)]
        else:
            out.append((model.__name__, name))
    return out


def test_every_config_key_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [
        f"{section}.{key}"
        for section, key in _keys(Settings)
        if key != "config_dir" and f"`{key}`" not in doc and f".{key}`" not in doc
    ]
    assert not missing, f"docs/configuration.md does not mention: {missing}"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S))
    commands = sorted(
        set(re.findall(r"^featurerec ([a-z][a-z-]*(?: [a-z][a-z-]*)?)", blocks, re.M))
    )
    assert commands, "README shows no featurerec commands"
    for cmd in commands:
        words = cmd.split()
        proc = subprocess.run(
            [sys.executable, "-m", "featurerec", *words, "--help"],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0 and len(words) == 2:  # second word is an argument
            proc = subprocess.run(
                [sys.executable, "-m", "featurerec", words[0], "--help"],
                capture_output=True,
                text=True,
                check=False,
            )
        assert proc.returncode == 0, f"`featurerec {cmd}` in README: {proc.stderr[-300:]}"
