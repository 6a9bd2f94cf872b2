from django.db.models import QuerySet

from apps.events.models import Event


def events_since(*, group_id: int, after: int = 0, limit: int = 200) -> QuerySet[Event]:
    return Event.objects.filter(group_id=group_id, seq__gt=after).order_by("seq")[:limit]
