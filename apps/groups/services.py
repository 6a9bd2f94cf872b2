import hashlib
import math
import time
from datetime import timedelta

from django.contrib.auth import authenticate
from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import cache
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone
from django.utils.text import slugify

from apps.events.services import event_append
from apps.groups.models import (
    DECIDER_ROLES,
    ApiToken,
    CheckpointPolicy,
    DependencyFailurePolicy,
    ExpiryAction,
    Group,
    Invite,
    Membership,
    Role,
)
from apps.groups.selectors import require_role
from claw.errors import InvalidInput, InvalidTransition, NotFound, Throttled
from claw.tokens import new_token, token_hash

# Failed sign-ins: per username (one account guessed at from anywhere) and per client
# address (many accounts guessed at from one place; looser, as people share addresses).
LOGIN_FAILURES_PER_USERNAME = 10
LOGIN_FAILURES_PER_ADDRESS = 30
LOGIN_FAILURE_WINDOW_S = 15 * 60
LOGIN_LOCK_S = 15 * 60

POLICY_FIELDS = {
    "heartbeat_interval_s": (1, 600),
    "lease_timeout_s": (2, 3600),
    "max_attempts": (1, 100),
    "reconnect_grace_s": (0, 3600),
    "checkpoint_required_approvals": (1, 20),
    "checkpoint_expiry_s": (0, 30 * 86400),
    "llm_token_budget": (0, 10**13),
}
# Policies where null is a value: no budget.
NULLABLE_POLICIES = {"llm_token_budget"}
CHOICE_POLICIES = {
    "default_checkpoint_policy": CheckpointPolicy.values,
    "dependency_failure_policy": DependencyFailurePolicy.values,
    "checkpoint_decider_role": list(DECIDER_ROLES),
    "checkpoint_expiry_action": ExpiryAction.values,
}


def _validate_policies(policies: dict) -> None:
    for field, value in policies.items():
        if field in CHOICE_POLICIES:
            if value not in CHOICE_POLICIES[field]:
                raise InvalidInput(f"{field} must be one of {', '.join(CHOICE_POLICIES[field])}")
            continue
        if field not in POLICY_FIELDS:
            raise InvalidInput(f"Unknown group policy {field!r}.")
        if value is None and field in NULLABLE_POLICIES:
            continue
        low, high = POLICY_FIELDS[field]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidInput(f"{field} must be an integer from {low} to {high}.")


def _check_lease_vs_heartbeat(heartbeat: int, lease: int) -> None:
    if lease <= heartbeat:
        raise InvalidInput(
            f"lease_timeout_s ({lease}) must be longer than heartbeat_interval_s ({heartbeat})."
        )


def group_create(*, user: AbstractBaseUser, name: str, slug: str = "", **policies) -> Group:
    name = name.strip()
    if not name:
        raise InvalidInput("A group needs a name.")
    slug = slug or slugify(name)[:50]
    if not slug:
        raise InvalidInput("A group needs a slug of letters, digits, - or _.")
    _validate_policies(policies)
    group = Group(name=name, slug=slug, **policies)
    _check_lease_vs_heartbeat(group.heartbeat_interval_s, group.lease_timeout_s)
    try:
        with transaction.atomic():
            group.save()
            Membership.objects.create(group=group, user=user, role=Role.OWNER)
            event_append(
                group_id=group.id,
                kind="group.created",
                actor_id=user.pk,
                payload={"name": name, "slug": slug},
            )
    except IntegrityError:
        raise InvalidInput(f"The slug {slug!r} is taken.", code="slug_taken") from None
    return group


def group_update_policies(*, actor: AbstractBaseUser, group: Group, **policies) -> Group:
    require_role(user=actor, group_id=group.id, role=Role.OWNER)
    _validate_policies(policies)
    with transaction.atomic():
        current = Group.objects.select_for_update().get(id=group.id)
        for field, value in policies.items():
            setattr(current, field, value)
        _check_lease_vs_heartbeat(current.heartbeat_interval_s, current.lease_timeout_s)
        current.save(update_fields=list(policies))
        event_append(
            group_id=group.id, kind="group.updated", actor_id=actor.pk, payload=dict(policies)
        )
    return current


def _owner_count(group_id: int) -> int:
    return Membership.objects.filter(group_id=group_id, role=Role.OWNER).count()


def membership_add(
    *, actor: AbstractBaseUser, group: Group, user: AbstractBaseUser, role: str
) -> Membership:
    require_role(user=actor, group_id=group.id, role=Role.OWNER)
    if role not in Role.values:
        raise InvalidInput(f"role must be one of {', '.join(Role.values)}.")
    try:
        with transaction.atomic():
            membership = Membership.objects.create(group=group, user=user, role=role)
            event_append(
                group_id=group.id,
                kind="member.added",
                actor_id=actor.pk,
                payload={"user_id": user.pk, "username": user.get_username(), "role": role},
            )
    except IntegrityError:
        raise InvalidTransition(
            f"{user.get_username()} is already a member.", code="already_member"
        ) from None
    return membership


