"""ProgressWriter: the printer writes after the first iterations, at the period and when the interval has passed
since its last line; the other writers at the period only."""
from types import SimpleNamespace

from detectron2.utils.events import CommonMetricPrinter, EventWriter

from wsbcn_d2 import engine
from wsbcn_d2.engine import ProgressWriter


class Printer(CommonMetricPrinter):
    def __init__(self):
        super().__init__()
        self.iterations = []

    def write(self):
        self.iterations.append(self.trainer.iter)


class Writer(EventWriter):
    def __init__(self):
        self.iterations = []

    def write(self):
        self.iterations.append(self.trainer.iter)


def test_progress_lines_at_start_period_and_interval(monkeypatch):
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(engine.time, "perf_counter", lambda: clock.now)
    printer, writer = Printer(), Writer()
    hook = ProgressWriter([printer, writer], period=20, first=2, interval=60.0)
    hook.trainer = printer.trainer = writer.trainer = SimpleNamespace(iter=0, start_iter=10, max_iter=50)
    hook.before_train()
    for iteration in range(10, 50):
        hook.trainer.iter = iteration
        clock.now += 25.0  # a line every third iteration, unless one was just written
        hook.after_step()
    # first two, then by time (60 s = 3 iterations) and the period (19, 39) and the last iteration, restarting the clock
    assert printer.iterations == [10, 11, 14, 17, 19, 22, 25, 28, 31, 34, 37, 39, 42, 45, 48, 49]
    assert writer.iterations == [19, 39, 49]
