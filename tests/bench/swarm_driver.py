"""One driver process of the swarm benchmark: many agents on one asyncio loop, each with
its own websocket, written from docs/protocol.md alone (no claw imports): hello, accept
every offer at once, 50-200 ms of simulated work, an optional progress frame, complete;
heartbeats at the welcome's interval with +-10 % jitter; on a dropped connection reconnect
with exponential backoff (1 s doubling to 60 s, full jitter), reconcile with the welcome's
`owned` and resend unanswered frames with their ids.

Every frame of interest is recorded as a JSON line (wall clock times) in the file the config
names, flushed every 0.25 s, so a driver killed with -9 leaves what it saw before.

    python -m tests.bench.swarm_driver CONFIG.json
"""

import asyncio
import contextlib
import json
import random
import signal
import sys
import time

RETRY_CODES = {"internal_error", "rate_limited"}


class Recorder:
    def __init__(self, path: str) -> None:
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.lines: list[str] = []

    def __call__(self, kind: str, **fields) -> None:
        self.lines.append(json.dumps({"k": kind, **fields}))

    def flush(self) -> None:
        if self.lines:
            self.file.write("\n".join(self.lines) + "\n")
            self.lines.clear()
            self.file.flush()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            self.flush()

    def close(self) -> None:
        self.flush()
        self.file.close()


