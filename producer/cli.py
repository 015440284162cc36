"""``adpa``: the command line for people and batch scripts."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, BinaryIO, Concatenate, ParamSpec, TextIO, TypeVar

import click
from alembic.util import CommandError as AlembicCommandError
from rich.console import Console
from rich.table import Table
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from models import accounts, jobs, migrate
from models.db import session_scope
from models.errors import (
    AdpaError,
    InvalidInput,
    NotFound,
    SettingsError,
    first_line,
)
from models.logs import configure_logging
from models.settings import ENV_PREFIX, TEST_PREFIX, Settings, load_settings
from models.tables import Job, JobStatus, Template
from models.templates import (
    MAX_TEMPLATE_CHARS,
    TemplateSpec,
    list_templates,
    register_template,
)
from producer.broker import (
    celery_command,
    create_sender,
    enqueue,
    sweep_through,
    worker_command,
)
from producer.client import JobClient
from producer.samples import load_samples

console = Console()
errors = Console(stderr=True)


P = ParamSpec("P")
R = TypeVar("R")


def _settings(ctx: click.Context) -> Settings:
    settings: Settings = ctx.obj
    return settings


def _checked_settings(ctx: click.Context) -> Settings:
    """The settings, once the database schema is known to be the code's."""
    settings = _settings(ctx)
    migrate.require_current(settings)
    return settings


def _settings_passer(
    *, check_schema: bool
) -> Callable[[Callable[Concatenate[Settings, P], R]], Callable[P, R]]:
    def decorator(command: Callable[Concatenate[Settings, P], R]) -> Callable[P, R]:
        def with_settings(*args: P.args, **kwargs: P.kwargs) -> R:
            ctx = click.get_current_context()
            settings = _checked_settings(ctx) if check_schema else _settings(ctx)
            return ctx.invoke(command, settings, *args, **kwargs)

        return functools.update_wrapper(with_settings, command)

    return decorator


#: Passes the settings to a command that reads or writes tables, after checking
#: the schema. The check runs when the command runs, after its arguments are
#: parsed, so --help and usage errors need no database.
pass_settings = _settings_passer(check_schema=True)
#: Passes the settings to a command that works without the tables.
pass_settings_unchecked = _settings_passer(check_schema=False)


class FiniteFloatRange(click.FloatRange):
    """A float range that also refuses nan and the infinities.

    click's range check lets nan through (it compares as in range), and an
    infinite number of seconds is never meant.
    """

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


#: Job ids are PostgreSQL integers.
JOB_ID = click.IntRange(1, 2**31 - 1)
#: Durations given on the command line.
SECONDS = FiniteFloatRange(min=0)
#: For commands that hand their extra arguments to celery.
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


@click.group()
@click.version_option(package_name="adpa-jobs")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Turn templates into documents, asynchronously.

    Settings come from ADPA_* environment variables or a .env file; with none,
    everything runs on an embedded default under ./.adpa (SQLite and a
    filesystem broker).
    """
    settings = load_settings()
    configure_logging(settings)
    ctx.obj = settings


# -- database -------------------------------------------------------------


@cli.group()
def db() -> None:
    """Database schema migrations."""


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_settings_unchecked
def db_upgrade(settings: Settings, revision: str) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    migrate.upgrade(settings, revision)
    console.print(f"database at revision {migrate.current_revision(settings)}")


@db.command("downgrade")
@click.argument("revision")
@pass_settings_unchecked
def db_downgrade(settings: Settings, revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes every table)."""
    migrate.downgrade(settings, revision)
    console.print(f"database at revision {migrate.current_revision(settings)}")


@db.command("current")
@pass_settings_unchecked
def db_current(settings: Settings) -> None:
    """Print the database's revision."""
    console.print(migrate.current_revision(settings) or "empty (no migrations applied)")


# -- users and keys -------------------------------------------------------


@cli.group()
def users() -> None:
    """Users who submit jobs."""


@users.command("create")
@click.argument("username")
@click.option("--email", required=True)
@click.option("--password", help="Asked for when not given.")
@click.option("--role", type=click.Choice(["user", "admin"]), default="user")
@pass_settings
def users_create(
    settings: Settings, username: str, email: str, password: str | None, role: str
) -> None:
    """Create a user."""
    if password is None:
        # Asked here, after the schema check, not while the arguments are parsed.
        password = click.prompt(
            "Password", hide_input=True, confirmation_prompt=True, type=str
        )
    with session_scope(settings) as session:
        user = accounts.create_user(session, username, email, password, role=role)
        console.print(f"created user {user.username} (id {user.user_id})")


