"""The maintenance lease (River's leader election): one holder at a time, handed over when
the holder stops renewing, and the maintenance jobs run only by the holder."""

from datetime import timedelta

import time_machine
from django.utils import timezone

from apps.events.models import Leader
from apps.events.services import leader_elect, leader_resign
from apps.tasks.models import Attempt, TaskStatus
from apps.tasks.services import task_create
from apps.tasks.tasks import match_all, sweep_leases
from claw.maintenance import LEASE, LEASE_TTL, Maintainer, holder_name

TTL = timedelta(seconds=5)


def later(seconds: float):
    return time_machine.travel(timezone.now() + timedelta(seconds=seconds), tick=False)


def test_the_first_contender_takes_the_lease_and_the_second_is_refused(db):
    assert leader_elect(name="maintenance", holder="worker-1", ttl=TTL) is True
    assert leader_elect(name="maintenance", holder="worker-2", ttl=TTL) is False
    assert Leader.objects.get(name="maintenance").holder == "worker-1"


def test_the_holder_renews_its_lease_and_keeps_it(db):
    leader_elect(name="maintenance", holder="worker-1", ttl=TTL)
    for _ in range(3):
        with later(4):
            assert leader_elect(name="maintenance", holder="worker-1", ttl=TTL) is True
            assert leader_elect(name="maintenance", holder="worker-2", ttl=TTL) is False
    assert Leader.objects.get(name="maintenance").holder == "worker-1"


def test_a_lease_that_lapsed_goes_to_the_next_contender_and_the_old_holder_is_refused(db):
    leader_elect(name="maintenance", holder="worker-1", ttl=TTL)
    with later(TTL.total_seconds() - 1):
        assert leader_elect(name="maintenance", holder="worker-2", ttl=TTL) is False
    with later(TTL.total_seconds() + 1):
        assert leader_elect(name="maintenance", holder="worker-2", ttl=TTL) is True
        # The old holder, back from a pause, finds it taken: compare-and-set, not overwrite.
        assert leader_elect(name="maintenance", holder="worker-1", ttl=TTL) is False
    assert Leader.objects.get(name="maintenance").holder == "worker-2"


def test_a_resigned_lease_is_taken_at_once(db):
    leader_elect(name="maintenance", holder="worker-1", ttl=TTL)
    assert leader_resign(name="maintenance", holder="worker-2") is False
    assert leader_resign(name="maintenance", holder="worker-1") is True
    with later(0.01):
        assert leader_elect(name="maintenance", holder="worker-2", ttl=TTL) is True


def test_leases_of_different_duties_are_independent(db):
    assert leader_elect(name="maintenance", holder="worker-1", ttl=TTL) is True
    assert leader_elect(name="other", holder="worker-2", ttl=TTL) is True


def test_only_the_maintainer_holding_the_lease_runs_the_jobs(personas, monkeypatch):
    ran: list[str] = []
    first, second = Maintainer(), Maintainer()
    second.holder = holder_name("second")  # another process
    monkeypatch.setattr(
        "claw.maintenance.JOBS", [(1.0, lambda: ran.append(Leader.objects.get().holder) or 0)]
    )
    first.tick()
    second.tick()
    assert ran == [first.holder] and (first.leading, second.leading) == (True, False)
    # The first dies (stops renewing): the second takes over once the lease lapses.
    with later(LEASE_TTL.total_seconds() + 1):
        second.tick()
    assert ran == [first.holder, second.holder] and second.leading


def test_beats_jobs_do_nothing_while_a_maintainer_holds_the_lease(personas):
    task = task_create(group=personas.group, actor=personas.member, title="job")
    Maintainer().lead()
    assert match_all() == 0 and sweep_leases() == 0
    assert Attempt.objects.filter(task=task).count() == 0
    # With no maintainer renewing it (beat without maintainers), beat's copy runs the job.
    with later(LEASE_TTL.total_seconds() + 1):
        assert match_all() == 1
    task.refresh_from_db()
    assert task.status == TaskStatus.ASSIGNED
    assert Leader.objects.get(name=LEASE).holder.endswith(":beat")
