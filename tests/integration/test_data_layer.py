"""Schema rules and producer behaviour on PostgreSQL."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError, OperationalError

from models import accounts, jobs
from models.db import get_engine, session_scope
from models.errors import (
    AuthenticationError,
    Conflict,
    InvalidInput,
    InvalidValue,
    NotFound,
    TemplateError,
    TemplateNotFound,
)
from models.settings import Settings
from models.tables import Template, TemplateTag
from models.templates import TemplateSpec, register_template
from producer.client import JobClient, JobRequest
from producer.samples import sample_input
from tests.services import Account, fetch_one

pytestmark = pytest.mark.integration


@pytest.fixture
def client(idle_client: JobClient) -> JobClient:
    """Jobs stay where the test puts them: no worker consumes their queue."""
    return idle_client


def _job_count(settings: Settings) -> int:
    return int(fetch_one(settings, "SELECT count(*) FROM jobs")[0])


def test_submit_commits_a_queued_job_with_its_creation_time(
    client: JobClient, clean_db: Settings
) -> None:
    """The row is queued, timestamped by the database, and marked as sent."""
    job_id = client.submit("user-stories", sample_input("user-stories"))

    status, created_at, enqueued_at, started_at = fetch_one(
        clean_db,
        "SELECT status, created_at, enqueued_at, started_at FROM jobs"
        " WHERE job_id = :j",
        j=job_id,
    )
    assert status == "queued"
    assert created_at.tzinfo is not None
    assert enqueued_at >= created_at
    assert started_at is None
    assert [e.event for e in client.logs(job_id)] == ["submitted"]


def test_unknown_template_is_refused_and_nothing_is_inserted(
    client: JobClient, clean_db: Settings
) -> None:
    """Submitting to a template that does not exist names it and inserts nothing."""
    with pytest.raises(TemplateNotFound, match="unknown template 'nope'"):
        client.submit("nope", {"a": 1})
    assert _job_count(clean_db) == 0


def test_one_bad_request_refuses_the_whole_batch_naming_it(
    client: JobClient, clean_db: Settings
) -> None:
    """A batch with a bad line is refused whole, and the error names the line."""
    good = JobRequest("user-stories", sample_input("user-stories"))
    with pytest.raises(
        InvalidInput, match=r"request 3: job input must be a JSON object"
    ):
        client.submit_many([good, good, JobRequest("user-stories", [1, 2])])
    assert _job_count(clean_db) == 0


@pytest.mark.parametrize(
    "mangle",
    [
        lambda key: key + "x",
        lambda key: "adpa_deadbeef_" + key.split("_", 2)[2],
        lambda key: key.replace("adpa_", "", 1),
    ],
    ids=["wrong-secret", "unknown-prefix", "malformed"],
)
def test_a_bad_api_key_is_refused_and_nothing_is_inserted(
    clean_db: Settings,
    make_account: Callable[..., Account],
    samples: list[str],
    mangle: Callable[[str], str],
) -> None:
    """Unknown or malformed keys cannot submit."""
    key = mangle(make_account().api_key)
    with JobClient(key, clean_db) as client, pytest.raises(AuthenticationError):
        client.submit("user-stories", sample_input("user-stories"))
    assert _job_count(clean_db) == 0


def test_a_revoked_key_is_refused_naming_the_key(
    clean_db: Settings, make_account: Callable[..., Account], samples: list[str]
) -> None:
    """After revocation a key cannot submit, and the error says it was revoked."""
    key = make_account().api_key
    prefix = key.split("_")[1]
    with session_scope(clean_db) as session:
        accounts.revoke_api_key(session, prefix)

    with (
        JobClient(key, clean_db) as client,
        pytest.raises(AuthenticationError, match=f"API key {prefix} was revoked"),
    ):
        client.submit("user-stories", sample_input("user-stories"))
    assert _job_count(clean_db) == 0


def test_keys_and_passwords_are_stored_only_as_digests(
    clean_db: Settings, make_account: Callable[..., Account]
) -> None:
    """Neither the API key nor the password appears in the database."""
    account = make_account("ada")
    digest, prefix = fetch_one(clean_db, "SELECT key_digest, prefix FROM api_keys")
    password_hash = fetch_one(clean_db, "SELECT password_hash FROM users")[0]

    assert account.api_key not in digest and len(digest) == 64
    assert account.api_key.startswith(f"adpa_{prefix}_")
    assert password_hash.startswith("$argon2id$")
    assert accounts.verify_password(password_hash, "password-ada")
    assert not accounts.verify_password(password_hash, "password-bob")


def test_an_idempotency_key_returns_the_first_job(client: JobClient) -> None:
    """Submitting twice with one key makes one job."""
    data = sample_input("user-stories")
    first = client.submit("user-stories", data, idempotency_key="batch-7/line-1")
    second = client.submit("user-stories", data, idempotency_key="batch-7/line-1")
    third = client.submit("user-stories", data, idempotency_key="batch-7/line-2")

    assert first == second != third


def test_template_tags_and_tag_rows_always_agree(clean_db: Settings) -> None:
    """Registering and re-registering a template keeps both tag stores equal."""
    for tags in (["Risk", "audit", "risk"], ["audit", "finance"], []):
        with session_scope(clean_db) as session:
            register_template(session, TemplateSpec("t", "{{ x }}", tags=tags))
        with session_scope(clean_db) as session:
            template = session.scalar(select(Template).where(Template.name == "t"))
            assert template is not None
            rows = session.scalars(
                select(TemplateTag.tag).where(
                    TemplateTag.template_id == template.template_id
                )
            ).all()
            assert template.tags == sorted(rows) == sorted({t.lower() for t in tags})


def test_status_outside_the_lifecycle_is_refused(
    client: JobClient, clean_db: Settings
) -> None:
    """The CHECK constraint keeps jobs.status to the five lifecycle states."""
    job_id = client.submit("user-stories", sample_input("user-stories"))
    with (
        pytest.raises(IntegrityError, match="ck_jobs_status"),
        session_scope(clean_db) as session,
    ):
        session.execute(
            text("UPDATE jobs SET status = 'done' WHERE job_id = :j"), {"j": job_id}
        )


def test_a_job_cannot_hold_the_same_file_twice(
    client: JobClient, clean_db: Settings
) -> None:
    """documents is unique per (job, file name)."""
    job_id = client.submit("user-stories", sample_input("user-stories"))
    insert = text(
        "INSERT INTO documents (job_id, file_name, file_path, file_size, sha256) "
        "VALUES (:j, 'a.md', :p, 1, 'x')"
    )
    with session_scope(clean_db) as session:
        session.execute(insert, {"j": job_id, "p": "1/a.md"})
    with (
        pytest.raises(IntegrityError, match="uq_documents_job_id_file_name"),
        session_scope(clean_db) as session,
    ):
        session.execute(insert, {"j": job_id, "p": "2/a.md"})


def test_deleting_a_job_removes_its_logs_and_documents_and_nothing_else(
    client: JobClient, clean_db: Settings
) -> None:
    """Pruning a job cascades to its own rows only."""
    kept = client.submit("user-stories", sample_input("user-stories"))
    pruned = client.submit("user-stories", sample_input("user-stories"))
    with session_scope(clean_db) as session:
        for job_id in (kept, pruned):
            session.execute(
                text(
                    "INSERT INTO documents (job_id, file_name, file_path, file_size,"
                    " sha256) VALUES (:j, 'a.md', :p, 1, 'x')"
                ),
                {"j": job_id, "p": f"{job_id}/a.md"},
            )
        session.execute(text("DELETE FROM jobs WHERE job_id = :j"), {"j": pruned})

    counts = fetch_one(
        clean_db,
        "SELECT (SELECT count(*) FROM jobs), (SELECT count(*) FROM documents),"
        " (SELECT count(*) FROM job_logs WHERE job_id = :p),"
        " (SELECT count(*) FROM job_logs WHERE job_id = :k),"
        " (SELECT count(*) FROM users), (SELECT count(*) FROM templates)",
        p=pruned,
        k=kept,
    )
    assert tuple(counts) == (1, 1, 0, 1, 1, 6)


def test_an_idempotency_key_reused_for_other_work_is_a_conflict(
    client: JobClient, clean_db: Settings
) -> None:
    """Same key, different template or input: refused, naming the first job."""
    data = sample_input("user-stories")
    first = client.submit("user-stories", data, idempotency_key="k-1")

    with pytest.raises(Conflict, match=f"'k-1' was used for job {first}"):
        client.submit(
            "user-stories", {**data, "epic": "Another"}, idempotency_key="k-1"
        )
    with pytest.raises(Conflict, match=f"'k-1' was used for job {first}"):
        client.submit(
            "risk-register", sample_input("risk-register"), idempotency_key="k-1"
        )
    assert _job_count(clean_db) == 1


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"epic": "a\x00b"}, None, "contains a NUL character"),
        ({"epic\x00": 1}, None, "contains a NUL character"),
        ({"epic": "\ud800"}, None, "not valid Unicode"),
        ({"epic": "x"}, "k" * 256, "idempotency key must have 1 to 255"),
        ({"epic": "x"}, "   ", "not all blank"),
    ],
    ids=["nul-in-value", "nul-in-key", "lone-surrogate", "long-key", "blank-key"],
)
def test_input_postgres_cannot_store_is_refused_before_the_insert(
    client: JobClient,
    clean_db: Settings,
    data: dict[str, object],
    key: str | None,
    expected: str,
) -> None:
    """What PostgreSQL would reject is refused with a clear error, nothing inserted."""
    with pytest.raises(InvalidInput, match=expected):
        client.submit("user-stories", data, idempotency_key=key)
    assert _job_count(clean_db) == 0


def test_a_template_postgres_cannot_store_is_refused(clean_db: Settings) -> None:
    """A NUL in a template's text is refused at registration, by name."""
    with (
        pytest.raises(TemplateError, match="'nul' contains a NUL character"),
        session_scope(clean_db) as session,
    ):
        register_template(session, TemplateSpec("nul", "a\x00b"))


