"""Dashboard forms: they parse and bound what a person typed; services decide the rest."""

from django import forms

from apps.checkpoints.models import Verdict
from apps.groups.models import Role
from apps.groups.services import INVITE_MAX_USES
from claw.schema import DB_INT_MAX


class GroupCreateForm(forms.Form):
    name = forms.CharField(max_length=100, strip=True)
    slug = forms.SlugField(
        max_length=50,
        required=False,
        help_text="Letters, digits, - and _. Leave empty to derive it from the name.",
    )


class InviteCreateForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER)
    max_uses = forms.IntegerField(
        min_value=1,
        max_value=INVITE_MAX_USES,
        initial=1,
        label="Uses",
        help_text="1 for a single person; more for a link several people may use.",
    )


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class TokenCreateForm(forms.Form):
    name = forms.CharField(max_length=100, strip=True, help_text="What the token is for.")


class DrainForm(forms.Form):
    draining = forms.TypedChoiceField(
        choices=[("1", "drain"), ("0", "resume")], coerce=lambda value: value == "1"
    )


class DecisionForm(forms.Form):
    verdict = forms.ChoiceField(choices=Verdict.choices)
    note = forms.CharField(max_length=5000, required=False, widget=forms.Textarea)
    option = forms.CharField(max_length=100, required=False)
    assign_to = forms.IntegerField(min_value=1, max_value=DB_INT_MAX, required=False, label="Agent")

    def clean(self) -> dict:
        data = super().clean()
        if data.get("verdict") != Verdict.APPROVE:
            # Options and agents go with an approval only; the choice shown for the
            # approve button must not turn a rejection into an error.
            data["option"] = ""
            data["assign_to"] = None
        elif data.get("option") != "reassign":
            data["assign_to"] = None
        return data


class BudgetForm(forms.Form):
    budget = forms.IntegerField(
        min_value=0,
        max_value=10**13,
        required=False,
        label="Token budget",
        help_text="Model tokens this group's agents may use through the gateway. Empty: unlimited.",
    )


def form_errors_text(form: forms.Form) -> str:
    """One line for a message: "field: problem; other: problem"."""
    parts = []
    for field, errors in form.errors.items():
        label = "" if field == "__all__" else f"{field}: "
        parts.append(label + " ".join(str(e) for e in errors))
    return "; ".join(parts)
