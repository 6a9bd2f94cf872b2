from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Prefetch, QuerySet

from apps.checkpoints.models import Checkpoint, Decision
from apps.groups.models import Group, Role
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