@cli.group()
def keys() -> None:
    """API keys: issue, list, revoke."""


@keys.command("create")
@click.argument("username")
@click.option("--name", help="What the key is for.")
@pass_settings
def keys_create(settings: Settings, username: str, name: str | None) -> None:
    """Issue a key for USERNAME; it is printed once and never stored."""
    with session_scope(settings) as session:
        issued = accounts.issue_api_key(
            session, accounts.get_user(session, username), name
        )
    errors.print(
        f"API key {issued.prefix} for {username}; store it now, it is not kept:"
    )
    click.echo(issued.secret)


@keys.command("list")
@click.argument("username")
@pass_settings
def keys_list(settings: Settings, username: str) -> None:
    """List a user's keys by prefix."""
    table = Table("prefix", "name", "created", "revoked")
    with session_scope(settings) as session:
        for key in accounts.list_api_keys(
            session, accounts.get_user(session, username)
        ):
            table.add_row(
                key.prefix, key.name or "", _when(key.created_at), _when(key.revoked_at)
            )
    console.print(table)


@keys.command("revoke")
@click.argument("prefix")
@pass_settings
def keys_revoke(settings: Settings, prefix: str) -> None:
    """Revoke the key with PREFIX; submissions with it are refused from now on."""
    with session_scope(settings) as session:
        accounts.revoke_api_key(session, prefix)
    console.print(f"revoked API key {prefix}")


# -- templates ------------------------------------------------------------


@cli.group()
def templates() -> None:
    """Templates: register, list, load the samples."""


@templates.command("load-samples")
@pass_settings
def templates_load_samples(settings: Settings) -> None:
    """Register the sample templates shipped with adpa."""
    with session_scope(settings) as session:
        names = load_samples(session)
    console.print(f"registered {len(names)} sample templates: {', '.join(names)}")


@templates.command("add")
@click.argument("name")
@click.argument("source", type=click.File("r", encoding="utf-8"))
@click.option("--description")
@click.option("--category")
@click.option("--tag", "tags", multiple=True, help="Repeat for several tags.")
@pass_settings
def templates_add(
    settings: Settings,
    name: str,
    source: TextIO,
    description: str | None,
    category: str | None,
    tags: tuple[str, ...],
) -> None:
    """Register (or replace) template NAME from SOURCE (a file, or - for stdin)."""
    content = _read_text(source, MAX_TEMPLATE_CHARS)
    spec = TemplateSpec(name, content, description, category, tags)
    with session_scope(settings) as session:
        template = register_template(session, spec)
        variables = ", ".join(template.variables) or "none"
    console.print(f"registered {name}; variables: {variables}")


@templates.command("list")
@pass_settings
def templates_list(settings: Settings) -> None:
    """List the registered templates."""
    table = Table("name", "category", "tags", "variables")
    with session_scope(settings) as session:
        for t in list_templates(session):
            table.add_row(
                t.name, t.category or "", ", ".join(t.tags), str(len(t.variables))
            )
    console.print(table)


# -- jobs -----------------------------------------------------------------


def _api_key(settings: Settings, given: str | None) -> str:
    if given:
        return given
    if settings.api_key is not None:
        return settings.api_key.get_secret_value()
    raise click.UsageError("no API key: pass --api-key or set ADPA_API_KEY")


def _source_name(source: TextIO | BinaryIO) -> str:
    return str(getattr(source, "name", "input"))


def _read_input(source: BinaryIO | TextIO, max_bytes: int | None = None) -> Any:
    """The JSON value in ``source``.

    With ``max_bytes`` (as the CLI reads --input), nothing is read past one byte
    over the limit, so a huge file is refused without being loaded.
    """
    name = _source_name(source)
    try:
        data = source.read() if max_bytes is None else source.read(max_bytes + 1)
        if max_bytes is not None and len(data) > max_bytes:
            raise InvalidInput(
                f"{name} is larger than {max_bytes} bytes, the input limit "
                "(ADPA_MAX_INPUT_BYTES)"
            )
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as exc:
        raise _not_utf8(name, exc) from None
    try:
        return json.loads(
            text,
            parse_int=_json_integer,
            parse_float=_json_float,
            parse_constant=_json_constant,
        )
    except json.JSONDecodeError as exc:
        where = f"line {exc.lineno} column {exc.colno}"
        raise InvalidInput(f"{name} is not valid JSON: {exc.msg} at {where}") from None
    except ValueError as exc:
        raise InvalidInput(f"{name} is not valid JSON: {first_line(exc)}") from None
    except RecursionError:
        raise InvalidInput(f"{name} is nested too deeply") from None


