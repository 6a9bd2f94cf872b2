"""Checkpoints: pauses that need a human decision."""

from datetime import datetime
from typing import Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema

from apps.checkpoints.models import (
    CheckpointKind,
    CheckpointSource,
    CheckpointStatus,
    ExpiryAction,
    Verdict,
)
from apps.checkpoints.selectors import checkpoint_get_for_user, checkpoints_for_group
from apps.checkpoints.services import checkpoint_decide
from apps.groups.api import InSchema
from apps.groups.models import Role
from apps.groups.selectors import group_get_for_user
from apps.tasks.planner import plan_edit
from claw.schema import Id, NonNegative

router = Router()


class CheckpointFilters(Schema):
    status: CheckpointStatus | None = None
    limit: int = Field(50, ge=1, le=200)
    offset: NonNegative = 0


class CheckpointOut(Schema):
    id: int
    task_id: int | None
    attempt_id: int | None
    source: CheckpointSource
    kind: CheckpointKind
    title: str
    details: str
    options: list[str]
    required_approvals: int
    decider_role: Role
    expires_at: datetime | None
    expiry_action: ExpiryAction
    status: CheckpointStatus
    created_at: datetime
    resolved_at: datetime | None
    proposal: dict[str, Any] | None = Field(
        None, description="A plan checkpoint's proposed tasks (kind plan)."
    )


class CheckpointPage(Schema):
    count: int
    limit: int
    offset: int
    items: list[CheckpointOut]


class DecisionOut(Schema):
    user_id: int
    username: str
    verdict: Verdict
    option: str
    note: str
    created_at: datetime

    @staticmethod
    def resolve_username(obj) -> str:
        return obj.user.get_username()


class CheckpointDetailOut(CheckpointOut):
    decisions: list[DecisionOut]

    @staticmethod
    def resolve_decisions(obj) -> list:
        return list(obj.decisions.all())


class DecideIn(InSchema):
    verdict: Verdict
    note: str = Field("", max_length=5000)
    option: str = Field("", max_length=100, description="With approve: one of the options.")
    assign_to: Id | None = Field(None, description="With option reassign: an agent id.")


@router.get("/groups/{slug}/checkpoints", response=CheckpointPage)
def checkpoint_list(request: HttpRequest, slug: str, filters: Query[CheckpointFilters]):
    group = group_get_for_user(user=request.auth, slug=slug)
    checkpoints = checkpoints_for_group(group=group, status=filters.status)
    return {
        "count": checkpoints.count(),
        "limit": filters.limit,
        "offset": filters.offset,
        "items": checkpoints[filters.offset : filters.offset + filters.limit],
    }


@router.get("/checkpoints/{int:checkpoint_id}", response=CheckpointDetailOut)
def checkpoint_detail(request: HttpRequest, checkpoint_id: Id):
    return checkpoint_get_for_user(user=request.auth, checkpoint_id=checkpoint_id)


@router.post("/checkpoints/{int:checkpoint_id}/decide", response=CheckpointDetailOut)
def checkpoint_decide_view(request: HttpRequest, checkpoint_id: Id, payload: DecideIn):
    """Approve, reject or request changes; needs the checkpoint's decider_role."""
    checkpoint = checkpoint_get_for_user(user=request.auth, checkpoint_id=checkpoint_id)
    checkpoint_decide(
        actor=request.auth,
        checkpoint=checkpoint,
        verdict=payload.verdict,
        note=payload.note,
        option=payload.option,
        assign_to=payload.assign_to,
    )
    return checkpoint_get_for_user(user=request.auth, checkpoint_id=checkpoint_id)


class ProposalIn(InSchema):
    proposal: dict[str, Any] = Field(
        description='{"summary", "tasks": [{"key", "title", "instructions", '
        '"required_toolkits", "depends_on", "acceptance_criteria"}]}'
    )


@router.put("/checkpoints/{int:checkpoint_id}/proposal", response=CheckpointDetailOut)
def checkpoint_proposal_edit(request: HttpRequest, checkpoint_id: Id, payload: ProposalIn):
    """Replace a pending plan's proposal (member+); it is validated again (known toolkits,
    dependencies by key or index, no cycles, at most 50 tasks). Refused once someone
    decided on the plan."""
    checkpoint = checkpoint_get_for_user(user=request.auth, checkpoint_id=checkpoint_id)
    plan_edit(actor=request.auth, checkpoint=checkpoint, proposal=payload.proposal)
    return checkpoint_get_for_user(user=request.auth, checkpoint_id=checkpoint_id)
