"""The kept mutation check (scripts/mutants.py): every listed one-line
mutant of a critical behaviour must be caught by the tests named for it.
Slow: it runs those tests once per mutant, on a temporary copy of the
checkout (never the working tree)."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "mutants.py")


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_no_mutant_survives(capsys):
    r = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=3500)
    with capsys.disabled():
        print("\n" + r.stdout.strip())
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-2000:]}"