class Agent:
    def __init__(self, spec: dict, config: dict, record: Recorder, gate: asyncio.Semaphore):
        self.name, self.token = spec["name"], spec["token"]
        self.url, self.config, self.record, self.gate = config["url"], config, record, gate
        self.ws = None
        self.counter = 0
        self.pending: dict[str, tuple[str, asyncio.Future]] = {}  # id -> (text, answer)
        self.live: dict[int, asyncio.Task] = {}  # attempt id -> its work
        self.welcomed = asyncio.Event()
        self.stopping = False

    def _id(self, kind: str) -> str:
        self.counter += 1
        return f"{self.name}.{kind}.{self.counter}"

    async def _send_text(self, text: str) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.send(text)

    async def request(self, kind: str, **fields) -> tuple[dict, float]:
        """Send an effectful frame; kept (and resent after a reconnect) until answered.
        Returns (answer, its arrival time)."""
        frame_id = self._id(kind)
        text = json.dumps({"type": kind, "id": frame_id, **fields})
        future = asyncio.get_running_loop().create_future()
        self.pending[frame_id] = (text, future)
        await self._send_text(text)
        return await future

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            await self._send_text(json.dumps({"type": "heartbeat", "id": self._id("hb")}))

    async def _work(self, assignment: dict, arrived: float) -> None:
        attempt, epoch = assignment["attempt_id"], assignment["epoch"]
        task_id = assignment["task"]["id"]
        ids = {"attempt_id": attempt, "epoch": epoch}
        try:
            if assignment["status"] == "offered":
                sent = time.time()
                answer, at = await self.request("accept", **ids)
                code = answer.get("code", "ok") if answer["type"] == "error" else "ok"
                self.record(
                    "accept", agent=self.name, attempt=attempt, sent=sent, ack=at, code=code
                )
                if code != "ok":
                    return
            low, high = self.config["work_ms"]
            await asyncio.sleep(random.uniform(low, high) / 1000)
            if self.config.get("progress"):
                data = {"note": "half way"}
                await self.request("progress", seq=1, kind="log", data=data, **ids)
            sent = time.time()
            answer, at = await self.request("complete", result={"by": self.name}, **ids)
            code = answer.get("code", "ok") if answer["type"] == "error" else "ok"
            self.record(
                "complete", agent=self.name, attempt=attempt, task=task_id, sent=sent, ack=at,
                code=code, status=(answer.get("result") or {}).get("status"),
            )  # fmt: skip
        finally:
            self.live.pop(attempt, None)

    def _offer(self, assignment: dict, arrived: float, source: str) -> None:
        attempt = assignment["attempt_id"]
        self.record(
            "offer", agent=self.name, attempt=attempt, task=assignment["task"]["id"],
            epoch=assignment["epoch"], status=assignment["status"], t=arrived, source=source,
            busy=len(self.live) >= self.config["capacity"], known=attempt in self.live,
        )  # fmt: skip
        if attempt not in self.live:
            self.live[attempt] = asyncio.create_task(self._work(assignment, arrived))

    async def _answered(self, frame: dict, arrived: float) -> None:
        entry = self.pending.get(frame.get("re"))
        if entry is None:
            return
        text, future = entry
        if frame["type"] == "error" and frame.get("code") in RETRY_CODES:
            self.record("retry", agent=self.name, code=frame["code"], t=arrived)
            asyncio.get_running_loop().call_later(
                0.5, lambda: asyncio.ensure_future(self._send_text(text))
            )
            return
        del self.pending[frame["re"]]
        if not future.done():
            future.set_result((frame, arrived))

    async def _session(self) -> None:
        from websockets.asyncio.client import connect

        async with self.gate:
            started = time.time()
            self.ws = await connect(
                self.url,
                additional_headers={"Authorization": f"Bearer {self.token}"},
                open_timeout=20,
                close_timeout=2,
                ping_interval=None,
                proxy=None,
            )
            hello = {
                "type": "hello",
                "id": self._id("hello"),
                "versions": [1],
                "agent": {
                    "name": self.name,
                    "toolkits": {"shell": "1.0"},
                    "capacity": self.config["capacity"],
                    "client_version": "swarm-bench",
                },
            }
            await self.ws.send(json.dumps(hello))
            early = []
            async with asyncio.timeout(20):
                while True:
                    frame = json.loads(await self.ws.recv())
                    if frame["type"] == "welcome":
                        break
                    if frame["type"] == "error":
                        raise ConnectionError(f"{frame.get('code')}: {frame.get('message')}")
                    early.append((frame, time.time()))
        now = time.time()
        owned = {a["attempt_id"]: a for a in frame["owned"]}
        self.record(
            "welcome", agent=self.name, agent_id=frame["agent_id"], t=now, took=now - started,
            owned=len(owned),
        )  # fmt: skip
        for attempt, work in list(self.live.items()):  # drop what the server no longer gives us
            if attempt not in owned:
                work.cancel()
                self.live.pop(attempt, None)
                self.record("dropped", agent=self.name, attempt=attempt, t=now)
        for assignment in owned.values():
            self._offer(assignment, now, "welcome")
        for text, _ in list(self.pending.values()):
            await self._send_text(text)
        self.welcomed.set()
        beats = asyncio.create_task(self._heartbeats(frame["heartbeat_interval_s"]))
        try:
            for early_frame, at in early:
                await self._dispatch(early_frame, at)
            async for text in self.ws:
                await self._dispatch(json.loads(text), time.time())
        finally:
            beats.cancel()

    async def _dispatch(self, frame: dict, arrived: float) -> None:
        kind = frame.get("type")
        if kind == "assignment":
            self._offer(frame, arrived, "push")
        elif kind in ("ack", "error") and frame.get("re") in self.pending:
            await self._answered(frame, arrived)
        elif kind == "cancel":
            work = self.live.pop(frame["attempt_id"], None)
            if work is not None:
                work.cancel()
            self.record("cancel", agent=self.name, attempt=frame["attempt_id"], t=arrived)
        elif kind == "error" and frame.get("re") is None:
            self.record("server_error", agent=self.name, code=frame.get("code"), t=arrived)

    async def run(self) -> None:
        failures = 0
        while not self.stopping:
            try:
                await self._session()
                failures = 0
                why = "closed"
            except Exception as exc:  # any drop: reconnect
                why = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                ws, self.ws = self.ws, None
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(ws.close(), 1)
            if self.stopping:
                break
            self.record("drop", agent=self.name, t=time.time(), why=why)
            failures += 1
            await asyncio.sleep(random.uniform(0, min(60.0, 2.0 ** (failures - 1))))


async def main(config: dict) -> None:
    record = Recorder(config["out"])
    gate = asyncio.Semaphore(config.get("connect_concurrency", 20))
    agents = [Agent(spec, config, record, gate) for spec in config["agents"]]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    flusher = asyncio.create_task(record.run())
    runs = [asyncio.create_task(agent.run()) for agent in agents]
    welcomed = asyncio.gather(*(agent.welcomed.wait() for agent in agents))
    await asyncio.wait(
        [asyncio.ensure_future(welcomed), asyncio.create_task(stop.wait())],
        return_when=asyncio.FIRST_COMPLETED,
    )
    if welcomed.done():
        print(f"welcomed {len(agents)}", flush=True)
    await stop.wait()
    for agent in agents:
        agent.stopping = True
        if agent.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(agent.ws.close(), 0.5)
    for run in runs:
        run.cancel()
    await asyncio.gather(*runs, return_exceptions=True)
    flusher.cancel()
    record.close()
    print("stopped", flush=True)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as handle:
        asyncio.run(main(json.load(handle)))
