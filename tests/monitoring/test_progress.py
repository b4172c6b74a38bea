"""Console progress: plain lines for log files, a tqdm bar for terminals, nothing off rank 0."""

import io

from pretrain.progress import Progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_file_gets_periodic_plain_lines_with_eta():
    out = io.StringIO()
    progress = Progress(100, rank=0, start_step=50, line_every_s=0.0, stream=out)
    progress.update(51, loss=0.5, img_per_s=812.0)
    progress.update(52)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("train step 51/100 (51.0%) | loss 0.5 | img_per_s 812 | elapsed")
    assert "eta" in lines[0] and "\r" not in out.getvalue()
    assert "loss 0.5" in lines[1]  # the last known values stay on the line


def test_lines_are_rate_limited_but_the_last_step_is_always_written():
    out = io.StringIO()
    progress = Progress(10, rank=0, line_every_s=3600.0, stream=out)
    for step in range(1, 11):
        progress.update(step, loss=1.0)
    (line,) = out.getvalue().splitlines()
    assert line.startswith("train step 10/10 (100.0%)")


def test_terminal_gets_a_bar():
    out = Terminal()
    progress = Progress(10, rank=0, stream=out)
    progress.update(3, loss=0.25)
    progress.close()
    assert "3/10" in out.getvalue() and "loss=0.25" in out.getvalue()


def test_other_ranks_are_silent():
    out = Terminal()
    progress = Progress(10, rank=1, line_every_s=0.0, stream=out)
    progress.update(3, loss=0.25)
    progress.close()
    assert out.getvalue() == ""
