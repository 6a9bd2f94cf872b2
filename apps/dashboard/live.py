"""The contract between the page socket and the pages it keeps live.

Every dashboard page opens one websocket: `/ws/live/?page=NAME&group=SLUG[&task=ID]`
(session auth, origin checked). The page renders `data-seq` = the group's event_seq at render
time and, on every (re)connect, sends `{"type": "resume", "after": SEQ}` with the highest seq
it has shown. From then on the consumer (apps.dashboard.consumers.LivePageConsumer):

- loads the group's events after that seq from the database (the truth; the channel layer
  only says "something happened"), at most RESYNC_AFTER of them;
- coalesces bursts: it renders at most once per COALESCE_SECONDS, whatever arrived;
- calls the page's renderer once with those events (or with `resync=True` and no events
  when the gap is too big, so the renderer redraws everything it shows);
- sends the returned fragments as one text frame. Each fragment carries an `id` and
  `hx-swap-oob` (replace by id, or `beforeend:#list` for append-only streams with ids on
  each row), so a duplicate is harmless and htmx swaps it in.

The navigation's approvals badge (`#approvals-badge`) is rendered by the consumer itself
whenever a checkpoint.* event arrives in any group of the user's, and the model backend's
banner (`#backend-banner`) whenever an `llm.backend` event arrives in the page's group.

A page may also follow channel-layer groups that are not a Claw group (`follows`): a
`{"type": "live.redraw"}` message there redraws it as on a resync. The Model page follows
the backend probe that way (every probe is not an event in every group's log).

A renderer is registered with `@live_page("name")` in the module that owns the page. It
runs in a worker thread (sync ORM is fine) and must keep its query count independent of
the number of events and tasks.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlencode

from django.contrib.auth.models import AbstractBaseUser

from apps.events.models import Event
from apps.groups.models import Group

COALESCE_SECONDS = 0.05
RESYNC_AFTER = 500
# Event kinds that may change which checkpoints a person can decide (the approvals badge
# and inbox): the checkpoint's own events, role changes, and cancelled tasks (their
# checkpoints go too); and an edited plan, which the inbox shows.
BADGE_KINDS = ("checkpoint.", "member.", "task.cancelled", "plan.edited")


@dataclass
class LiveContext:
    user: AbstractBaseUser
    group: Group
    role: str
    # Query parameters of the socket URL other than page and group (e.g. {"task": "12"}).
    params: dict[str, str]
    # New events since the last render, in seq order; empty on resync.
    events: list[Event] = field(default_factory=list)
    resync: bool = False

    def touches(self, kinds: tuple[str, ...]) -> bool:
        """A resync, or an event of one of these kinds (prefixes): worth a redraw."""
        return self.resync or any(event.kind.startswith(kinds) for event in self.events)


LiveRenderer = Callable[[LiveContext], list[str]]

PAGES: dict[str, LiveRenderer] = {}
# Socket URL parameters a page needs, each a positive integer id (e.g. the task page's task).
PAGE_PARAMS: dict[str, tuple[str, ...]] = {}
# Channel-layer groups a page's socket joins besides its Claw groups (see `follows` above).
PAGE_FOLLOWS: dict[str, tuple[str, ...]] = {}


def live_page(
    name: str, *, params: tuple[str, ...] = (), follows: tuple[str, ...] = ()
) -> Callable[[LiveRenderer], LiveRenderer]:
    def register(renderer: LiveRenderer) -> LiveRenderer:
        if name in PAGES:
            raise ValueError(f"live page {name!r} is registered twice")
        PAGES[name] = renderer
        PAGE_PARAMS[name] = params
        PAGE_FOLLOWS[name] = follows
        return renderer

    return register


def live_context(*, page: str, group: Group, **params: object) -> dict:
    """Template context for a live page: the socket URL and the seq the page is rendered at.
    Call it before reading what the page shows, so nothing committed in between is missed
    (a duplicate is harmless; a gap is not)."""
    if page not in PAGES:
        raise ValueError(f"no live page {page!r}")
    seq = Group.objects.filter(id=group.id).values_list("event_seq", flat=True)[0]
    query = urlencode({"page": page, "group": group.slug, **params})
    return {"live_url": f"/ws/live/?{query}", "live_seq": seq}
