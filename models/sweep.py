"""The sweep: the safety net under at-least-once delivery.

It sends again the messages of jobs that stayed queued too long (the commit
succeeded and the send did not, or the broker lost the message), and gives
back or ends the running jobs whose worker stopped renewing its lease. The
row changes commit first; the messages go out after, so a sweep that dies
halfway leaves only work for the next sweep.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from models import jobs
from models.db import session_scope
from models.settings import Settings

logger = structlog.get_logger(__name__)

#: Sends one message per job id to a queue; returns the ids that went out.
SendJobs = Callable[[Sequence[int], str], list[int]]
#: Messages waiting in a broker queue (0 when the broker cannot say).
QueueDepth = Callable[[str], int]
#: Removes the files of one claim (job id, token) that ended without a document.
DiscardFiles = Callable[[int, int], None]


@dataclass(frozen=True)
class SweepReport:
    """Counts of what one sweep did."""

    #: Messages of waiting jobs the broker took again.
    resent: int
    requeued: int
    failed: int
    canceled: int
    #: Messages the broker did not take (it was unreachable); sent next time.
    unsent: int

    @property
    def total(self) -> int:
        return self.resent + self.requeued + self.failed + self.canceled


def run_sweep(
    settings: Settings,
    send: SendJobs,
    discard: DiscardFiles | None = None,
    queue_depth: QueueDepth | None = None,
) -> SweepReport:
    """One pass of the sweep; safe to run on several machines at once."""
    with session_scope(settings) as session:
        result = jobs.sweep(
            session,
            queued_after_s=settings.sweep_queued_after_s,
            unsent_after_s=settings.sweep_unsent_after_s,
            limit=settings.sweep_batch,
            queue_depth=queue_depth,
        )

    by_queue: dict[str, list[int]] = defaultdict(list)
    for job_id, queue in [*result.resend, *result.requeued]:
        by_queue[queue].append(job_id)
    unsent: list[int] = []
    for queue, job_ids in by_queue.items():
        sent = set(send(job_ids, queue))
        unsent.extend(job_id for job_id in job_ids if job_id not in sent)
    if unsent:
        # Not sent after all: the next sweep should try again soon, not after
        # the long wait meant for messages that did go out.
        with session_scope(settings) as session:
            jobs.clear_enqueued(session, unsent)
    if discard is not None:
        for job_id, token in [*result.failed, *result.canceled]:
            discard(job_id, token)

    not_sent = set(unsent)
    report = SweepReport(
        resent=sum(1 for job_id, _ in result.resend if job_id not in not_sent),
        requeued=len(result.requeued),
        failed=len(result.failed),
        canceled=len(result.canceled),
        unsent=len(unsent),
    )
    if report.total or unsent:
        logger.warning("sweep_finished", **report.__dict__)
    else:
        logger.debug("sweep_finished", **report.__dict__)
    return report
