from ninja import NinjaAPI

api = NinjaAPI(title="Claw API", version="1", urls_namespace="api")
