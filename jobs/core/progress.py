"""Progress bars that suit where the output goes: tqdm's live bar on a terminal; in a log file or CI
(output is not a terminal) a plain line at most every LINE_EVERY_S seconds, not thousands of
carriage-return updates."""

import sys

from tqdm import tqdm

LINE_EVERY_S = 10.0


class _Lines(tqdm):
    """tqdm that prints each refresh as its own line."""

    def display(self, msg=None, pos=None):
        self.fp.write((msg or self.__str__()) + "\n")
        self.fp.flush()
        return True


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs), or the line-per-refresh form when stderr is not a terminal."""
    stream = kwargs.get("file") or sys.stderr
    if kwargs.get("disable") or getattr(stream, "isatty", lambda: False)():
        return tqdm(iterable, **kwargs)
    kwargs.setdefault("mininterval", LINE_EVERY_S)
    kwargs.setdefault("ascii", True)
    return _Lines(iterable, **kwargs)
