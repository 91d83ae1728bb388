"""Example: a test gives the code under test a throw-away copy-on-write view
of a fixture tree, then asserts on exactly what the code changed.

    pip install unionfs        # brings the pytest plugin (fixture union_mount)
    pytest examples/test_fixture_tree.py

Needs Linux with /dev/fuse (the test is skipped, with the reason, without).
"""

from pathlib import Path

import pytest


def clean_build(root: Path) -> None:
    """The code under test: drops the build cache, records a build stamp and
    switches the configuration to release."""
    for stale in (root / "cache").iterdir():
        stale.unlink()
    (root / "cache").rmdir()
    (root / "BUILD").write_text("42\n")
    ini = root / "config" / "app.ini"
    ini.write_text(ini.read_text().replace("debug = true", "debug = false"))


@pytest.fixture
def fixture_tree(tmp_path: Path) -> Path:
    """A tree several tests share; none of them may change it."""
    root = tmp_path / "tree"
    (root / "config").mkdir(parents=True)
    (root / "config" / "app.ini").write_text("debug = true\n")
    (root / "cache").mkdir()
    (root / "cache" / "objects.db").write_text("stale\n")
    return root


def test_clean_build_changes_only_what_it_should(union_mount, fixture_tree):
    m = union_mount([fixture_tree])          # a unionfs.Mount over the tree
    clean_build(Path(m.path))

    assert [str(change) for change in m.changes()] == [
        "A /BUILD",
        "D /cache",
        "C /config",
        "C /config/app.ini",
    ]
    assert (Path(m.path) / "config" / "app.ini").read_text() == "debug = false\n"
    # The fixture tree itself is untouched: every change went to the upper.
    assert (fixture_tree / "cache" / "objects.db").exists()
    assert (fixture_tree / "config" / "app.ini").read_text() == "debug = true\n"
