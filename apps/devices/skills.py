"""Document → skill: a group's procedures for a toolkit, made by K2.6 from a document or
written by people, versioned, and given to the agents whose tasks require the toolkit.

    skill_document_upload (owner) reads the document (.md/.markdown/.txt as UTF-8, .pdf
        through pypdf), stores a `pending` version with the extracted text (event
        `skill.uploaded`) and, on commit, enqueues claw.skill_generate (Celery) ──▶
    skill_generate asks the model (claw.llm, structured output: summary, procedure,
        checklist, constraints), validates the answer, retries once with the validation
        error, renders it as compact markdown and marks the version `ready` (event
        `skill.ready`) or `failed` with the error (event `skill.failed`). Idempotent: a
        version that is no longer pending is not made again.
    skill_edit (owner) writes a new `ready` version by hand (event `skill.edited`); an
        empty text clears the skill.

Skills belong to a group (toolkits are global): versions are numbered 1, 2, 3… per
(group, toolkit), and the current skill is the latest ready version. The agent protocol's
task spec carries the current skills of the task's required toolkits (`TaskSpec.skills`,
apps.devices.selectors), and the device runtime's model loop puts them in its system
prompt (claw.device.llm).
"""

import hashlib
import io
import logging
import posixpath

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import Max, OuterRef, Q, Subquery
from django.utils import timezone

from apps.devices.models import Agent, SkillSource, SkillStatus, Toolkit, ToolkitSkill
from apps.events.services import event_append
from apps.groups.models import Group, Role
from apps.groups.selectors import require_role
from apps.llm.services import group_complete_validated
from claw import llm
from claw.errors import InvalidInput, InvalidTransition, NotFound

logger = logging.getLogger(__name__)

# Who writes a group's skills: they reach every agent's prompt on every task that needs the
# toolkit, so they are group-wide configuration, like devices and policies.
SKILL_EDITOR_ROLE = Role.OWNER
MAX_DOCUMENT_BYTES = 2 * 1024 * 1024
# What the model reads of a document: about 50K tokens, well inside K2.6's context with room
# for its thinking. Longer documents are cut, and the prompt says so.
MAX_DOCUMENT_CHARS = 200_000
MAX_PDF_PAGES = 500
MAX_SKILL_CHARS = 12_000
MAX_ITEMS = 40
MAX_ITEM_CHARS = 600
MAX_SUMMARY_CHARS = 1_000
# What one task spec carries in all: skills past this (in required-toolkit order) are left
# out, so an assignment frame stays small whatever the group wrote.
MAX_SKILLS_CHARS_PER_TASK = 48_000
MODEL_MAX_TOKENS = 32_000
TEXT_TYPES = (".md", ".markdown", ".txt")
PDF_TYPES = (".pdf",)


# --- reading ------------------------------------------------------------------------------


def latest_ready_version() -> Subquery:
    """For a ToolkitSkill row in a query: the newest ready version of its group's toolkit
    (the current skill is the row whose version equals it)."""
    return Subquery(
        ToolkitSkill.objects.filter(
            group_id=OuterRef("group_id"),
            toolkit_id=OuterRef("toolkit_id"),
            status=SkillStatus.READY,
        )
        .order_by("-version")
        .values("version")[:1]
    )


def skills_current(
    *, group_id: int, slugs: list[str], budget: int | None = MAX_SKILLS_CHARS_PER_TASK
) -> dict[str, str]:
    """The current skill text of each of these toolkits that has one in this group (one
    query), in the order of `slugs`; at most `budget` characters in all (None: no limit)."""
    if not slugs:
        return {}
    found = dict(
        ToolkitSkill.objects.filter(
            group_id=group_id,
            toolkit__slug__in=slugs,
            status=SkillStatus.READY,
            version=latest_ready_version(),
        ).values_list("toolkit__slug", "text")
    )
    skills = {}
    for slug in slugs:
        text = found.get(slug, "")
        if not text:  # none, or cleared
            continue
        if budget is None:
            skills[slug] = text
            continue
        if len(text) > budget:
            logger.warning("group %s: the %s skill is left out of a task spec", group_id, slug)
            continue
        skills[slug] = text
        budget -= len(text)
    return skills


def toolkits_for_group(*, group: Group) -> list[Toolkit]:
    """The toolkits a group works with: those its agents declare, its tasks require or it
    has skills for, plus `llm` (registered ones only), by slug. Three queries."""
    from apps.tasks.models import Task

    slugs = {"llm"}
    for toolkits in Agent.objects.filter(group=group).values_list("toolkits", flat=True):
        slugs.update(toolkits or {})
    for required in (
        Task.objects.filter(group=group).order_by().values_list("required_toolkits", flat=True)
    ).distinct():
        slugs.update(required or [])
    return list(
        Toolkit.objects.filter(Q(slug__in=slugs) | Q(group_skills__group=group))
        .distinct()
        .order_by("slug")
    )


