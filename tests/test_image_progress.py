"""Progress is drawn on a terminal only, never with -q; a finished transfer
leaves one plain line (not with -q); warnings always show."""

import io
import time

from unionfs.image.progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_tty():
    out = FakeTTY()
    p = Progress(stream=out)
    p.phase("layer 1/2", total=2 << 20)
    p.advance(1 << 20)
    task = p.task("Copying blob sha256:ab12", total=4 << 20)
    task.advance(3 << 20)
    time.sleep(0.3)                     # the bars redraw a few times a second
    task.done("done")
    p.finish()
    text = out.getvalue()
    assert "layer 1/2" in text and "1.0/2.0 MiB" in text and "3.0/4.0 MiB" in text
    assert "Copying blob sha256:ab12: done\n" in text


def test_quiet_and_not_a_tty_draw_nothing_but_warn():
    for out, quiet in ((FakeTTY(), True), (io.StringIO(), False)):
        p = Progress(quiet=quiet, stream=out)
        p.phase("layer", total=10)
        p.advance(5)
        p.tick()
        p.finish()
        assert out.getvalue() == ""
        p.warn("device nodes need root")
        assert out.getvalue() == "unionfs: warning: device nodes need root\n"


def test_a_finished_transfer_is_one_plain_line_off_a_terminal():
    out = io.StringIO()
    p = Progress(stream=out)
    task = p.task("Copying blob sha256:ab12", total=10)
    task.advance(10)
    task.done("done (10 B)")
    p.finish()
    assert out.getvalue() == "Copying blob sha256:ab12: done (10 B)\n"
    out = io.StringIO()
    p = Progress(quiet=True, stream=out)
    p.task("Copying blob", total=10).done("done")
    assert out.getvalue() == ""
