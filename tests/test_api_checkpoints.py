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
