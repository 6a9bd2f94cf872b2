"""Answers that carry a secret shown once (a personal token, a pairing code, a device
token, an invite link) are never stored by a cache or the browser: Cache-Control: no-store."""

import re

from tests.test_api_support import body, client_for, send


def assert_no_store(response, status: int) -> None:
    assert response.status_code == status, response.content
    assert "no-store" in response["Cache-Control"]


def test_the_page_showing_a_new_token_is_not_stored(personas):
    response = client_for(personas.member).post("/me/tokens/", {"name": "laptop"})

    assert_no_store(response, 200)
    assert "clawp_" in response.content.decode()


def test_the_page_showing_a_pairing_code_is_not_stored(personas):
    response = client_for(personas.owner).post("/g/research/pairing-codes/")

    assert_no_store(response, 200)
    assert "claw device pair" in response.content.decode()


def test_the_page_showing_a_new_invite_link_and_the_link_itself_are_not_stored(personas):
    client = client_for(personas.owner)
    response = client.post("/g/research/invites/", {"role": "member", "max_uses": 1})
    assert_no_store(response, 200)

    link = re.search(r"https?://testserver(/invite/[^/\"<]+/)", response.content.decode())
    assert_no_store(client_for(personas.outsider).get(link.group(1)), 200)


def test_api_answers_with_a_token_or_code_are_not_stored(personas):
    client = client_for(personas.owner)
    created = send(client, "POST", "/me/tokens", {"name": "ci"})
    assert_no_store(created, 201)

    code = send(client, "POST", "/groups/research/pairing-codes")
    assert_no_store(code, 201)

    paired = send(client_for(), "POST", "/devices/pair", {"code": body(code)["code"], "name": "b"})
    assert_no_store(paired, 201)
