"""Invite links: owners create them (role, 7-day expiry, N uses, revocable), the token is
stored hashed and shown once, and /invite/<token>/ lets a signed-in person join."""

import re
from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from apps.events.models import Event
from apps.groups.models import Invite, Membership, Role
from apps.groups.services import invite_accept, invite_create, invite_revoke
from claw.errors import Forbidden, InvalidInput, InvalidTransition, NotFound
from claw.tokens import token_hash
from tests.conftest import make_user

pytestmark = pytest.mark.django_db


def link_token(response) -> str:
    return re.search(r"/invite/(clawi_[^/\"]+)/", response.content.decode()).group(1)


# --- services -----------------------------------------------------------------------------


def test_an_invite_stores_only_the_hash_and_expires_in_seven_days(personas):
    invite, raw = invite_create(actor=personas.owner, group=personas.group, role=Role.APPROVER)
    assert raw.startswith("clawi_") and invite.token_hash == token_hash(raw)
    assert raw not in str(Invite.objects.filter(id=invite.id).values().get())
    assert abs(invite.expires_at - (timezone.now() + timedelta(days=7))) < timedelta(minutes=1)
    event = Event.objects.filter(group=personas.group).order_by("-seq").first()
    assert event.kind == "invite.created" and raw not in str(event.payload)


@pytest.mark.parametrize("persona", ["approver", "member", "viewer"])
def test_only_owners_create_or_revoke_invites(personas, persona):
    actor = getattr(personas, persona)
    with pytest.raises(Forbidden):
        invite_create(actor=actor, group=personas.group)
    invite, _ = invite_create(actor=personas.owner, group=personas.group)
    with pytest.raises(Forbidden):
        invite_revoke(actor=actor, invite=invite)
    with pytest.raises(NotFound):
        invite_create(actor=personas.outsider, group=personas.group)


@pytest.mark.parametrize(
    "kwargs", [{"role": "king"}, {"max_uses": 0}, {"max_uses": 1001}, {"max_uses": True}]
)
def test_invalid_invites_are_refused(personas, kwargs):
    with pytest.raises(InvalidInput):
        invite_create(actor=personas.owner, group=personas.group, **kwargs)


def test_a_single_use_invite_admits_one_person(personas):
    _, raw = invite_create(actor=personas.owner, group=personas.group, role=Role.VIEWER)
    first, second = make_user("first"), make_user("second")
    membership = invite_accept(user=first, raw=raw)
    assert (membership.group_id, membership.role) == (personas.group.id, Role.VIEWER)
    with pytest.raises(InvalidTransition) as refused:
        invite_accept(user=second, raw=raw)
    assert refused.value.code == "invite_used"
    assert not Membership.objects.filter(user=second).exists()
    event = Event.objects.filter(group=personas.group, kind="member.added").get()
    assert event.actor_id == first.pk and event.payload["role"] == "viewer"


def test_an_n_use_invite_admits_n_people(personas):
    invite, raw = invite_create(actor=personas.owner, group=personas.group, max_uses=3)
    for i in range(3):
        invite_accept(user=make_user(f"u{i}"), raw=raw)
    with pytest.raises(InvalidTransition):
        invite_accept(user=make_user("u3"), raw=raw)
    assert Invite.objects.get(id=invite.id).uses == 3


def test_members_accepting_again_take_no_use(personas):
    invite, raw = invite_create(actor=personas.owner, group=personas.group)
    with pytest.raises(InvalidTransition) as refused:
        invite_accept(user=personas.member, raw=raw)
    assert refused.value.code == "already_member"
    assert Invite.objects.get(id=invite.id).uses == 0


def test_expired_and_revoked_invites_are_refused(personas):
    _, raw = invite_create(actor=personas.owner, group=personas.group)
    with time_machine.travel(timezone.now() + timedelta(days=7, seconds=1)):
        with pytest.raises(InvalidTransition) as refused:
            invite_accept(user=make_user("late"), raw=raw)
    assert refused.value.code == "invite_expired"

    invite, raw = invite_create(actor=personas.owner, group=personas.group)
    invite_revoke(actor=personas.owner, invite=invite)
    with pytest.raises(InvalidTransition) as refused:
        invite_accept(user=make_user("refused"), raw=raw)
    assert refused.value.code == "invite_revoked"
    with pytest.raises(InvalidTransition):
        invite_revoke(actor=personas.owner, invite=invite)
    with pytest.raises(NotFound):
        invite_accept(user=make_user("guesser"), raw="clawi_not-a-token")


# --- pages --------------------------------------------------------------------------------


