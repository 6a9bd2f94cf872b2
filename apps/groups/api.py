"""/me, personal API tokens, groups and their members."""

from datetime import datetime
from typing import Any, Literal

from django.http import HttpRequest, HttpResponse
from ninja import Field, Router, Schema, Status
from pydantic import ConfigDict, model_validator

from apps.groups.models import CheckpointPolicy, DependencyFailurePolicy, ExpiryAction, Role
from apps.groups.selectors import (
    api_tokens_for_user,
    group_get_for_user,
    group_with_role_for_user,
    groups_with_role_for_user,
    member_user_get,
    members_of,
    user_get_by_username,
)
from apps.groups.services import (
    api_token_create,
    api_token_revoke,
    group_create,
    group_update_policies,
    membership_add,
    membership_remove,
    membership_set_role,
)
from claw.schema import Id

router = Router()

SLUG_PATTERN = r"^[-a-zA-Z0-9_]+$"


class InSchema(Schema):
    """Request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class ErrorOut(Schema):
    """Every error answer (claw/api.py renders them)."""

    code: str = Field(description="Stable, for programs: e.g. not_found, unknown_toolkit.")
    message: str = Field(description="For humans.")
    details: dict[str, Any] | None = Field(None, description="What the code needs, if anything.")


# --- me and tokens -----------------------------------------------------------------------


class MeOut(Schema):
    id: int
    username: str
    email: str


class TokenOut(Schema):
    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreateIn(InSchema):
    name: str = Field(min_length=1, max_length=100)


class TokenCreatedOut(TokenOut):
    token: str = Field(description="The raw token. Shown once; only its hash is stored.")


@router.get("/me", response=MeOut)
def me(request: HttpRequest):
    return request.auth


@router.get("/me/tokens", response=list[TokenOut])
def token_list(request: HttpRequest):
    return api_tokens_for_user(user=request.auth)


@router.post("/me/tokens", response={201: TokenCreatedOut})
def token_create(request: HttpRequest, payload: TokenCreateIn, response: HttpResponse):
    token, raw = api_token_create(user=request.auth, name=payload.name)
    response["Cache-Control"] = "no-store"  # the raw token, shown once
    return Status(201, TokenCreatedOut(**TokenOut.model_validate(token).model_dump(), token=raw))


@router.delete("/me/tokens/{int:token_id}", response={204: None})
def token_revoke(request: HttpRequest, token_id: Id):
    api_token_revoke(user=request.auth, token_id=token_id)
    return Status(204, None)


# --- groups ------------------------------------------------------------------------------


DeciderRole = Literal["approver", "owner"]


class GroupPolicies(InSchema):
    # Defaults are None (= "leave as is"); an explicit null is rejected.
    heartbeat_interval_s: int = Field(None, ge=1, le=600)
    lease_timeout_s: int = Field(None, ge=2, le=3600)
    max_attempts: int = Field(None, ge=1, le=100)
    reconnect_grace_s: int = Field(None, ge=0, le=3600)
    default_checkpoint_policy: CheckpointPolicy = Field(None)
    dependency_failure_policy: DependencyFailurePolicy = Field(
        None, description="What a failed or cancelled dependency does to new tasks."
    )
    checkpoint_required_approvals: int = Field(
        None, ge=1, le=20, description="Approvals a checkpoint needs, unless it sets its own."
    )
    checkpoint_decider_role: DeciderRole = Field(None, description="Who decides checkpoints.")
    checkpoint_expiry_s: int = Field(
        None, ge=0, le=30 * 86400, description="Checkpoints expire after this; 0: never."
    )
    checkpoint_expiry_action: ExpiryAction = Field(None)
    llm_token_budget: int | None = Field(
        None,
        ge=0,
        le=10**13,
        description="Model tokens the agents may use through the gateway; null: unlimited.",
    )

    def policies(self) -> dict:
        return self.model_dump(
            mode="json", exclude_unset=True, include=set(GroupPolicies.model_fields)
        )


class GroupCreateIn(GroupPolicies):
    name: str = Field(min_length=1, max_length=100)
    slug: str = Field(None, min_length=1, max_length=50, pattern=SLUG_PATTERN)


class GroupUpdateIn(GroupPolicies):
    @model_validator(mode="after")
    def not_empty(self):
        if not self.model_fields_set:
            raise ValueError("Send at least one policy to change.")
        return self


class GroupOut(Schema):
    id: int
    name: str
    slug: str
    role: Role | None = Field(None, description="Your role in the group.")
    heartbeat_interval_s: int
    lease_timeout_s: int
    max_attempts: int
    reconnect_grace_s: int
    default_checkpoint_policy: CheckpointPolicy
    dependency_failure_policy: DependencyFailurePolicy
    checkpoint_required_approvals: int
    checkpoint_decider_role: DeciderRole
    checkpoint_expiry_s: int
    checkpoint_expiry_action: ExpiryAction
    llm_token_budget: int | None = Field(description="Model token budget; null: unlimited.")
    llm_tokens_used: int = Field(description="Model tokens used through the gateway so far.")
    created_at: datetime


@router.get("/groups", response=list[GroupOut])
def group_list(request: HttpRequest):
    return groups_with_role_for_user(user=request.auth)


@router.post("/groups", response={201: GroupOut})
def group_create_view(request: HttpRequest, payload: GroupCreateIn):
    group = group_create(
        user=request.auth, name=payload.name, slug=payload.slug or "", **payload.policies()
    )
    return Status(201, group_with_role_for_user(user=request.auth, slug=group.slug))


@router.get("/groups/{slug}", response=GroupOut)
def group_detail(request: HttpRequest, slug: str):
    return group_with_role_for_user(user=request.auth, slug=slug)


@router.patch("/groups/{slug}", response=GroupOut)
def group_update(request: HttpRequest, slug: str, payload: GroupUpdateIn):
    group = group_get_for_user(user=request.auth, slug=slug)
    group_update_policies(actor=request.auth, group=group, **payload.policies())
    return group_with_role_for_user(user=request.auth, slug=slug)


# --- members -----------------------------------------------------------------------------


class MemberOut(Schema):
    user_id: int
    username: str
    role: Role
    joined_at: datetime

    @staticmethod
    def resolve_username(obj) -> str:
        return obj.user.get_username()

    @staticmethod
    def resolve_joined_at(obj) -> datetime:
        return obj.created_at


class MemberAddIn(InSchema):
    username: str = Field(min_length=1, max_length=150)
    role: Role = Role.MEMBER


class MemberRoleIn(InSchema):
    role: Role


@router.get("/groups/{slug}/members", response=list[MemberOut])
def member_list(request: HttpRequest, slug: str):
    group = group_get_for_user(user=request.auth, slug=slug)
    return members_of(group=group)


@router.post("/groups/{slug}/members", response={201: MemberOut})
def member_add(request: HttpRequest, slug: str, payload: MemberAddIn):
    group = group_get_for_user(user=request.auth, slug=slug, role=Role.OWNER)
    user = user_get_by_username(username=payload.username)
    membership = membership_add(actor=request.auth, group=group, user=user, role=payload.role)
    return Status(201, membership)


@router.patch("/groups/{slug}/members/{int:user_id}", response=MemberOut)
def member_set_role(request: HttpRequest, slug: str, user_id: Id, payload: MemberRoleIn):
    group = group_get_for_user(user=request.auth, slug=slug, role=Role.OWNER)
    user = member_user_get(group=group, user_id=user_id)
    return membership_set_role(actor=request.auth, group=group, user=user, role=payload.role)


@router.delete("/groups/{slug}/members/{int:user_id}", response={204: None})
def member_remove(request: HttpRequest, slug: str, user_id: Id):
    """Owners remove anyone; every member may remove themself (leave)."""
    group = group_get_for_user(user=request.auth, slug=slug)
    user = member_user_get(group=group, user_id=user_id)
    membership_remove(actor=request.auth, group=group, user=user)
    return Status(204, None)
