"""claw.pg: the gateway's reads on the event loop, against the real PostgreSQL."""

import asyncio

import pytest
from django.db import connection

from claw.pg import LoopReader

pytestmark = [pytest.mark.postgres, pytest.mark.django_db(transaction=True)]


def terminate(pids: set[int]) -> None:
    try:
        with connection.cursor() as cursor:
            for pid in pids:
                cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    finally:
        connection.close()  # this thread's own connection


def test_it_reads_on_the_loop_and_reconnects_when_the_server_drops_it():
    reader = LoopReader()
    assert reader.available

    async def scenario() -> list:
        try:
            first = await reader.fetchone("SELECT pg_backend_pid(), %s::int + 1", [41])
            # Round robin: every slot's connection, then the first one again.
            pids = {(await reader.fetchone("SELECT pg_backend_pid()", []))[0] for _ in range(4)}
            await asyncio.to_thread(terminate, pids)
            after = [await reader.fetchone("SELECT pg_backend_pid()", []) for _ in range(4)]
            return [first, pids, after]
        finally:
            await reader.close()

    first, pids, after = asyncio.run(scenario())

    assert first[1] == 42
    assert first[0] in pids and len(pids) == 4
    assert all(row[0] not in pids for row in after)  # each slot came back on a new connection


def test_a_missing_row_is_none():
    async def scenario():
        reader = LoopReader()
        try:
            return await reader.fetchone("SELECT 1 WHERE false", [])
        finally:
            await reader.close()

    assert asyncio.run(scenario()) is None