def test_an_owner_creates_a_link_shown_once(client, personas):
    client.force_login(personas.owner)
    response = client.post("/g/research/invites/", {"role": "approver", "max_uses": "2"})
    assert response.status_code == 200
    raw = link_token(response)
    assert 'id="new-invite-link"' in response.content.decode()
    assert f"http://testserver/invite/{raw}/" in response.content.decode()
    invite = Invite.objects.get(group=personas.group)
    assert (invite.role, invite.max_uses, invite.token_hash) == ("approver", 2, token_hash(raw))
    page = client.get("/g/research/members/").content.decode()
    assert raw not in page and f'id="invite-{invite.id}"' in page


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"role": "king", "max_uses": "1"}, "Select a valid choice"),
        ({"role": "member", "max_uses": "0"}, "greater than or equal to 1"),
        ({"role": "member", "max_uses": "many"}, "Enter a whole number"),
    ],
)
def test_invite_form_errors_are_explained(client, personas, data, message):
    client.force_login(personas.owner)
    response = client.post("/g/research/invites/", data)
    assert response.status_code == 400 and message in response.content.decode()
    assert not Invite.objects.exists()


@pytest.mark.parametrize("persona", ["approver", "member", "viewer"])
def test_non_owners_cannot_create_or_revoke_links(client, personas, persona):
    invite, _ = invite_create(actor=personas.owner, group=personas.group)
    client.force_login(getattr(personas, persona))
    assert (
        client.post("/g/research/invites/", {"role": "owner", "max_uses": "1"}).status_code == 403
    )
    assert client.post(f"/g/research/invites/{invite.id}/revoke/").status_code == 403
    assert Invite.objects.count() == 1 and Invite.objects.get().revoked_at is None


def test_outsiders_cannot_create_or_revoke_links(client, personas):
    invite, _ = invite_create(actor=personas.owner, group=personas.group)
    client.force_login(personas.outsider)
    assert (
        client.post("/g/research/invites/", {"role": "member", "max_uses": "1"}).status_code == 404
    )
    assert client.post(f"/g/research/invites/{invite.id}/revoke/").status_code == 404
    # Their own group's URL does not reach another group's invite either.
    assert client.post(f"/g/elsewhere/invites/{invite.id}/revoke/").status_code == 404


def test_owners_revoke_links_from_the_members_page(client, personas):
    invite, raw = invite_create(actor=personas.owner, group=personas.group)
    client.force_login(personas.owner)
    assert client.post(f"/g/research/invites/{invite.id}/revoke/").status_code == 302
    assert Invite.objects.get(id=invite.id).revoked_at is not None
    client.force_login(make_user("newcomer"))
    response = client.get(f"/invite/{raw}/")
    assert response.status_code == 410 and "revoked" in response.content.decode()


def test_accepting_asks_to_sign_in_first_then_joins_with_a_button(client, personas):
    _, raw = invite_create(actor=personas.owner, group=personas.group, role=Role.APPROVER)
    response = client.get(f"/invite/{raw}/")
    assert response.status_code == 302 and response.url == f"/login/?next=/invite/{raw}/"
    newcomer = make_user("newcomer")
    client.force_login(newcomer)
    page = client.get(f"/invite/{raw}/")
    assert page.status_code == 200 and 'id="invite-accept"' in page.content.decode()
    assert not Membership.objects.filter(user=newcomer).exists()  # GET changes nothing
    response = client.post(f"/invite/{raw}/")
    assert response.status_code == 302 and response.url == "/g/research/"
    assert Membership.objects.get(user=newcomer, group=personas.group).role == "approver"
    assert client.get("/g/research/").status_code == 200


def test_a_used_expired_or_unknown_link_says_why(client, personas):
    _, raw = invite_create(actor=personas.owner, group=personas.group)
    client.force_login(make_user("first"))
    client.post(f"/invite/{raw}/")
    client.force_login(make_user("second"))
    response = client.post(f"/invite/{raw}/")
    assert response.status_code == 409 and "already used" in response.content.decode()
    assert client.get(f"/invite/{raw}/").status_code == 410

    _, raw = invite_create(actor=personas.owner, group=personas.group)
    with time_machine.travel(timezone.now() + timedelta(days=8)):
        response = client.get(f"/invite/{raw}/")
        assert response.status_code == 410 and "expired" in response.content.decode()
        assert client.post(f"/invite/{raw}/").status_code == 409
    assert client.get("/invite/clawi_nope/").status_code == 404


def test_a_member_opening_a_link_is_taken_to_the_group(client, personas):
    invite, raw = invite_create(actor=personas.owner, group=personas.group)
    client.force_login(personas.viewer)
    assert 'id="invite-already"' in client.get(f"/invite/{raw}/").content.decode()
    response = client.post(f"/invite/{raw}/")
    assert response.status_code == 302 and response.url == "/g/research/"
    assert Invite.objects.get(id=invite.id).uses == 0
    assert Membership.objects.get(user=personas.viewer, group=personas.group).role == "viewer"
