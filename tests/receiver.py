"""The listener in the test process: its handlers' effects can be watched or faults injected."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from sqlalchemy.engine import Engine

from dicomai.config import Settings
from dicomai.net.listener import Receiver
from dicomai.store import make_sessionmaker
from dicomai.store.spool import Spool


@contextlib.contextmanager
def serving(settings: Settings, engine: Engine, spool: Spool | None = None) -> Iterator[Receiver]:
    """A :class:`Receiver` listening on ``settings.node.port`` until the block ends."""
    if spool is None:
        spool = Spool(settings.node.data_dir)
    spool.prepare()
    receiver = Receiver(settings, spool, make_sessionmaker(engine))
    ae = receiver.build_ae()
    ae.start_server(("127.0.0.1", settings.node.port), block=False, evt_handlers=receiver.handlers())
    try:
        yield receiver
    finally:
        deadline = time.monotonic() + 5  # let refused associations see their peers go
        while ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        ae.shutdown()
        engine.dispose()