def skill_versions(*, group: Group, toolkit: Toolkit) -> list[ToolkitSkill]:
    """A toolkit's skill versions in this group, newest first (without the documents'
    text)."""
    return list(
        ToolkitSkill.objects.filter(group=group, toolkit=toolkit)
        .defer("document_text")
        .select_related("toolkit", "created_by")
        .order_by("-version")
    )


def toolkit_get(*, slug: str) -> Toolkit:
    toolkit = Toolkit.objects.filter(slug=slug).first()
    if toolkit is None:
        raise NotFound(f"No toolkit {slug!r}.")
    return toolkit


# --- documents ----------------------------------------------------------------------------


def _clean_text(text: str) -> str:
    """Text PostgreSQL can store: no U+0000, no lone surrogates."""
    return text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")


def _pdf_text(data: bytes) -> str:
    from pypdf import PdfReader

    if data.lstrip()[:5] != b"%PDF-":
        raise InvalidInput("This is not a PDF file.", code="unreadable_document")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except Exception:  # an unsupported cipher, or one that needs `cryptography`
                opened = 0
            if not opened:
                raise InvalidInput(
                    "This PDF is encrypted; upload a copy without a password.",
                    code="unreadable_document",
                )
        pages, size = [], 0
        for page in reader.pages[:MAX_PDF_PAGES]:
            text = page.extract_text() or ""
            pages.append(text)
            size += len(text)
            if size > MAX_DOCUMENT_CHARS:
                break
    except InvalidInput:
        raise
    except Exception as exc:  # pypdf fails on broken files in many ways; all mean unreadable
        raise InvalidInput(
            f"This PDF could not be read ({type(exc).__name__}: {str(exc)[:200]}).",
            code="unreadable_document",
        ) from None
    return "\n\n".join(pages)


