import json
from datetime import timedelta

from django.db import connection, transaction
from django.db.models import JSONField, Q, Value
from django.utils import timezone

from apps.events.broadcast import broadcast_on_commit, group_channel
from apps.events.models import Event, Leader, ProcessBeat


def _next_seq(group_id: int, count: int = 1) -> int:
    """Take `count` numbers; returns the last. UPDATE … RETURNING (PostgreSQL, SQLite >=
    3.35) locks the group's row until commit, so writers in one group take numbers one at a
    time and a rollback gives the numbers back."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE groups_group SET event_seq = event_seq + %s WHERE id = %s RETURNING event_seq",
            [count, group_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise ValueError(f"group {group_id} does not exist")
    return row[0]


def _appended(event: Event) -> dict:
    return {
        "type": "event.appended",
        "group_id": event.group_id,
        "seq": event.seq,
        "kind": event.kind,
        "task_id": event.task_id,
        "attempt_id": event.attempt_id,
        "agent_id": event.agent_id,
    }


def event_append(
    *,
    group_id: int,
    kind: str,
    task_id: int | None = None,
    attempt_id: int | None = None,
    agent_id: int | None = None,
    actor_id: int | None = None,
    payload: dict | None = None,
) -> Event:
    """Append an event inside the caller's transaction and broadcast it after commit.

    Call it after the state change it records: every writer takes the group's row lock
    last, so lock order is the same everywhere.
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("event_append must run inside the transaction of the change")
    [event] = _insert_events(
        group_id,
        [
            {
                "kind": kind,
                "task_id": task_id,
                "attempt_id": attempt_id,
                "agent_id": agent_id,
                "actor_id": actor_id,
                "payload": payload,
            }
        ],
    )
    broadcast_on_commit(group_channel(group_id), _appended(event))
    return event


def json_param(value) -> Value:
    """A JSON value for bulk_create on PostgreSQL: as an expression it is sent as one
    parameter per row. Plain values make Django insert through UNNEST with a jsonb[] array
    literal, which psycopg escapes in Python, one regex call per quote: 2-3x slower for
    JSON like a task's ranking."""
    return Value(value, output_field=JSONField())


def execute_with_arrays(sql: str, params: list) -> list[tuple]:
    """Run an insert of many rows given as one array per column (`%b` placeholders) on
    PostgreSQL, and return its rows. The parameters travel apart from the SQL (server-side
    binding; Django binds on the client, quoting every element into the query text in
    Python) and in binary (psycopg's text format escapes every array element with a regex
    in Python): together about a tenth of the ORM's CPU, and a fifth less for a matcher."""
    from django.db.backends.postgresql.base import ServerBindingCursor

    connection.ensure_connection()
    with connection._prepare_cursor(ServerBindingCursor(connection.connection)) as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


# The group's numbers are taken in the same statement (the row stays locked until commit).
INSERT_EVENTS = """
WITH taken AS (
    UPDATE groups_group SET event_seq = event_seq + %s WHERE id = %s RETURNING event_seq
)
INSERT INTO events_event
    (group_id, seq, kind, task_id, attempt_id, agent_id, actor_id, payload, created_at)
SELECT %s, taken.event_seq - %s + e.n, e.kind, e.task_id, e.attempt_id, e.agent_id,
       e.actor_id, e.payload::jsonb, %s
FROM taken, unnest(%b::text[], %b::bigint[], %b::bigint[], %b::bigint[], %b::int[], %b::text[])
     WITH ORDINALITY AS e (kind, task_id, attempt_id, agent_id, actor_id, payload, n)
RETURNING id, seq
"""


def _insert_events(group_id: int, events: list[dict]) -> list[Event]:
    """Number and insert one group's events (each a dict of event_append's keyword
    arguments but group_id), in order."""
    now = timezone.now()
    created = [
        Event(
            group_id=group_id,
            kind=event["kind"],
            task_id=event.get("task_id"),
            attempt_id=event.get("attempt_id"),
            agent_id=event.get("agent_id"),
            actor_id=event.get("actor_id"),
            payload=event.get("payload") or {},
            created_at=now,
        )
        for event in events
    ]
    if connection.vendor == "postgresql":
        # One round trip, one parameter per column (see execute_with_arrays).
        columns = ["kind", "task_id", "attempt_id", "agent_id", "actor_id"]
        arrays = [[getattr(e, column) for e in created] for column in columns]
        payloads = [json.dumps(e.payload) for e in created]
        count = len(created)
        params = [count, group_id, group_id, count, now, *arrays, payloads]
        rows = sorted(execute_with_arrays(INSERT_EVENTS, params), key=lambda row: row[1])
        if not rows:
            raise ValueError(f"group {group_id} does not exist")
        for event, (event_id, seq) in zip(created, rows, strict=True):
            event.id, event.seq = event_id, seq
            event._state.adding, event._state.db = False, connection.alias
    else:
        first = _next_seq(group_id, len(created)) - len(created) + 1
        for i, event in enumerate(created):
            event.seq = first + i
        Event.objects.bulk_create(created)
    return created


def event_append_many(*, group_id: int, events: list[dict]) -> list[Event]:
    """event_append for a batch of one group's events (each a dict of event_append's
    keyword arguments but group_id): one seq bump for all, one insert, and after commit one
    `events.appended` message naming the seq range. The same rules: inside the change's
    transaction, after its other writes."""
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("event_append_many must run inside the transaction of the change")
    if not events:
        return []
    created = _insert_events(group_id, events)
    # One message for the batch: the group's sockets read the events from the database.
    broadcast_on_commit(
        group_channel(group_id),
        {
            "type": "events.appended",
            "group_id": group_id,
            "first_seq": created[0].seq,
            "last_seq": created[-1].seq,
        },
    )
    return created


def process_beat_record(*, name: str) -> None:
    ProcessBeat.objects.update_or_create(name=name, defaults={"last_seen_at": timezone.now()})


def leader_elect(*, name: str, holder: str, ttl: timedelta) -> bool:
    """Take or renew the lease `name` for `holder` until now + ttl; returns whether holder
    has it. A compare-and-set: the row changes only while the lease has lapsed or is
    holder's own, so two contenders never both win. The row is created on first use."""
    now = timezone.now()
    claim = Leader.objects.filter(Q(expires_at__lt=now) | Q(holder=holder), name=name)
    if claim.update(holder=holder, expires_at=now + ttl):
        return True
    if Leader.objects.filter(name=name).exists():
        return False
    Leader.objects.bulk_create(
        [Leader(name=name, holder=holder, expires_at=now + ttl)], ignore_conflicts=True
    )
    return Leader.objects.filter(name=name, holder=holder).exists()


def leader_resign(*, name: str, holder: str) -> bool:
    """Give the lease up at once (a clean shutdown), so the next contender need not wait
    for it to lapse. Returns whether holder had it."""
    return bool(Leader.objects.filter(name=name, holder=holder).update(expires_at=timezone.now()))
