"""The site root and sign-in: signed-in people land on their groups (the dashboard)."""

from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import AuthenticationForm
from django.contrib.auth.views import LoginView
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect

from apps.groups.services import user_authenticate
from claw.errors import Throttled


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return redirect("dashboard:groups")


class ThrottledSignIn:
    """AuthenticationForm.clean() through user_authenticate, which counts failures."""

    throttled: Throttled | None = None

    def clean(self):
        username = self.cleaned_data.get("username")
        password = self.cleaned_data.get("password")
        if username is not None and password:
            try:
                self.user_cache = user_authenticate(
                    request=self.request,
                    username=username,
                    password=password,
                    client=self.request.META.get("REMOTE_ADDR", ""),
                )
            except Throttled as exc:
                self.throttled = exc
                raise ValidationError(exc.message, code=exc.code) from None
            if self.user_cache is None:
                raise self.get_invalid_login_error()
            self.confirm_login_allowed(self.user_cache)
        return self.cleaned_data


class SignInForm(ThrottledSignIn, AuthenticationForm):
    pass


class AdminSignInForm(ThrottledSignIn, AdminAuthenticationForm):
    pass


class SignInView(LoginView):
    form_class = SignInForm
    redirect_authenticated_user = True

    def form_invalid(self, form: SignInForm) -> HttpResponse:
        response = super().form_invalid(form)
        if form.throttled is not None:
            response.status_code = 429
            response["Retry-After"] = str(form.throttled.details["retry_after_s"])
        return response
