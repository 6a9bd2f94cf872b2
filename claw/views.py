"""The signed-in home page: a placeholder listing the user's groups."""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from apps.groups.selectors import groups_for_user


@login_required
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "home.html", {"groups": groups_for_user(user=request.user)})
