"""Creating, listing, inspecting, cancelling and retrying tasks; dependencies."""

from apps.events.models import Event
from apps.tasks.models import Task, TaskStatus
from apps.tasks.services import attempt_accept, attempt_decline, task_assign, task_create
from tests.test_api_support import assert_error, body, client_for, send


def create(client, **payload):
    response = send(client, "POST", "/groups/research/tasks", payload)
    assert response.status_code == 201, response.content
    return body(response)


def test_a_member_creates_a_task_with_steps_toolkits_and_dependencies(personas):
    client = client_for(personas.member)
    first = create(client, title="Gather sources")

    task = create(
        client,
        title="Write the report",
        instructions="Two pages.",
        steps=[{"tool": "shell", "args": {"cmd": "ls"}}],
        required_toolkits=["shell", "documents"],
        priority=5,
        max_attempts=2,
        depends_on=[first["id"]],
    )

    assert task["status"] == "waiting"
    assert task["depends_on"] == [first["id"]]
    assert task["steps"] == [{"tool": "shell", "args": {"cmd": "ls"}}]
    assert task["required_toolkits"] == ["documents", "shell"]
    assert task["priority"] == 5 and task["max_attempts"] == 2
    assert task["created_by_user_id"] == personas.member.id
    assert task["attempts"] == [] and task["root_id"] == task["id"]
    event = Event.objects.filter(kind="task.created", task_id=task["id"]).get()
    assert event.actor_id == personas.member.id


def test_a_subtask_shares_its_parents_root(personas):
    client = client_for(personas.member)
    parent = create(client, title="Project")

    child = create(client, title="Part", parent_id=parent["id"])

    assert child["parent_id"] == parent["id"] and child["root_id"] == parent["id"]
    assert Task.objects.get(id=child["id"]).max_attempts == personas.group.max_attempts


def test_a_task_shows_its_attempts_with_choice_epoch_agent_and_device(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Run it")
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id, choice={"reason": "only"})
    attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)

    response = send(client_for(personas.viewer), "GET", f"/tasks/{task.id}")

    data = body(response)
    assert data["status"] == "running" and data["epoch"] == 1
    [shown] = data["attempts"]
    assert shown["id"] == attempt.id and shown["epoch"] == 1 and shown["status"] == "running"
    assert shown["choice"] == {"reason": "only"}
    assert shown["agent"] == {"id": personas.agent.id, "name": "alpha"}
    assert shown["device"] == {"id": personas.agent.device_id, "name": "alpha-device"}
    assert shown["started_at"] is not None


def test_tasks_are_filtered_and_paginated(personas):
    client = client_for(personas.member)
    parent = create(client, title="Parent", required_toolkits=["browser"])
    child = create(client, title="Child", parent_id=parent["id"], required_toolkits=["shell"])
    plain = create(client, title="Plain")
    attempted = task_create(group=personas.group, actor=personas.member, title="Attempted")
    task_assign(task_id=attempted.id, agent_id=personas.agent.id)
    task_create(group=personas.other_group, actor=personas.outsider, title="Not ours")

    def ids(**query):
        response = send(client, "GET", "/groups/research/tasks", query)
        assert response.status_code == 200, response.content
        return [t["id"] for t in body(response)["items"]]

    assert ids() == [attempted.id, plain["id"], child["id"], parent["id"]]
    assert ids(toolkit="shell") == [child["id"]]
    assert ids(parent=parent["id"]) == [child["id"]]
    assert ids(status="assigned") == [attempted.id]
    assert ids(agent=personas.agent.id) == [attempted.id]
    assert ids(status="ready", toolkit="browser") == [parent["id"]]
    page = body(send(client, "GET", "/groups/research/tasks", {"limit": 2, "offset": 1}))
    assert page["count"] == 4 and page["limit"] == 2 and page["offset"] == 1
    assert [t["id"] for t in page["items"]] == [plain["id"], child["id"]]


def test_cancelling_a_task_cancels_its_subtree(personas):
    client = client_for(personas.member)
    parent = create(client, title="Project")
    child = create(client, title="Part", parent_id=parent["id"])

    response = send(client, "POST", f"/tasks/{parent['id']}/cancel", {"reason": "scrapped"})

    assert sorted(body(response)["cancelled"]) == sorted([parent["id"], child["id"]])
    assert set(Task.objects.values_list("status", flat=True)) == {TaskStatus.CANCELLED}
    again = send(client, "POST", f"/tasks/{parent['id']}/cancel")
    assert_error(again, 409, "already_finished")


def test_a_cancelled_task_can_be_retried_but_a_ready_one_cannot(personas):
    client = client_for(personas.member)
    task = create(client, title="Flaky")
    not_retryable = send(client, "POST", f"/tasks/{task['id']}/retry")
    send(client, "POST", f"/tasks/{task['id']}/cancel")

    retried = send(client, "POST", f"/tasks/{task['id']}/retry")

    assert_error(not_retryable, 409, "not_retryable")
    assert retried.status_code == 200 and body(retried)["status"] == "ready"


def test_adding_a_dependency_makes_a_ready_task_wait(personas):
    client = client_for(personas.member)
    first = create(client, title="First")
    second = create(client, title="Second")

    response = send(
        client, "POST", f"/tasks/{second['id']}/dependencies", {"depends_on": first["id"]}
    )

    assert response.status_code == 200
    assert body(response)["depends_on"] == [first["id"]]
    assert body(response)["status"] == "waiting"
    duplicate = send(
        client, "POST", f"/tasks/{second['id']}/dependencies", {"depends_on": first["id"]}
    )
    assert_error(duplicate, 409, "duplicate")


def test_a_dependency_on_another_groups_task_is_refused(personas):
    mine = task_create(group=personas.group, actor=personas.member, title="Mine")
    theirs = task_create(group=personas.other_group, actor=personas.outsider, title="Theirs")

    response = send(
        client_for(personas.member),
        "POST",
        f"/tasks/{mine.id}/dependencies",
        {"depends_on": theirs.id},
    )

    assert_error(response, 422, "unknown_dependency")
    assert not mine.dependencies.exists()


def test_another_groups_task_is_not_found(personas):
    theirs = task_create(group=personas.other_group, actor=personas.outsider, title="Theirs")
    client = client_for(personas.owner)

    assert_error(send(client, "GET", f"/tasks/{theirs.id}"), 404, "not_found")
    assert_error(send(client, "POST", f"/tasks/{theirs.id}/cancel"), 404, "not_found")
    assert Task.objects.get(id=theirs.id).status == TaskStatus.READY


def test_listing_and_showing_tasks_do_not_query_per_row(personas, django_assert_max_num_queries):
    task = task_create(group=personas.group, actor=personas.member, title="Busy")
    for n in range(3):
        attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
        attempt_decline(
            attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch, reason=f"{n}"
        )
    for n in range(20):
        task_create(
            group=personas.group, actor=personas.member, title=f"Task {n}", depends_on=[task.id]
        )
    client = client_for(personas.viewer)
    send(client, "GET", "/me")  # load the session once

    with django_assert_max_num_queries(7):
        listed = send(client, "GET", "/groups/research/tasks", {"limit": 50})
    with django_assert_max_num_queries(7):
        shown = send(client, "GET", f"/tasks/{task.id}")

    assert body(listed)["count"] == 21
    assert len(body(shown)["attempts"]) == 3
