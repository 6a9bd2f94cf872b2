"""The event log endpoint: gap-free seqs after N, resumable with next_after."""

from apps.tasks.services import task_create
from tests.test_api_support import body, client_for, send


def test_events_after_n_are_gap_free_and_resume_where_they_left_off(personas):
    for n in range(7):
        task_create(group=personas.group, actor=personas.member, title=f"Task {n}")
    task_create(group=personas.other_group, actor=personas.outsider, title="Elsewhere")
    client = client_for(personas.viewer)

    first = body(send(client, "GET", "/groups/research/events", {"after": 2, "limit": 3}))
    rest = body(send(client, "GET", "/groups/research/events", {"after": first["next_after"]}))
    done = body(send(client, "GET", "/groups/research/events", {"after": rest["next_after"]}))

    assert [e["seq"] for e in first["items"]] == [3, 4, 5]
    assert first["next_after"] == 5
    assert [e["seq"] for e in rest["items"]] == [6, 7]
    assert done == {"items": [], "next_after": 7}


def test_an_event_carries_its_kind_refs_and_payload(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Write")

    [event] = body(send(client_for(personas.viewer), "GET", "/groups/research/events"))["items"]

    assert event["seq"] == 1 and event["kind"] == "task.created"
    assert event["refs"] == {
        "task_id": task.id,
        "attempt_id": None,
        "agent_id": None,
        "actor_id": personas.member.id,
    }
    assert event["payload"] == {"title": "Write", "status": "ready", "depends_on": []}
    assert event["created_at"]


def test_api_writes_show_up_in_the_event_log(personas):
    client = client_for(personas.member)
    send(client, "POST", "/groups/research/tasks", {"title": "One"})
    send(client, "POST", "/groups/research/tasks", {"title": "Two"})

    events = body(send(client, "GET", "/groups/research/events"))["items"]

    assert [(e["seq"], e["kind"]) for e in events] == [(1, "task.created"), (2, "task.created")]