def document_text(*, name: str, data: bytes) -> str:
    """The text of an uploaded document, or InvalidInput: too_large, unsupported_type,
    unreadable_document or empty_document."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise InvalidInput(
            f"Documents are limited to {MAX_DOCUMENT_BYTES // (1024 * 1024)} MiB.",
            code="too_large",
        )
    extension = posixpath.splitext(name.lower())[1]
    if extension in TEXT_TYPES:
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise InvalidInput(
                "This document is not UTF-8 text; save it as UTF-8 and upload it again.",
                code="unreadable_document",
            ) from None
        if "\x00" in text:
            raise InvalidInput("This document is binary, not text.", code="unreadable_document")
    elif extension in PDF_TYPES:
        text = _pdf_text(data)
    else:
        raise InvalidInput(
            "Upload a Markdown (.md, .markdown), text (.txt) or PDF (.pdf) document.",
            code="unsupported_type",
        )
    text = _clean_text(text).strip()
    if not text:
        raise InvalidInput(
            "This document has no text to read (a scanned PDF has only images of text).",
            code="empty_document",
        )
    return text


def _document_name(name: str) -> str:
    name = posixpath.basename(name.replace("\\", "/")).strip()
    if not name or len(name) > 200:
        raise InvalidInput("A document needs a file name of 1 to 200 characters.")
    return name


def _next_version(*, group: Group, toolkit: Toolkit) -> int:
    """The next version number, under a lock on the toolkit's row (versions of one toolkit
    are numbered one at a time; SQLite serializes writers anyway)."""
    list(Toolkit.objects.select_for_update(no_key=True).filter(id=toolkit.id))
    latest = ToolkitSkill.objects.filter(group=group, toolkit=toolkit).aggregate(v=Max("version"))
    return (latest["v"] or 0) + 1


def _payload(skill: ToolkitSkill, toolkit: Toolkit, **extra) -> dict:
    return {"skill_id": skill.id, "toolkit": toolkit.slug, "version": skill.version, **extra}


def skill_document_upload(
    *, actor: AbstractBaseUser, group: Group, toolkit: Toolkit, name: str, data: bytes
) -> ToolkitSkill:
    """Store a document for a toolkit's skill (owner) as a pending version and have the
    model turn it into the skill (claw.skill_generate, enqueued on commit). Refused without
    a model backend (503 model_unavailable); nothing is stored for a refused document."""
    require_role(user=actor, group_id=group.id, role=SKILL_EDITOR_ROLE)
    name = _document_name(name)
    if not llm.configured():
        raise llm.ModelUnavailable(
            "Making a skill from a document needs a model: no model backend is configured "
            "(set CLAW_LLM_BASE_URL). Write the skill by hand instead."
        )
    text = document_text(name=name, data=data)  # slow for a big PDF: outside the transaction
    from apps.devices.tasks import skill_generate_task

    with transaction.atomic():
        skill = ToolkitSkill.objects.create(
            group=group,
            toolkit=toolkit,
            version=_next_version(group=group, toolkit=toolkit),
            source=SkillSource.DOCUMENT,
            status=SkillStatus.PENDING,
            document_name=name,
            document_sha256=hashlib.sha256(data).hexdigest(),
            document_size=len(data),
            document_text=text[:MAX_DOCUMENT_CHARS],
            document_chars=len(text),
            created_by=actor,
        )
        event_append(
            group_id=group.id,
            kind="skill.uploaded",
            actor_id=actor.pk,
            payload=_payload(
                skill, toolkit, document=name, size=len(data), sha256=skill.document_sha256
            ),
        )
        skill_id = skill.id
        transaction.on_commit(lambda: skill_generate_task.delay(skill_id), robust=True)
    return skill


def skill_edit(
    *,
    actor: AbstractBaseUser,
    group: Group,
    toolkit: Toolkit,
    text: str,
    base_version: int | None = None,
) -> ToolkitSkill:
    """A new version of a toolkit's skill, written by a person (owner); it is current at
    once. An empty text clears the skill (agents get none). With `base_version` (the
    version the person edited), refused with skill_changed when another version became
    current meanwhile."""
    require_role(user=actor, group_id=group.id, role=SKILL_EDITOR_ROLE)
    text = _clean_text(text.replace("\r\n", "\n")).strip()
    if len(text) > MAX_SKILL_CHARS:
        raise InvalidInput(
            f"A skill is at most {MAX_SKILL_CHARS} characters (this one has {len(text)}): "
            "keep it to the procedure, checklist and constraints.",
            code="too_long",
        )
    with transaction.atomic():
        version = _next_version(group=group, toolkit=toolkit)
        if base_version is not None:
            current = (
                ToolkitSkill.objects.filter(
                    group=group, toolkit=toolkit, status=SkillStatus.READY
                ).aggregate(v=Max("version"))["v"]
                or 0
            )
            if current != base_version:
                raise InvalidTransition(
                    f"The {toolkit.slug} skill changed meanwhile (now version {current}); "
                    "reload it and edit again.",
                    code="skill_changed",
                    details={"current_version": current},
                )
        skill = ToolkitSkill.objects.create(
            group=group,
            toolkit=toolkit,
            version=version,
            source=SkillSource.EDIT,
            status=SkillStatus.READY,
            text=text,
            created_by=actor,
            finished_at=timezone.now(),
        )
        event_append(
            group_id=group.id,
            kind="skill.edited",
            actor_id=actor.pk,
            payload=_payload(skill, toolkit, chars=len(text)),
        )
    return skill


# --- making a skill (the Celery task's body) ------------------------------------------------


def skill_schema() -> dict:
    items = {"type": "array", "items": {"type": "string"}, "maxItems": MAX_ITEMS}
    return {
        "type": "object",
        "properties": {
            "summary": {
                "type": "string",
                "description": "One or two sentences: what the skill is for and when it applies.",
            },
            "procedure": {
                **items,
                "minItems": 1,
                "description": "The steps to follow, in order; each one imperative sentence.",
            },
            "checklist": {**items, "description": "What to check before reporting done."},
            "constraints": {
                **items,
                "description": "Hard rules: what never to do, limits, what needs approval.",
            },
        },
        "required": ["summary", "procedure", "checklist", "constraints"],
        "additionalProperties": False,
    }


SYSTEM_PROMPT = """You turn a document into a skill for the AI agents of a Claw Group (a team \
of humans and agents). A skill is what an agent reads before it works on a task that needs \
the toolkit `{toolkit}`{description}: a concise procedure, a checklist and constraints.

