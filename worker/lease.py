"""Keeping a running job's lease alive, and hearing when to stop.

While a job runs, a small thread renews its lease so the sweep knows the
worker is alive. Each renewal also reports whether the user asked to cancel
the job, or whether the claim was taken away; the job checks that at its safe
points.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Self

import structlog
from sqlalchemy.exc import SQLAlchemyError

from models import jobs
from models.db import session_scope
from models.errors import first_line
from models.jobs import ClaimedJob
from models.settings import Settings

logger = structlog.get_logger(__name__)


class LeaseKeeper:
    """Renews a claim's lease every third of its length until stopped."""

    def __init__(self, claim: ClaimedJob, settings: Settings) -> None:
        self.claim = claim
        self.settings = settings
        #: "keep", "cancel" or "lost", as the last renewal found.
        self.state = "keep"
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{claim.job_id}", daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        interval_s = self.settings.lease_s / 3
        while not self._stop.wait(interval_s):
            self.renew()

    def renew(self) -> str:
        """Renew now; returns and remembers the state found."""
        try:
            with session_scope(self.settings) as session:
                self.state = jobs.renew_lease(
                    session, self.claim, self.settings.lease_s
                )
        except SQLAlchemyError as exc:
            # The lease may run out; the sweep then gives the job to another try.
            logger.warning("lease_renewal_failed", error=first_line(exc))
        return self.state