def membership_set_role(
    *, actor: AbstractBaseUser, group: Group, user: AbstractBaseUser, role: str
) -> Membership:
    require_role(user=actor, group_id=group.id, role=Role.OWNER)
    if role not in Role.values:
        raise InvalidInput(f"role must be one of {', '.join(Role.values)}.")
    with transaction.atomic():
        membership = Membership.objects.select_for_update().filter(group=group, user=user).first()
        if membership is None:
            raise NotFound(f"{user.get_username()} is not a member of this group.")
        if membership.role == Role.OWNER and role != Role.OWNER and _owner_count(group.id) == 1:
            raise InvalidTransition("A group keeps at least one owner.", code="last_owner")
        old_role = membership.role
        membership.role = role
        membership.save(update_fields=["role"])
        event_append(
            group_id=group.id,
            kind="member.role_changed",
            actor_id=actor.pk,
            payload={"user_id": user.pk, "from": old_role, "to": role},
        )
    return membership


def membership_remove(*, actor: AbstractBaseUser, group: Group, user: AbstractBaseUser) -> None:
    """Owners remove anyone; every member may leave."""
    if actor.pk != user.pk:
        require_role(user=actor, group_id=group.id, role=Role.OWNER)
    else:
        require_role(user=actor, group_id=group.id, role=Role.VIEWER)
    with transaction.atomic():
        membership = Membership.objects.select_for_update().filter(group=group, user=user).first()
        if membership is None:
            raise NotFound(f"{user.get_username()} is not a member of this group.")
        if membership.role == Role.OWNER and _owner_count(group.id) == 1:
            raise InvalidTransition("A group keeps at least one owner.", code="last_owner")
        membership.delete()
        event_append(
            group_id=group.id,
            kind="member.removed",
            actor_id=actor.pk,
            payload={"user_id": user.pk, "username": user.get_username()},
        )


def api_token_create(*, user: AbstractBaseUser, name: str) -> tuple[ApiToken, str]:
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidInput("A token needs a name of 1 to 100 characters.")
    raw = new_token("clawp")
    token = ApiToken.objects.create(
        user=user, name=name, token_hash=token_hash(raw), prefix=raw[:12]
    )
    return token, raw


def api_token_revoke(*, user: AbstractBaseUser, token_id: int) -> None:
    updated = ApiToken.objects.filter(id=token_id, user=user, revoked_at=None).update(
        revoked_at=timezone.now()
    )
    if updated != 1:
        raise NotFound("No such active token.")


def api_token_authenticate(*, raw: str) -> AbstractBaseUser | None:
    token = (
        ApiToken.objects.select_related("user")
        .filter(token_hash=token_hash(raw), revoked_at=None, user__is_active=True)
        .first()
    )
    if token is None:
        return None
    now = timezone.now()
    if token.last_used_at is None or (now - token.last_used_at).total_seconds() > 60:
        ApiToken.objects.filter(id=token.id).update(last_used_at=now)
    return token.user


# --- invite links ------------------------------------------------------------------------

INVITE_TTL = timedelta(days=7)
INVITE_MAX_USES = 1000


def invite_create(
    *,
    actor: AbstractBaseUser,
    group: Group,
    role: str = Role.MEMBER,
    max_uses: int = 1,
    ttl: timedelta = INVITE_TTL,
) -> tuple[Invite, str]:
    """An invite link for `max_uses` people (owners only). Returns the invite and its raw
    token, shown once; only the hash is stored."""
    require_role(user=actor, group_id=group.id, role=Role.OWNER)
    if role not in Role.values:
        raise InvalidInput(f"role must be one of {', '.join(Role.values)}.")
    if isinstance(max_uses, bool) or not isinstance(max_uses, int):
        raise InvalidInput(f"max_uses must be an integer from 1 to {INVITE_MAX_USES}.")
    if not 1 <= max_uses <= INVITE_MAX_USES:
        raise InvalidInput(f"max_uses must be an integer from 1 to {INVITE_MAX_USES}.")
    raw = new_token("clawi")
    with transaction.atomic():
        invite = Invite.objects.create(
            group=group,
            role=role,
            token_hash=token_hash(raw),
            created_by=actor,
            expires_at=timezone.now() + ttl,
            max_uses=max_uses,
        )
        event_append(
            group_id=group.id,
            kind="invite.created",
            actor_id=actor.pk,
            payload={
                "invite_id": invite.id,
                "role": role,
                "max_uses": max_uses,
                "expires_at": invite.expires_at.isoformat(),
            },
        )
    return invite, raw