Rules:
- Use only what the document says; do not invent steps, commands, names or numbers.
- procedure: the steps in order, each one short imperative sentence (commands in backticks).
- checklist: what to verify before reporting the task done.
- constraints: hard rules — what never to do, limits, what needs a human's approval.
- summary: one or two sentences on what the skill is for and when it applies.
- Be concise: at most {max_items} items per list, {max_item} characters per item, \
{max_chars} characters in all. Leave out background, history and anything an agent cannot act on.
- Answer with the JSON object only, matching the schema."""


def _document_prompt(skill: ToolkitSkill) -> str:
    size = f"{skill.document_chars} characters"
    if skill.document_truncated:
        size += (
            f"; it was cut to its first {len(skill.document_text)} characters, so the end "
            "is missing"
        )
    return (
        f"Document: {skill.document_name} ({size}).\n\n"
        f"<document>\n{skill.document_text}\n</document>"
    )


def _items(value, where: str, *, required: bool) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidInput(f"{where} must be a list of strings.", code="invalid_skill")
    items = [" ".join(item.split()) for item in value]
    items = [item for item in items if item]
    if required and not items:
        raise InvalidInput(f"{where} must have at least one step.", code="invalid_skill")
    if len(items) > MAX_ITEMS:
        raise InvalidInput(
            f"{where} has {len(items)} items; at most {MAX_ITEMS}.", code="invalid_skill"
        )
    for index, item in enumerate(items):
        if len(item) > MAX_ITEM_CHARS:
            raise InvalidInput(
                f"{where}[{index}] is {len(item)} characters; at most {MAX_ITEM_CHARS}.",
                code="invalid_skill",
            )
    return items


def skill_validate(answer) -> dict:
    """The model's answer, checked and normalized, or InvalidInput (code invalid_skill)
    saying what is wrong, in words the model can act on."""
    if not isinstance(answer, dict):
        raise InvalidInput("The skill must be a JSON object.", code="invalid_skill")
    fields = {"summary", "procedure", "checklist", "constraints"}
    unknown = sorted(set(answer) - fields)
    if unknown:
        raise InvalidInput(f"Unknown field(s): {', '.join(unknown)}.", code="invalid_skill")
    summary = answer.get("summary")
    if not isinstance(summary, str):
        raise InvalidInput("summary must be a string.", code="invalid_skill")
    summary = " ".join(summary.split())
    if len(summary) > MAX_SUMMARY_CHARS:
        raise InvalidInput(
            f"summary is {len(summary)} characters; at most {MAX_SUMMARY_CHARS}.",
            code="invalid_skill",
        )
    skill = {
        "summary": summary,
        "procedure": _items(answer.get("procedure"), "procedure", required=True),
        "checklist": _items(answer.get("checklist", []), "checklist", required=False),
        "constraints": _items(answer.get("constraints", []), "constraints", required=False),
    }
    size = len(skill_markdown(skill))
    if size > MAX_SKILL_CHARS:
        raise InvalidInput(
            f"The skill is {size} characters; at most {MAX_SKILL_CHARS}: be more concise.",
            code="invalid_skill",
        )
    return skill


def skill_markdown(skill: dict) -> str:
    """A validated skill as compact markdown: the summary, then the three lists."""
    parts = [skill["summary"]] if skill["summary"] else []
    parts.append(
        "### Procedure\n"
        + "\n".join(f"{n}. {step}" for n, step in enumerate(skill["procedure"], 1))
    )
    for title, key in (("Checklist", "checklist"), ("Constraints", "constraints")):
        if skill[key]:
            parts.append(f"### {title}\n" + "\n".join(f"- {item}" for item in skill[key]))
    return _clean_text("\n\n".join(parts))


def skill_generate(*, skill_id: int) -> str:
    """Make one pending version from its document: idempotent (a version that is no longer
    pending is skipped). Returns "ready", "failed" or "skipped"."""
    skill = ToolkitSkill.objects.select_related("toolkit").filter(id=skill_id).first()
    if skill is None or skill.status != SkillStatus.PENDING:
        return "skipped"
    toolkit = skill.toolkit
    description = f" ({toolkit.description[:300]})" if toolkit.description else ""
    messages = [
        {
            "role": "system",
            "content": SYSTEM_PROMPT.format(
                toolkit=toolkit.slug,
                description=description,
                max_items=MAX_ITEMS,
                max_item=MAX_ITEM_CHARS,
                max_chars=MAX_SKILL_CHARS,
            ),
        },
        {"role": "user", "content": _document_prompt(skill)},
    ]
    text, error, usage = group_complete_validated(
        group_id=skill.group_id,
        messages=messages,
        name="skill",
        schema=skill_schema(),
        max_tokens=MODEL_MAX_TOKENS,
        validate=lambda answer: skill_markdown(skill_validate(answer)),
        what="the skill's JSON object",
    )
    return _record(skill, text=text, error=error, usage=usage)


def _record(skill: ToolkitSkill, *, text: str | None, error: str, usage: list[dict]) -> str:
    status = SkillStatus.READY if text is not None else SkillStatus.FAILED
    error = "" if text is not None else (error or "no valid skill")[:2000]
    with transaction.atomic():
        done = ToolkitSkill.objects.filter(id=skill.id, status=SkillStatus.PENDING).update(
            status=status, text=text or "", error=error, usage=usage, finished_at=timezone.now()
        )
        if not done:  # another worker got there first
            return "skipped"
        extra = {"usage": usage}
        if error:
            extra["error"] = error
        event_append(
            group_id=skill.group_id,
            kind=f"skill.{status}",
            payload=_payload(skill, skill.toolkit, **extra),
        )
    return status
