"""Progress off a terminal (a log file, CI, nohup): a line every CASC_PROGRESS_SECONDS (default 30)
with done/total, rate and time left, through tqdm's interface; and durations as people read them.
util.progress picks between this and a tqdm bar."""
import math
import os
import sys
import time


def _num(x: float, scale: bool) -> str:
    if not scale or abs(x) < 1000:
        return f'{x:,.0f}' if float(x).is_integer() or abs(x) >= 100 else f'{x:.1f}'
    for div, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if abs(x) >= div:
            return f'{x / div:.1f}{suffix}'


def duration(seconds: float) -> str:
    """'42 s', '3 min 05 s', '2 h 07 min'."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f'{seconds} s'
    if seconds < 3600:
        return f'{seconds // 60} min {seconds % 60:02d} s'
    return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'


class LogProgress:
    """tqdm's interface (iterate, update, set_postfix, close) for output that is not a terminal:
    every `interval` seconds one line 'desc: done/total unit (p%), rate unit/s, T left', and a last
    line with the total time when the loop took longer than one interval."""

    def __init__(self, iterable=None, total=None, desc='', unit='it', unit_scale=False, log=None,
                 interval=None):
        self.iterable, self.desc, self.unit, self.scale = iterable, desc, unit, unit_scale
        self.total = len(iterable) if total is None and hasattr(iterable, '__len__') else total
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.interval = interval if interval is not None else progress_seconds()
        self.n, self.postfix, self.lines, self.closed = 0, {}, 0, False
        self.t0 = self.last = time.monotonic()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        self.closed = True  # an error or Ctrl-C ended the loop: no 'done' line

    def set_postfix(self, **kw):
        self.postfix = kw

    def update(self, n: int = 1):
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now - self.t0, final=False)

    def close(self):
        if not self.closed and self.lines:
            self._line(time.monotonic() - self.t0, final=True)
        self.closed = True

    def _line(self, elapsed: float, final: bool):
        rate = self.n / max(elapsed, 1e-9)
        done = _num(self.n, self.scale)
        if self.total:
            done += f'/{_num(self.total, self.scale)} {self.unit} ({100 * self.n / self.total:.0f}%)'
        else:
            done += f' {self.unit}'
        parts = [f'{self.desc}: {done}', f'{_num(rate, self.scale)} {self.unit}/s']
        if final:
            parts.append(f'done in {duration(elapsed)}')
        elif self.total and rate > 0:
            parts.append(f'{duration((self.total - self.n) / rate)} left')
        parts += [f'{k} {v}' for k, v in self.postfix.items()]
        self.log(', '.join(parts))
        self.lines += 1


def progress_seconds() -> float:
    """Seconds between progress lines off a terminal: CASC_PROGRESS_SECONDS, default 30."""
    env = os.environ.get('CASC_PROGRESS_SECONDS', '30')
    try:
        seconds = float(env)
    except ValueError:
        seconds = math.nan
    if not seconds >= 0:
        raise ValueError(f'CASC_PROGRESS_SECONDS={env!r}: expected a number of seconds >= 0')
    return seconds
