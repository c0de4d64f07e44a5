"""The pipeline's progress on stderr: pages done, regions read of those found so far."""

import sys

from tqdm import tqdm


class ProgressBar:
    """A `Reader`'s `progress` callback drawing one line on stderr."""

    def __init__(self):
        self.bar = tqdm(total=0, unit="region", file=sys.stderr, dynamic_ncols=True, leave=False)

    def __call__(self, pages: int, regions: int, seen: int):
        self.bar.total = seen
        self.bar.set_postfix_str(f"{pages} page{'s' if pages != 1 else ''} done", refresh=False)
        self.bar.n = regions
        self.bar.refresh()

    def write(self, line: str):
        self.bar.write(line, file=sys.stderr)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
