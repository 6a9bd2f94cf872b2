"""Listing checkpoints and deciding them."""

from apps.checkpoints.models import Checkpoint, CheckpointStatus, Decision
from apps.checkpoints.services import checkpoint_raise
from apps.groups.models import Role
from apps.tasks.services import task_create
from tests.test_api_support import assert_error, body, client_for, send


def raise_checkpoint(personas, title="Ship it?", **kwargs):
    return checkpoint_raise(group=personas.group, title=title, source="human", **kwargs)


def test_checkpoints_are_listed_by_status(personas):
    pending = raise_checkpoint(personas, title="Pending")
    decided = raise_checkpoint(personas, title="Decided")
    Checkpoint.objects.filter(id=decided.id).update(status=CheckpointStatus.APPROVED)
    checkpoint_raise(group=personas.other_group, title="Not ours", source="human")
    client = client_for(personas.viewer)

    everything = body(send(client, "GET", "/groups/research/checkpoints"))
    waiting = body(send(client, "GET", "/groups/research/checkpoints", {"status": "pending"}))

    assert [c["id"] for c in everything["items"]] == [decided.id, pending.id]
    assert everything["count"] == 2
    assert [c["id"] for c in waiting["items"]] == [pending.id]


def test_an_approver_approves_and_the_decision_is_shown(personas):
    task = task_create(group=personas.group, actor=personas.member, title="Report")
    checkpoint = raise_checkpoint(personas, task=task, options=["ship", "hold"])

    response = send(
        client_for(personas.approver),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve", "note": "Looks good."},
    )

    assert response.status_code == 200, response.content
    data = body(response)
    assert data["status"] == "approved" and data["resolved_at"] is not None
    assert data["task_id"] == task.id and data["options"] == ["ship", "hold"]
    [decision] = data["decisions"]
    assert decision["username"] == "approver" and decision["verdict"] == "approve"
    assert decision["note"] == "Looks good."
    shown = body(send(client_for(personas.viewer), "GET", f"/checkpoints/{checkpoint.id}"))
    assert shown == data


def test_a_quorum_needs_several_approvals(personas):
    checkpoint = raise_checkpoint(personas, required_approvals=2)

    first = send(
        client_for(personas.approver),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve"},
    )
    twice = send(
        client_for(personas.approver),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve"},
    )
    second = send(
        client_for(personas.owner),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve"},
    )

    assert body(first)["status"] == "pending"
    assert_error(twice, 409, "already_decided")
    assert body(second)["status"] == "approved" and len(body(second)["decisions"]) == 2


def test_a_decided_checkpoint_cannot_be_decided_again(personas):
    checkpoint = raise_checkpoint(personas)
    client = client_for(personas.owner)
    send(client, "POST", f"/checkpoints/{checkpoint.id}/decide", {"verdict": "reject"})

    again = send(
        client_for(personas.approver),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve"},
    )

    assert_error(again, 409, "already_resolved")
    assert Checkpoint.objects.get(id=checkpoint.id).status == CheckpointStatus.REJECTED


def test_an_owner_only_checkpoint_refuses_approvers(personas):
    checkpoint = raise_checkpoint(personas, decider_role=Role.OWNER)

    response = send(
        client_for(personas.approver),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve"},
    )

    assert_error(response, 403, "forbidden")
    assert not Decision.objects.exists()


def test_another_groups_checkpoint_is_not_found(personas):
    theirs = checkpoint_raise(group=personas.other_group, title="Theirs", source="human")

    response = send(client_for(personas.owner), "GET", f"/checkpoints/{theirs.id}")

    assert_error(response, 404, "not_found")


# --- policies through the API ------------------------------------------------------------


def test_a_task_is_created_with_its_checkpoint_and_dependency_policies(personas):
    client = client_for(personas.member)
    build = body(send(client, "POST", "/groups/research/tasks", {"title": "Build"}))
    assert (build["checkpoint_policy"], build["dependency_failure_policy"]) == ("none", "block")

    response = send(
        client,
        "POST",
        "/groups/research/tasks",
        {
            "title": "Deploy",
            "depends_on": [build["id"]],
            "checkpoint_policy": "before_start",
            "dependency_failure_policy": "cancel",
        },
    )

    assert response.status_code == 201, response.content
    deploy = body(response)
    assert (deploy["checkpoint_policy"], deploy["dependency_failure_policy"]) == (
        "before_start",
        "cancel",
    )
    assert (deploy["status"], deploy["start_approved_at"], deploy["feedback"]) == (
        "waiting",
        None,
        "",
    )


