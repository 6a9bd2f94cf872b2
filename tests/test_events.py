import pytest
from django.db import transaction

from apps.events.models import Event
from apps.events.services import event_append
from apps.tasks.services import task_create
from claw.errors import InvalidInput


def seqs(group) -> list[int]:
    return list(Event.objects.filter(group=group).order_by("seq").values_list("seq", flat=True))


def test_sequence_numbers_are_gap_free_per_group(personas):
    for i in range(5):
        task_create(group=personas.group, actor=personas.member, title=f"t{i}")
    task_create(group=personas.other_group, actor=personas.outsider, title="theirs")
    assert seqs(personas.group) == list(range(1, 6))
    assert seqs(personas.other_group) == [1]


def test_a_rolled_back_change_leaves_no_gap(personas):
    task_create(group=personas.group, actor=personas.member, title="one")
    with pytest.raises(RuntimeError), transaction.atomic():
        event_append(group_id=personas.group.id, kind="doomed")
        raise RuntimeError("boom")
    task_create(group=personas.group, actor=personas.member, title="two")
    assert seqs(personas.group) == [1, 2]
    assert not Event.objects.filter(kind="doomed").exists()


def test_a_failed_validation_appends_nothing(personas):
    with pytest.raises(InvalidInput):
        task_create(group=personas.group, actor=personas.member, title="")
    assert seqs(personas.group) == []


@pytest.mark.django_db(transaction=True)
def test_events_are_appended_only_inside_a_transaction(personas):
    with pytest.raises(RuntimeError, match="inside the transaction"):
        event_append(group_id=personas.group.id, kind="loose")


def test_broadcasts_happen_after_commit_only(
    personas, broadcasts, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        task = task_create(group=personas.group, actor=personas.member, title="live")
        assert broadcasts == []  # not before commit
    assert broadcasts == [
        (
            f"group.{personas.group.id}",
            {
                "type": "event.appended",
                "group_id": personas.group.id,
                "seq": 1,
                "kind": "task.created",
                "task_id": task.id,
                "attempt_id": None,
                "agent_id": None,
            },
        )
    ]


def test_nothing_is_broadcast_when_the_transaction_rolls_back(
    personas, broadcasts, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        with pytest.raises(RuntimeError), transaction.atomic():
            task_create(group=personas.group, actor=personas.member, title="doomed")
            raise RuntimeError("boom")
    assert callbacks == []
    assert broadcasts == []


def test_a_failing_channel_layer_does_not_break_the_write(
    personas, monkeypatch, django_capture_on_commit_callbacks
):
    class BrokenLayer:
        async def group_send(self, *args):
            raise ConnectionError("redis is down")

    monkeypatch.setattr("apps.events.broadcast.get_channel_layer", lambda: BrokenLayer())
    with django_capture_on_commit_callbacks(execute=True):
        task = task_create(group=personas.group, actor=personas.member, title="still saved")
    assert Event.objects.filter(task=task).exists()