def _not_utf8(name: str, exc: UnicodeDecodeError) -> InvalidInput:
    return InvalidInput(
        f"{name} is not UTF-8 text (byte {exc.start} cannot be decoded)"
    )


def _json_integer(text: str) -> int:
    limit = sys.get_int_max_str_digits()
    digits = len(text.lstrip("-"))
    if limit and digits > limit:
        raise ValueError(f"an integer has {digits} digits; at most {limit} are allowed")
    return int(text)


def _json_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        shown = text if len(text) <= 24 else f"{text[:20]}..."
        raise ValueError(f"the number {shown} is too large")
    return number


def _json_constant(text: str) -> Any:
    raise ValueError(f"{text} is not a JSON value")


def _read_text(source: TextIO, max_chars: int) -> str:
    """Text from ``source``, reading no more than one character past the limit."""
    try:
        text = source.read(max_chars + 1)
    except UnicodeDecodeError as exc:
        raise _not_utf8(_source_name(source), exc) from None
    if len(text) > max_chars:
        raise InvalidInput(
            f"{_source_name(source)} is longer than {max_chars} characters"
        )
    return text


@cli.command()
@click.option("--template", "-t", "template_name", required=True, help="Template name.")
@click.option(
    "--input",
    "-i",
    "source",
    type=click.File("rb"),
    required=True,
    help="JSON object file, or - for standard input.",
)
@click.option("--api-key", help="Defaults to ADPA_API_KEY.")
@click.option(
    "--idempotency-key", help="Submitting twice with it returns the first job."
)
@click.option(
    "--wait",
    "wait_s",
    type=SECONDS,
    default=None,
    metavar="SECONDS",
    help="Wait up to SECONDS for the job to finish.",
)
@pass_settings
def submit(
    settings: Settings,
    template_name: str,
    source: BinaryIO,
    api_key: str | None,
    idempotency_key: str | None,
    wait_s: float | None,
) -> None:
    """Submit one job and print its id."""
    input_data = _read_input(source, settings.max_input_bytes)
    with JobClient(_api_key(settings, api_key), settings) as client:
        job_id = client.submit(
            template_name, input_data, idempotency_key=idempotency_key
        )
        click.echo(job_id)
        if wait_s is not None:
            view = client.wait(job_id, timeout_s=wait_s)
            errors.print(
                f"job {job_id} {view.status}: "
                f"{(view.output_data or {}).get('file_path') or view.last_error}"
            )
            if view.status != JobStatus.SUCCEEDED:
                sys.exit(1)


@cli.group("jobs")
def jobs_group() -> None:
    """Inspect jobs."""


@jobs_group.command("list")
@click.option("--status", type=click.Choice([s.value for s in JobStatus]))
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@pass_settings
def jobs_list(settings: Settings, status: str | None, limit: int) -> None:
    """List the newest jobs."""
    query = (
        select(Job, Template.name)
        .join(Template, Template.template_id == Job.template_id)
        .order_by(Job.job_id.desc())
        .limit(limit)
    )
    if status:
        query = query.where(Job.status == status)
    table = Table(
        "job",
        "template",
        "status",
        "attempts",
        "created",
        "duration",
        "document or error",
    )
    with session_scope(settings) as session:
        for job, name in session.execute(query):
            table.add_row(
                str(job.job_id),
                name,
                _styled(job.status),
                str(job.attempts),
                _when(job.created_at),
                _duration(job),
                _result(job),
            )
        counts = dict(
            session.execute(select(Job.status, func.count()).group_by(Job.status)).all()
        )
    console.print(table)
    console.print(
        ", ".join(f"{s}: {n}" for s, n in sorted(counts.items())) or "no jobs"
    )