def test_unknown_task_policies_name_the_field(personas):
    for field in ("checkpoint_policy", "dependency_failure_policy"):
        response = send(
            client_for(personas.member),
            "POST",
            "/groups/research/tasks",
            {"title": "X", field: "sometimes"},
        )
        error = assert_error(response, 422, "validation_error")
        assert field in str(error)


def test_an_owner_sets_the_groups_checkpoint_and_dependency_policies(personas):
    changes = {
        "default_checkpoint_policy": "review_result",
        "dependency_failure_policy": "cancel",
        "checkpoint_required_approvals": 2,
        "checkpoint_decider_role": "owner",
        "checkpoint_expiry_s": 3600,
        "checkpoint_expiry_action": "escalate",
    }
    response = send(client_for(personas.owner), "PATCH", "/groups/research", changes)
    assert response.status_code == 200, response.content
    assert {key: body(response)[key] for key in changes} == changes

    refused = send(client_for(personas.approver), "PATCH", "/groups/research", changes)
    assert_error(refused, 403, "forbidden")
    for bad in (
        {"checkpoint_decider_role": "member"},
        {"checkpoint_required_approvals": 0},
        {"checkpoint_expiry_s": -1},
        {"checkpoint_expiry_action": "explode"},
        {"dependency_failure_policy": "ignore"},
    ):
        response = send(client_for(personas.owner), "PATCH", "/groups/research", bad)
        assert_error(response, 422, "validation_error")


def test_approving_reassign_names_the_agent(personas):
    from apps.tasks.services import attempt_accept, attempt_lose, task_assign
    from tests.conftest import make_agent

    task = task_create(group=personas.group, actor=personas.member, title="Flaky", max_attempts=1)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)
    attempt_lose(attempt_id=attempt.id, reason="lease expired")
    checkpoint = Checkpoint.objects.get(task=task, kind="max_attempts")
    chosen = make_agent(personas.group, "chosen")
    client = client_for(personas.approver)

    missing = send(
        client,
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve", "option": "reassign"},
    )
    assert_error(missing, 422, "assign_to_required")

    response = send(
        client,
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "approve", "option": "reassign", "assign_to": chosen.id},
    )

    assert response.status_code == 200, response.content
    [decision] = body(response)["decisions"]
    assert (decision["verdict"], decision["option"]) == ("approve", "reassign")
    task_data = body(send(client, "GET", f"/tasks/{task.id}"))
    assert task_data["status"] == "assigned"
    assert task_data["attempts"][-1]["agent"]["id"] == chosen.id


def test_requesting_changes_to_a_reviewed_result(personas):
    from apps.tasks.services import attempt_accept, attempt_complete, task_assign

    task = task_create(
        group=personas.group,
        actor=personas.member,
        title="Draft",
        checkpoint_policy="review_result",
    )
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)
    attempt_complete(attempt_id=attempt.id, agent=personas.agent, epoch=1, result={"v": 1})
    client = client_for(personas.approver)
    [checkpoint] = body(send(client, "GET", "/groups/research/checkpoints"))["items"]
    assert (checkpoint["kind"], checkpoint["source"], checkpoint["attempt_id"]) == (
        "review",
        "policy",
        attempt.id,
    )

    response = send(
        client,
        "POST",
        f"/checkpoints/{checkpoint['id']}/decide",
        {"verdict": "request_changes", "note": "Cite sources."},
    )

    assert response.status_code == 200, response.content
    assert body(response)["status"] == "changes_requested"
    task_data = body(send(client, "GET", f"/tasks/{task.id}"))
    assert (task_data["status"], task_data["feedback"]) == ("assigned", "Cite sources.")
    assert [a["status"] for a in task_data["attempts"]] == ["rejected", "offered"]


def test_a_start_cannot_be_sent_back_for_changes(personas):
    task = task_create(
        group=personas.group, actor=personas.member, title="Go", checkpoint_policy="before_start"
    )
    checkpoint = Checkpoint.objects.get(task=task)
    response = send(
        client_for(personas.approver),
        "POST",
        f"/checkpoints/{checkpoint.id}/decide",
        {"verdict": "request_changes", "note": "?"},
    )
    assert_error(response, 422, "verdict_not_allowed")
