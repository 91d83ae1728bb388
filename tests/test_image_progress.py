"""Progress is drawn on a terminal only, never with -q; warnings always show."""

import io

from unionfs.image.progress import Progress


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_on_a_tty():
    out = FakeTTY()
    p = Progress(stream=out)
    p.phase("layer 1/2", total=2 << 20)
    p.advance(1 << 20)
    p.finish()
    text = out.getvalue()
    assert "layer 1/2" in text and "MiB" in text and text.endswith("\r\x1b[K")


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