def test_a_new_pool_process_leaves_the_parents_connections_open(
    pg_settings: Settings,
) -> None:
    """The hook a forked pool process runs must not end its parent's sessions.

    The worker's main process keeps a pooled connection to settle jobs whose
    process died; a child that closed its inherited copy would end it.
    """
    from worker.app import _after_fork

    engine = get_engine(pg_settings)
    with engine.connect() as connection:
        before = connection.execute(text("SELECT pg_backend_pid()")).scalar()

    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        try:
            _after_fork()
        finally:
            os._exit(0)
    os.waitpid(child, 0)

    with engine.connect() as connection:
        after = connection.execute(text("SELECT pg_backend_pid()")).scalar()
    assert after == before


def test_a_submit_whose_send_cannot_be_recorded_still_returns_its_job(
    client: JobClient, clean_db: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The job is committed and sent: a failed bookkeeping write is no refusal.

    A caller told "failed" would submit again and get the work done twice.
    """

    def database_gone(*_args: object, **_kwargs: object) -> None:
        raise OperationalError("UPDATE jobs ...", {}, Exception("server closed"))

    monkeypatch.setattr(jobs, "mark_enqueued", database_gone)

    job_id = client.submit("user-stories", sample_input("user-stories"))

    status, enqueued_at = fetch_one(
        clean_db, "SELECT status, enqueued_at FROM jobs WHERE job_id = :j", j=job_id
    )
    assert (status, enqueued_at) == ("queued", None)
    assert _job_count(clean_db) == 1


def test_times_read_back_in_utc_whatever_the_session_time_zone(
    client: JobClient, clean_db: Settings
) -> None:
    """A server or client set to another zone changes neither instant nor zone."""
    job_id = client.submit("user-stories", sample_input("user-stories"))
    tokyo = clean_db.model_copy(
        update={
            "database_url": clean_db.database_url
            + "?options=-c%20timezone%3DAsia/Tokyo"
        }
    )
    with session_scope(tokyo) as session:
        zone = session.execute(text("SHOW timezone")).scalar_one()
        job = jobs.get_job(session, job_id)
        assert job is not None
        created_in_tokyo = job.created_at

    assert zone == "Asia/Tokyo"
    assert created_in_tokyo.utcoffset() == timedelta(0)
    assert created_in_tokyo == client.get(job_id).created_at
    assert created_in_tokyo.isoformat() == client.get(job_id).created_at.isoformat()


def test_racing_submissions_with_one_idempotency_key_all_get_the_first_job(
    clean_db: Settings, make_account: Callable[..., Account], samples: list[str]
) -> None:
    """Submissions that miss each other's insert still agree on one job."""
    api_key = make_account().api_key
    data = sample_input("user-stories")
    start = threading.Barrier(8)

    def submit() -> int:
        with JobClient(api_key, clean_db) as racer:
            start.wait()
            return racer.submit("user-stories", data, idempotency_key="nightly-7")

    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = list(pool.map(lambda _: submit(), range(8)))

    assert len(set(ids)) == 1
    assert _job_count(clean_db) == 1


def test_a_repeat_with_the_same_input_in_other_python_types_is_no_conflict(
    client: JobClient,
) -> None:
    """Input is compared as JSON: a tuple is the list stored, a number key its text."""
    data = {"stories": ("a", "b"), "points": {1: 3}}

    first = client.submit("user-stories", data, idempotency_key="k-types")
    again = client.submit("user-stories", data, idempotency_key="k-types")
    as_stored = client.submit(
        "user-stories",
        {"stories": ["a", "b"], "points": {"1": 3}},
        idempotency_key="k-types",
    )

    assert again == as_stored == first


@pytest.mark.parametrize(
    ("call", "words"),
    [
        (lambda c: c.get("1"), "a job id is a positive integer"),
        (lambda c: c.get(10**12), "no job 1000000000000"),
        (lambda c: c.logs(0), "no job 0"),
        (lambda c: c.cancel(True), "a job id is a positive integer"),
        (lambda c: c.retry(-3), "no job -3"),
        (
            lambda c: c.submit("user-stories", {}, not_before=datetime(2030, 1, 1)),
            "not_before must be a timezone-aware datetime",
        ),
        (
            lambda c: c.submit("user-stories", {}, idempotency_key=5),
            "an idempotency key must be text, not int",
        ),
        (
            lambda c: c.submit("user-\x00stories", {}),
            "the template name contains a NUL character",
        ),
        (
            lambda c: c.submit("user-stories", {}, queue="nobody-listens"),
            "unknown queue 'nobody-listens'",
        ),
        (
            lambda c: c.submit_many([{"template": "user-stories"}]),
            "request 1: expected a JobRequest, not dict",
        ),
        (lambda c: c.submit_many(None), "an iterable of JobRequest, not NoneType"),
        (lambda c: c.wait(1, timeout_s=float("nan")), "timeout_s must be a finite"),
        (lambda c: c.wait(1, poll_s=-1), "poll_s must be a finite"),
        (lambda c: c.wait(1, timeout_s="5"), "timeout_s must be a finite"),
    ],
    ids=[
        "id-as-text",
        "id-past-the-key",
        "id-zero",
        "id-bool",
        "id-negative",
        "naive-not-before",
        "key-not-text",
        "nul-in-template-name",
        "unknown-queue",
        "request-not-a-job-request",
        "requests-none",
        "wait-nan",
        "wait-negative-poll",
        "wait-text",
    ],
)
def test_bad_library_arguments_are_named_and_insert_nothing(
    client: JobClient, clean_db: Settings, call: Callable[[JobClient], Any], words: str
) -> None:
    """Each bad argument is an error of ours naming it, never a database error."""
    with pytest.raises((InvalidInput, NotFound)) as caught:
        call(client)

    assert words in str(caught.value)
    assert _job_count(clean_db) == 0


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (TemplateSpec(" ", "x"), "a template name must have 1 to 255 characters"),
        (TemplateSpec("t" * 256, "x"), "a template name must have 1 to 255"),
        (TemplateSpec("t", "x", category="c" * 256), "a category must have 1 to 255"),
        (TemplateSpec("t", "x", tags=["ok", "g" * 256]), "must have 1 to 255"),
        (TemplateSpec("t", "x", description="a\x00b"), "description contains a NUL"),
        (TemplateSpec("t\x00", "x"), "a template name contains a NUL"),
        (TemplateSpec("t", "x" * (2**20 + 1)), "the limit is 1048576"),
    ],
    ids=[
        "blank-name",
        "long-name",
        "long-category",
        "long-tag",
        "nul-desc",
        "nul",
        "huge-content",
    ],
)
def test_template_fields_the_columns_cannot_hold_are_named(
    clean_db: Settings, spec: TemplateSpec, words: str
) -> None:
    """A field too long, blank or unstorable is refused by name, not by the database."""
    with pytest.raises(TemplateError) as caught, session_scope(clean_db) as session:
        register_template(session, spec)

    assert words in str(caught.value)
    with session_scope(clean_db) as session:
        assert session.scalar(select(func.count()).select_from(Template)) == 0


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (
            lambda s: accounts.create_user(s, "ann", "a" * 250 + "@b.com", "password1"),
            "is not an email address",
        ),
        (
            lambda s: accounts.issue_api_key(
                s, accounts.create_user(s, "bob", "b@c.de", "password1"), "n" * 256
            ),
            "a key name must have 1 to 255 characters",
        ),
        (
            lambda s: accounts.issue_api_key(
                s, accounts.create_user(s, "cy", "c@d.de", "password1"), "a\x00"
            ),
            "the key name contains a NUL",
        ),
    ],
    ids=["long-email", "long-key-name", "nul-key-name"],
)
def test_account_fields_the_columns_cannot_hold_are_named(
    clean_db: Settings, make: Callable[[Any], Any], words: str
) -> None:
    """Account fields are checked before the insert, with the field named."""
    with pytest.raises(InvalidValue) as caught, session_scope(clean_db) as session:
        make(session)

    assert words in str(caught.value)


@pytest.mark.parametrize(
    "api_key", [None, 5, "adpa_1a2b3c4d_x\x00y", "adpa_1a2b3c4d_\udcff"]
)
def test_an_api_key_of_the_wrong_kind_is_malformed_not_a_crash(
    clean_db: Settings, samples: list[str], api_key: Any
) -> None:
    """Keys that are not text, or hold what text cannot, fail authentication."""
    with JobClient(api_key, clean_db) as client, pytest.raises(AuthenticationError):
        client.submit("user-stories", sample_input("user-stories"))

    assert _job_count(clean_db) == 0
