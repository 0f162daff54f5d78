"""The package as an index shows it: the wheel's metadata, built from the source tree.

The README is the long description with its relative links made absolute
([tool.hatch.metadata.hooks.fancy-pypi-readme] in pyproject.toml): on the package
index there is nothing to resolve them against.
"""

from __future__ import annotations

import email.message
import email.parser
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SUPPORTED_PYTHONS = {"3.11", "3.12", "3.13"}

# a link target that is not absolute: `](` then anything but http(s):// or mailto:
RELATIVE_LINK = re.compile(r"\]\((?!https?://|mailto:)")
# a reference-style definition `[label]: target` whose target is not absolute
RELATIVE_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:[ \t]*(?!https?://|mailto:)\S", re.MULTILINE)


@pytest.fixture(scope="module")
def metadata(tmp_path_factory: pytest.TempPathFactory) -> email.message.Message:
    """The METADATA of a wheel built the way `pip install .` builds one (without
    build isolation, so with the hatchling and hatch-fancy-pypi-readme at hand)."""
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--disable-pip-version-check",
            "--quiet",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = out.glob("corral-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.BytesParser().parsebytes(archive.read(name))


@pytest.fixture(scope="module")
def description(metadata: email.message.Message) -> str:
    assert metadata["Description-Content-Type"] == "text/markdown"
    body = metadata.get_payload()
    assert isinstance(body, str)
    return body


def test_description_has_no_relative_links(description: str) -> None:
    assert description.startswith("# corral\n")
    relative = [
        line for line in description.splitlines() if RELATIVE_LINK.search(line) or "](#" in line
    ]
    assert relative == []
    assert RELATIVE_DEFINITION.findall(description) == []
    # an HTML link or image, which the build does not rewrite, would need to be absolute
    assert re.findall(r"""(?:href|src)=["'](?!https?://)""", description) == []
    # the rewritten links point into the repository
    assert "](https://github.com/corral-py/corral/blob/main/CHANGELOG.md)" in description
    assert "](https://github.com/corral-py/corral/blob/main/README.md#examples)" in description


def test_description_names_the_supported_pythons(description: str) -> None:
    top = "\n".join(description.splitlines()[:15])
    assert "Python 3.11 or newer" in top
    for version in SUPPORTED_PYTHONS:
        assert version in top


def test_requires_python(metadata: email.message.Message) -> None:
    assert metadata["Requires-Python"] == ">=3.11"


def test_classifiers_list_the_supported_pythons(metadata: email.message.Message) -> None:
    prefix = "Programming Language :: Python :: "
    versions = {
        c.removeprefix(prefix)
        for c in metadata.get_all("Classifier", [])
        if c.startswith(prefix) and "." in c.removeprefix(prefix)
    }
    assert versions == SUPPORTED_PYTHONS


def test_version_is_the_changelogs_top_section(metadata: email.message.Message) -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    top = re.search(r"^## \[(\d+\.\d+\.\d+[^\]]*)\]", changelog, re.MULTILINE)
    assert top is not None
    assert metadata["Version"] == top[1]


def test_project_urls(metadata: email.message.Message) -> None:
    urls = dict(entry.split(", ", 1) for entry in metadata.get_all("Project-URL", []))
    assert set(urls) == {"Homepage", "Documentation", "Changelog", "Source", "Issues"}
    assert all(url.startswith("https://") for url in urls.values())


def test_dunder_version_is_the_packages(metadata: email.message.Message) -> None:
    """``corral.__version__`` is the version the package is built with."""
    import corral

    assert corral.__version__ == metadata["Version"]
