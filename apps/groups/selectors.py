from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import OuterRef, QuerySet, Subquery

from apps.groups.models import ApiToken, Group, Membership, Role
from claw.errors import Forbidden, InvalidInput, NotFound


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


def _with_role(*, groups: QuerySet[Group], user: AbstractBaseUser) -> QuerySet[Group]:
    """Annotate each group with `role`: the user's role in it (None for non-members)."""
    return groups.annotate(
        role=Subquery(
            Membership.objects.filter(group=OuterRef("pk"), user_id=user.pk).values("role")[:1]
        )
    )


def groups_with_role_for_user(*, user: AbstractBaseUser) -> QuerySet[Group]:
    return _with_role(groups=groups_for_user(user=user), user=user)


def group_with_role_for_user(
    *, user: AbstractBaseUser | AnonymousUser, slug: str, role: str = Role.VIEWER
) -> Group:
    group = group_get_for_user(user=user, slug=slug, role=role)
    return _with_role(groups=Group.objects.filter(id=group.id), user=user).get()


def member_user_get(*, group: Group, user_id: int) -> AbstractBaseUser:
    """A member of the group by user id, or not_found."""
    membership = members_of(group=group).filter(user_id=user_id).first()
    if membership is None:
        raise NotFound(f"User {user_id} is not a member of this group.")
    return membership.user


def user_get_by_username(*, username: str) -> AbstractBaseUser:
    user = get_user_model().objects.filter(username=username, is_active=True).first()
    if user is None:
        raise InvalidInput(f"No user named {username!r}.", code="unknown_user")
    return user


def api_tokens_for_user(*, user: AbstractBaseUser) -> QuerySet[ApiToken]:
    return ApiToken.objects.filter(user=user).order_by("-created_at", "-id")