def invite_get_by_token(*, raw: str) -> Invite:
    invite = Invite.objects.select_related("group").filter(token_hash=token_hash(raw)).first()
    if invite is None:
        raise NotFound("This invite link is not valid.", code="invalid_invite")
    return invite


def _invite_refusal(invite: Invite, now) -> InvalidTransition:
    if invite.revoked_at is not None:
        return InvalidTransition("This invite link was revoked.", code="invite_revoked")
    if invite.expires_at <= now:
        return InvalidTransition("This invite link has expired.", code="invite_expired")
    return InvalidTransition("This invite link was already used.", code="invite_used")


def invite_accept(*, user: AbstractBaseUser, raw: str) -> Membership:
    """Join the invite's group with its role. A use is taken with a compare-and-set, so a
    single-use link admits one person however many open it at once; a member who opens it
    again is told so and takes no use."""
    invite = invite_get_by_token(raw=raw)
    now = timezone.now()
    try:
        with transaction.atomic():
            if Membership.objects.filter(group_id=invite.group_id, user=user).exists():
                raise InvalidTransition(
                    f"You are already a member of {invite.group.name}.", code="already_member"
                )
            taken = Invite.objects.filter(
                id=invite.id, revoked_at=None, expires_at__gt=now, uses__lt=F("max_uses")
            ).update(uses=F("uses") + 1)
            if taken != 1:
                raise _invite_refusal(Invite.objects.get(id=invite.id), now)
            membership = Membership.objects.create(
                group_id=invite.group_id, user=user, role=invite.role
            )
            event_append(
                group_id=invite.group_id,
                kind="member.added",
                actor_id=user.pk,
                payload={
                    "user_id": user.pk,
                    "username": user.get_username(),
                    "role": invite.role,
                    "invite_id": invite.id,
                },
            )
    except IntegrityError:  # joined by another path at the same moment
        raise InvalidTransition(
            f"You are already a member of {invite.group.name}.", code="already_member"
        ) from None
    return membership


def invite_revoke(*, actor: AbstractBaseUser, invite: Invite) -> Invite:
    require_role(user=actor, group_id=invite.group_id, role=Role.OWNER)
    now = timezone.now()
    with transaction.atomic():
        if Invite.objects.filter(id=invite.id, revoked_at=None).update(revoked_at=now) != 1:
            raise InvalidTransition("This invite link is already revoked.", code="already_revoked")
        event_append(
            group_id=invite.group_id,
            kind="invite.revoked",
            actor_id=actor.pk,
            payload={"invite_id": invite.id},
        )
    invite.revoked_at = now
    return invite


def _login_keys(*, username: str, client: str) -> list[str]:
    name = hashlib.sha256(username.strip().lower().encode()).hexdigest()
    return [f"claw:login:user:{name}", f"claw:login:addr:{client}"]


def _login_lock_remaining(keys: list[str]) -> float:
    now = time.time()
    until = max((cache.get(f"{key}:locked-until") or 0 for key in keys), default=0)
    return max(until - now, 0)


def user_authenticate(
    *, request, username: str, password: str, client: str
) -> AbstractBaseUser | None:
    """Django's authenticate(), throttled: after too many failures for a username, or from
    a client address, every attempt (the right password too) is refused with `throttled`
    until the lock ends. A success clears the username's count; the address's count stays,
    or one valid account would reset a spray across many others."""
    user_key, address_key = keys = _login_keys(username=username, client=client)
    remaining = _login_lock_remaining(keys)
    if remaining > 0:
        minutes = math.ceil(remaining / 60)
        raise Throttled(
            f"Too many failed sign-in attempts; try again in {minutes} "
            f"minute{'s' if minutes != 1 else ''}.",
            details={"retry_after_s": math.ceil(remaining)},
        )
    user = authenticate(request, username=username, password=password)
    if user is not None:
        cache.delete_many([user_key, f"{user_key}:locked-until"])
        return user
    for key, allowed in (
        (user_key, LOGIN_FAILURES_PER_USERNAME),
        (address_key, LOGIN_FAILURES_PER_ADDRESS),
    ):
        cache.add(key, 0, timeout=LOGIN_FAILURE_WINDOW_S)
        try:
            failures = cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.set(key, failures := 1, timeout=LOGIN_FAILURE_WINDOW_S)
        if failures >= allowed:
            cache.set(f"{key}:locked-until", time.time() + LOGIN_LOCK_S, timeout=LOGIN_LOCK_S)
            cache.delete(key)
    return None