@jobs_group.command("show")
@click.argument("job_id", type=JOB_ID)
@pass_settings
def jobs_show(settings: Settings, job_id: int) -> None:
    """Show one job: state, timestamps, documents and every log line."""
    with session_scope(settings) as session:
        job = jobs.get_job(session, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        summary = Table.grid(padding=(0, 2))
        for label, value in (
            ("job", str(job.job_id)),
            ("template", job.template.name),
            ("user", job.user.username),
            ("status", _styled(job.status)),
            ("queue", job.queue),
            ("attempts", f"{job.attempts} of {job.max_attempts}"),
            ("created", _when(job.created_at)),
            ("started", _when(job.started_at)),
            ("finished", _when(job.finished_at)),
            ("updated", _when(job.updated_at)),
            (
                "error",
                f"[{job.last_error_kind}] {job.last_error}" if job.last_error else "",
            ),
        ):
            summary.add_row(f"[bold]{label}[/]", value)
        console.print(summary)

        documents = Table("document", "path", "bytes", "sha256", title="documents")
        for d in jobs.job_documents(session, job_id):
            documents.add_row(
                str(d.document_id), d.file_path, str(d.file_size), d.sha256[:16]
            )
        console.print(documents)

        logs = Table("time", "level", "event", "attempt", "message", title="log")
        for entry in jobs.job_logs(session, job_id):
            logs.add_row(
                _when(entry.timestamp),
                entry.log_level,
                entry.event,
                str(entry.attempt),
                entry.message,
            )
        console.print(logs)


@jobs_group.command("cancel")
@click.argument("job_id", type=JOB_ID)
@pass_settings
def jobs_cancel(settings: Settings, job_id: int) -> None:
    """Cancel a job: a queued one at once, a running one at its next safe point."""
    with session_scope(settings) as session:
        status = jobs.request_cancel(session, job_id)
    if status == JobStatus.CANCELED:
        console.print(f"job {job_id} canceled")
    else:
        console.print(f"job {job_id} is running; it stops at its next safe point")


@jobs_group.command("retry")
@click.argument("job_id", type=JOB_ID)
@pass_settings
def jobs_retry(settings: Settings, job_id: int) -> None:
    """Put a failed or canceled job back in the queue, with its attempts reset."""
    with session_scope(settings) as session:
        queue = jobs.retry_job(session, job_id).queue
    sender = create_sender(settings)
    try:
        sent = enqueue(sender, settings, [job_id], queue)
    finally:
        sender.close()
    if sent:
        console.print(f"job {job_id} queued again on {queue}")
    else:
        console.print(
            f"job {job_id} queued again; the broker is unreachable, "
            "so the sweep will send it"
        )


@cli.command("sweep")
@pass_settings
def sweep_command(settings: Settings) -> None:
    """Resend lost messages; settle jobs whose worker stopped renewing its lease.

    Beat runs the same sweep on the workers every ADPA_SWEEP_INTERVAL_S.
    """
    sender = create_sender(settings)
    try:
        report = sweep_through(sender, settings)
    finally:
        sender.close()
    table = Table("resent", "requeued", "failed", "canceled", "not sent", title="sweep")
    table.add_row(
        str(report.resent),
        str(report.requeued),
        str(report.failed),
        str(report.canceled),
        str(report.unsent),
    )
    console.print(table)
    if report.unsent:
        errors.print(
            f"the broker did not take {report.unsent} message(s); "
            "the next sweep sends them"
        )


@cli.command(context_settings=PASS_THROUGH)
@click.option(
    "--concurrency", "-c", type=click.IntRange(1, 64), default=2, show_default=True
)
@click.pass_context
def worker(ctx: click.Context, concurrency: int) -> None:
    """Run a Celery worker for every queue (extra arguments go to celery)."""
    settings = _checked_settings(ctx)
    argv = worker_command(settings, concurrency, *ctx.args)
    os.execv(sys.executable, argv)


@cli.command(context_settings=PASS_THROUGH)
@click.pass_context
def beat(ctx: click.Context) -> None:
    """Run Celery beat, which schedules the periodic sweep."""
    schedule = _settings(ctx).data_dir / "celerybeat-schedule"
    argv = celery_command("beat", "-s", str(schedule), *ctx.args)
    os.execv(sys.executable, argv)


@cli.command(context_settings=PASS_THROUGH)
@click.pass_context
def flower(ctx: click.Context) -> None:
    """Run Flower behind basic auth (ADPA_FLOWER_USER, ADPA_FLOWER_PASSWORD)."""
    settings = _settings(ctx)
    if settings.flower_password is None:
        raise click.UsageError(
            "Flower never runs open: set ADPA_FLOWER_PASSWORD (and ADPA_FLOWER_USER)"
        )
    password = settings.flower_password.get_secret_value()
    # Through the environment, so the password is not on the command line.
    os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{password}"
    os.execv(sys.executable, celery_command("flower", *ctx.args))


@cli.command()
@click.option(
    "--jobs",
    "job_count",
    type=click.IntRange(1, 300),
    default=120,
    show_default=True,
    help="How many sample jobs to submit.",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=SECONDS,
    default=600.0,
    show_default=True,
    help="Seconds to wait for every job to finish.",
)
@click.option("--concurrency", type=click.IntRange(1, 16), default=2, show_default=True)
@click.option(
    "--embedded",
    is_flag=True,
    help="Ignore the configured database, broker and storage; use the embedded "
    "default under ADPA_DATA_DIR.",
)
@pass_settings_unchecked
def demo(
    settings: Settings,
    job_count: int,
    timeout_s: float,
    concurrency: int,
    embedded: bool,
) -> None:
    """Run the whole system once, on whatever is configured."""
    from producer.demo import run_demo

    if embedded:
        settings = settings.model_copy(
            update={"database_url": "", "broker_url": "", "storage_url": ""}
        )

    ok = run_demo(
        settings,
        console,
        job_count=job_count,
        timeout_s=timeout_s,
        concurrency=concurrency,
    )
    sys.exit(0 if ok else 1)


# -- formatting -----------------------------------------------------------

_STATUS_STYLE = {
    "queued": "yellow",
    "running": "cyan",
    "succeeded": "green",
    "failed": "red",
    "canceled": "magenta",
}


def _styled(status: str) -> str:
    return f"[{_STATUS_STYLE.get(status, 'white')}]{status}[/]"


def _when(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else ""


def _duration(job: Job) -> str:
    if job.started_at and job.finished_at:
        return f"{(job.finished_at - job.started_at).total_seconds():.2f}s"
    return ""


def _result(job: Job) -> str:
    if job.output_data:
        return str(job.output_data.get("file_path", ""))
    return job.last_error or ""


def _is_utf8(text: str) -> bool:
    # Bytes that are not UTF-8 reach Python as lone surrogates, which cannot be
    # encoded: they would fail later, in the database, the broker or a print.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_text_that_is_not_utf8(
    args: Sequence[str], environment: Mapping[str, str]
) -> None:
    """Refuse, by name, an argument or ADPA_ variable that is not UTF-8.

    Neither the argument nor the value is shown: it may be a password or a key.
    """
    for position, arg in enumerate(args, start=1):
        if _is_utf8(arg):
            continue
        option, has_value, _ = arg.partition("=")
        previous = args[position - 2] if position > 1 else ""
        if has_value and option.startswith("--") and _is_utf8(option):
            what = f"the value of {option}"
        elif previous.startswith("-") and previous != "-":
            what = f"argument {position} (after {previous})"
        else:
            what = f"argument {position}"
        raise click.UsageError(f"{what} is not valid UTF-8")
    for name, value in environment.items():
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper.startswith(TEST_PREFIX):
            continue
        if not _is_utf8(name):
            shown = name.encode("utf-8", "surrogateescape").decode(
                "utf-8", "backslashreplace"
            )
            raise SettingsError(shown, "the name is not valid UTF-8")
        if not _is_utf8(value):
            raise SettingsError(name, "the value is not valid UTF-8")


def _one_line(message: str) -> str:
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    """Entry point: one clear line on stderr for every expected error."""
    args = sys.argv[1:] if argv is None else argv
    try:
        _refuse_text_that_is_not_utf8(args, os.environ)
        cli.main(args=args, prog_name="adpa", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        # A group run without a command: its help, as click shows it.
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        errors.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        click.echo(f"adpa: error: {_one_line(exc.format_message())}", err=True)
        sys.exit(exc.exit_code)
    except SettingsError as exc:
        click.echo(f"adpa: {exc}", err=True)
        sys.exit(2)
    except (AdpaError, TimeoutError) as exc:
        click.echo(f"adpa: error: {exc}", err=True)
        sys.exit(1)
    except AlembicCommandError as exc:
        click.echo(f"adpa: error: migrations: {exc}", err=True)
        sys.exit(1)
    except SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        click.echo(f"adpa: error: database: {cause}", err=True)
        sys.exit(1)
