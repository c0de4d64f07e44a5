"""A clean stop: on SIGTERM (or a first Ctrl-C) the server drains instead of closing its door.

At once `/health` answers 503 and every new API request a 503 with Retry-After in its dialect,
before any work is done for it; the requests already running finish, for up to `timeout` seconds;
those still running then are cut (a streamed reply ends with an error event, a whole one is a
503), the flushers run (the disk prompt cache's write-back goes there), and uvicorn is told to
exit, so the process ends with status 0. A second signal skips the wait (uvicorn's own shutdown).

All counting happens on the event loop: a request is either refused (draining already) or counted
before the drain looks at the count, so none slips between the two.
"""

import asyncio
import logging
import time

log = logging.getLogger("mlx_glm4v.server")

RETRY_AFTER = "5"  # seconds: about what a restarted server or a load balancer's next pick takes


class Drain:
    def __init__(self, timeout: float = 30.0):
        self.timeout = timeout
        self.draining = False
        self.active = 0  # API requests being served (a stream counts until its last byte)
        self.runs = set()  # the engine runs in flight, to cut at the deadline
        self.flushers = []  # callables run once no request is left, before the exit
        self.loop = None  # the server's event loop, set at start-up

    def begin(self, stop):
        """Start draining (from a signal handler): `stop()` is called once it is done."""
        if self.draining or self.loop is None:
            return False
        self.draining = True
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain(stop)))
        return True

    async def _drain(self, stop):
        log.info(
            "draining: %d request(s) running, up to %g s (--drain-timeout)",
            self.active,
            self.timeout,
        )
        deadline = time.monotonic() + self.timeout
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.active:
            log.warning("drain timeout: cutting %d request(s)", len(self.runs))
            for run in list(self.runs):
                run.cut()
            grace = time.monotonic() + 5
            while self.active and time.monotonic() < grace:
                await asyncio.sleep(0.05)
        for flush in self.flushers:
            try:
                await asyncio.to_thread(flush)
            except Exception:
                log.exception("a flush at shutdown failed")
        log.info("drained; exiting")
        stop()
