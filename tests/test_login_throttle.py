"""Signing in is throttled per username and per client address: after too many failures
every attempt, the right password too, is refused with a clear "try again in N minutes"."""

import time_machine
from django.test import Client

from apps.groups.services import (
    LOGIN_FAILURES_PER_ADDRESS,
    LOGIN_FAILURES_PER_USERNAME,
    LOGIN_LOCK_S,
)
from tests.conftest import make_user


def sign_in(username: str, password: str, *, address: str = "198.51.100.7"):
    return Client().post(
        "/login/", {"username": username, "password": password}, REMOTE_ADDR=address
    )


def signed_in(response) -> bool:
    return response.status_code == 302 and not response.url.startswith("/login/")


def test_the_right_password_signs_in(personas):
    assert signed_in(sign_in("member", "pw-member"))


def test_wrong_passwords_lock_the_username_and_then_the_right_one_is_refused(personas):
    for _ in range(LOGIN_FAILURES_PER_USERNAME):
        response = sign_in("member", "wrong")
        assert response.status_code == 200
        assert "did not match" in response.content.decode()

    response = sign_in("member", "pw-member")

    assert response.status_code == 429
    assert "Too many failed sign-in attempts; try again in 15 minutes." in response.content.decode()
    assert int(response["Retry-After"]) == LOGIN_LOCK_S
    assert "_auth_user_id" not in response.wsgi_request.session


def test_the_lock_is_per_username_whatever_the_address(personas):
    for n in range(LOGIN_FAILURES_PER_USERNAME):
        sign_in("Member", "wrong", address=f"203.0.113.{n}")

    assert sign_in("member", "pw-member", address="192.0.2.1").status_code == 429
    assert signed_in(sign_in("viewer", "pw-viewer", address="192.0.2.1"))


def test_many_usernames_from_one_address_lock_that_address(personas):
    for n in range(LOGIN_FAILURES_PER_ADDRESS):
        sign_in(f"guess{n}", "wrong", address="198.51.100.9")

    assert sign_in("viewer", "pw-viewer", address="198.51.100.9").status_code == 429
    assert signed_in(sign_in("viewer", "pw-viewer", address="198.51.100.10"))


def test_the_lock_ends_and_the_minutes_left_count_down(personas):
    with time_machine.travel(0, tick=False) as clock:
        for _ in range(LOGIN_FAILURES_PER_USERNAME):
            sign_in("member", "wrong")
        clock.shift(LOGIN_LOCK_S - 61)
        response = sign_in("member", "pw-member")
        assert "try again in 2 minutes" in response.content.decode()
        clock.shift(62)
        assert signed_in(sign_in("member", "pw-member"))


def test_a_success_clears_the_usernames_failures(personas):
    for _ in range(LOGIN_FAILURES_PER_USERNAME - 1):
        sign_in("member", "wrong")
    assert signed_in(sign_in("member", "pw-member"))
    for _ in range(LOGIN_FAILURES_PER_USERNAME - 1):
        sign_in("member", "wrong")

    assert signed_in(sign_in("member", "pw-member"))


def test_the_admin_sign_in_is_throttled_too(db):
    make_user("root").__class__.objects.filter(username="root").update(
        is_staff=True, is_superuser=True
    )
    for _ in range(LOGIN_FAILURES_PER_USERNAME):
        Client().post("/admin/login/", {"username": "root", "password": "wrong"})

    response = Client().post("/admin/login/", {"username": "root", "password": "pw-root"})

    assert response.status_code == 200 and "Too many failed sign-in attempts" in (
        response.content.decode()
    )
