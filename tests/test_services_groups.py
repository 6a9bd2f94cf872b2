import pytest

from apps.events.models import Event
from apps.groups.models import Group, Membership, Role
from apps.groups.services import (
    api_token_authenticate,
    api_token_create,
    api_token_revoke,
    group_create,
    group_update_policies,
    membership_add,
    membership_remove,
    membership_set_role,
)
from claw.errors import Forbidden, InvalidInput, InvalidTransition, NotFound
from tests.conftest import make_user


def test_the_creator_becomes_the_owner(db):
    user = make_user("founder")
    group = group_create(user=user, name="Launch Team", heartbeat_interval_s=5, lease_timeout_s=20)
    assert group.slug == "launch-team"
    assert Membership.objects.get(group=group, user=user).role == Role.OWNER
    assert Event.objects.get(group=group).kind == "group.created"


def test_a_taken_slug_is_a_clear_error(personas):
    with pytest.raises(InvalidInput) as exc:
        group_create(user=personas.owner, name="Research")
    assert exc.value.code == "slug_taken"


@pytest.mark.parametrize(
    "policies",
    [
        {"heartbeat_interval_s": 0},
        {"lease_timeout_s": 5, "heartbeat_interval_s": 10},
        {"max_attempts": 101},
        {"default_checkpoint_policy": "sometimes"},
        {"colour": "blue"},
    ],
)
def test_bad_policies_are_rejected(personas, policies):
    with pytest.raises(InvalidInput):
        group_update_policies(actor=personas.owner, group=personas.group, **policies)
    personas.group.refresh_from_db()
    assert personas.group.lease_timeout_s == 30


def test_only_owners_change_policies(personas):
    group_update_policies(actor=personas.owner, group=personas.group, max_attempts=5)
    with pytest.raises(Forbidden):
        group_update_policies(actor=personas.approver, group=personas.group, max_attempts=1)
    assert Group.objects.get(id=personas.group.id).max_attempts == 5


def test_owners_manage_members_and_approvers_cannot(personas):
    newcomer = make_user("newcomer")
    membership_add(actor=personas.owner, group=personas.group, user=newcomer, role=Role.VIEWER)
    membership_set_role(actor=personas.owner, group=personas.group, user=newcomer, role="member")
    with pytest.raises(Forbidden):
        membership_set_role(
            actor=personas.approver, group=personas.group, user=newcomer, role="owner"
        )
    with pytest.raises(NotFound):
        membership_add(actor=personas.outsider, group=personas.group, user=newcomer, role="owner")
    assert Membership.objects.get(user=newcomer, group=personas.group).role == Role.MEMBER


def test_adding_a_member_twice_is_a_clear_error(personas):
    with pytest.raises(InvalidTransition) as exc:
        membership_add(
            actor=personas.owner, group=personas.group, user=personas.viewer, role="member"
        )
    assert exc.value.code == "already_member"


def test_a_group_keeps_its_last_owner(personas):
    with pytest.raises(InvalidTransition) as exc:
        membership_set_role(
            actor=personas.owner, group=personas.group, user=personas.owner, role="viewer"
        )
    assert exc.value.code == "last_owner"
    with pytest.raises(InvalidTransition):
        membership_remove(actor=personas.owner, group=personas.group, user=personas.owner)


def test_members_can_leave_but_not_remove_others(personas):
    with pytest.raises(Forbidden):
        membership_remove(actor=personas.viewer, group=personas.group, user=personas.member)
    membership_remove(actor=personas.viewer, group=personas.group, user=personas.viewer)
    assert not Membership.objects.filter(user=personas.viewer, group=personas.group).exists()


def test_api_tokens_are_stored_hashed_and_can_be_revoked(personas):
    token, raw = api_token_create(user=personas.member, name="laptop")
    assert raw.startswith("clawp_")
    assert raw not in token.token_hash and token.token_hash != raw
    assert api_token_authenticate(raw=raw) == personas.member
    assert api_token_authenticate(raw=raw + "x") is None
    api_token_revoke(user=personas.member, token_id=token.id)
    assert api_token_authenticate(raw=raw) is None
    with pytest.raises(NotFound):
        api_token_revoke(user=personas.member, token_id=token.id)


def test_nobody_revokes_someone_elses_token(personas):
    token, raw = api_token_create(user=personas.member, name="mine")
    with pytest.raises(NotFound):
        api_token_revoke(user=personas.owner, token_id=token.id)
    assert api_token_authenticate(raw=raw) == personas.member
