from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Exists, F, OuterRef, Prefetch, Q, QuerySet
from django.utils import timezone

from apps.checkpoints.models import Checkpoint, CheckpointStatus, Decision
from apps.groups.models import DECIDER_ROLES, Group, Membership, Role
from apps.groups.selectors import require_role
from claw.errors import NotFound


def checkpoints_for_group(*, group: Group, status: str | None = None) -> QuerySet[Checkpoint]:
    checkpoints = Checkpoint.objects.filter(group=group)
    if status:
        checkpoints = checkpoints.filter(status=status)
    return checkpoints.order_by("-created_at", "-id")


def checkpoint_get_for_user(
    *, user: AbstractBaseUser | AnonymousUser, checkpoint_id: int, role: str = Role.VIEWER
) -> Checkpoint:
    """A checkpoint with its decisions (and their users) prefetched."""
    checkpoint = (
        Checkpoint.objects.prefetch_related(
            Prefetch(
                "decisions",
                queryset=Decision.objects.select_related("user").order_by("created_at", "id"),
            )
        )
        .filter(id=checkpoint_id)
        .first()
    )
    if checkpoint is None:
        raise NotFound("No such checkpoint, or you are not a member of its group.")
    require_role(user=user, group_id=checkpoint.group_id, role=role)
    return checkpoint


def _pending_for_user(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Checkpoint]:
    if not user.is_authenticated:
        return Checkpoint.objects.none()
    # The user's role in the checkpoint's group reaches its decider_role.
    roles = [Role.VIEWER, Role.MEMBER, Role.APPROVER, Role.OWNER]
    may_decide = Q()
    for decider_role in DECIDER_ROLES:
        reaching = roles[Role.rank(decider_role) :]
        may_decide |= Q(decider_role=decider_role) & Exists(
            Membership.objects.filter(
                group_id=OuterRef("group_id"), user_id=user.pk, role__in=reaching
            )
        )
    now = timezone.now()
    return (
        Checkpoint.objects.filter(status=CheckpointStatus.PENDING)
        .filter(Q(expires_at=None) | Q(expires_at__gt=now))
        .filter(may_decide)
        .exclude(Exists(Decision.objects.filter(checkpoint_id=OuterRef("id"), user_id=user.pk)))
    )


def checkpoints_pending_for_user(*, user: AbstractBaseUser | AnonymousUser) -> QuerySet[Checkpoint]:
    """The approvals inbox: pending checkpoints, across all the user's groups, that the user
    may decide now (their role there reaches the checkpoint's decider_role), has not decided
    yet, and that have not expired. Soonest deadline first, then oldest."""
    return (
        _pending_for_user(user)
        .select_related("group", "task")
        .order_by(F("expires_at").asc(nulls_last=True), "created_at", "id")
    )


def checkpoints_pending_count_for_user(*, user: AbstractBaseUser | AnonymousUser) -> int:
    """How many checkpoints wait for this user (one COUNT query, for a badge)."""
    return _pending_for_user(user).count()
