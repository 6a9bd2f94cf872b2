from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet

from apps.groups.models import Group, Membership, Role
from claw.errors import Forbidden, NotFound


def membership_role(*, user: AbstractBaseUser | AnonymousUser, group_id: int) -> str | None:
    if not user.is_authenticated:
        return None
    return (
        Membership.objects.filter(group_id=group_id, user_id=user.pk)
        .values_list("role", flat=True)
        .first()
    )


def require_role(
    *, user: AbstractBaseUser | AnonymousUser, group_id: int, role: str = Role.VIEWER
) -> str:
    """The user's role in the group, or an error: outsiders get not_found (they may not
    learn that the group exists), members below `role` get forbidden."""
    actual = membership_role(user=user, group_id=group_id)
    if actual is None:
        raise NotFound("No such group, or you are not a member of it.")
    if Role.rank(actual) < Role.rank(role):
        raise Forbidden(f"This needs the {role} role in this group; you are {actual}.")
    return actual


def group_get_for_user(
    *, user: AbstractBaseUser | AnonymousUser, slug: str, role: str = Role.VIEWER
) -> Group:
    group = Group.objects.filter(slug=slug).first()
    if group is None:
        raise NotFound("No such group, or you are not a member of it.")
    require_role(user=user, group_id=group.id, role=role)
    return group


def groups_for_user(*, user: AbstractBaseUser) -> QuerySet[Group]:
    return Group.objects.filter(memberships__user=user).order_by("name")


def members_of(*, group: Group) -> QuerySet[Membership]:
    return group.memberships.select_related("user").order_by("user__username")
