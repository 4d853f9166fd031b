"""Property-based fuzzing of the whole `/v1` API from its OpenAPI document (schemathesis), in-process.

Every operation gets valid and invalid requests (bodies, paths, queries, headers) with the service's
real tokens and a funded user half of the time, and generated headers otherwise. Two properties: no
response is a server error (5xx), and every error response is JSON with a stable `code`. Bounded for
CI: a fixed seed and a few examples per operation (about a minute on two cores).
"""

from __future__ import annotations

import functools
import json
import os

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from test_service_flow import env  # noqa: F401 - the module's own service (in-process worker, SQLite)

from genserve.ingress import create_api
from genserve.moderation import Moderation
from training.api import build_router as build_training_router
from training.deps import TrainingDeps
from training.ray_jobs import JobState
from training.service import TrainingService

EXAMPLES = int(os.environ.get("GENSERVE_FUZZ_EXAMPLES", "12"))
SERVICE_TOKEN = "Bearer local-service-token"
ADMIN_TOKEN = "Bearer local-admin-token"


class NoLauncher:
    """Training attempts are recorded, never started (no Ray here)."""

    @staticmethod
    def submission_id(training_id: str, attempt: int) -> str:
        return f"fuzz-{training_id}-{attempt}"

    def submit(self, training_id: str, attempt: int) -> None:
        pass

    def state(self, sid: str) -> JobState:
        return JobState.pending

    def stop(self, sid: str) -> None:
        pass


@pytest.fixture(scope="module")
def fuzz_app(env):  # noqa: F811
    user = env.user(grant=1_000_000)
    moderation = Moderation(env.service.registry, env.service.resource_cache, env.service.safety)
    trainings = TrainingService(TrainingDeps.from_settings(env.settings, env.db), launcher=NoLauncher())
    app = create_api(env.service, moderation, start_background=False,
                     routers=[functools.partial(build_training_router, trainings)])
    app.state.fuzz_user = user.user_id
    return app


def error_body_has_a_stable_code(ctx, response, case) -> None:  # noqa: ANN001
    if response.status_code < 400:
        return
    try:
        body = json.loads(response.content or b"null")
    except ValueError as exc:
        raise AssertionError(f"{response.status_code} with a body that is not JSON: {response.content[:200]!r}") from exc
    assert isinstance(body, dict) and isinstance(body.get("code"), str) and body["code"], \
        f"{response.status_code} without a stable code: {body!r}"
    assert body["code"] != "internal_error", body


def _operations(app):  # noqa: ANN001, ANN202
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_never_answers_5xx_and_every_error_has_a_code(fuzz_app, mode):
    operations = _operations(fuzz_app)
    assert len(operations) >= 15  # every route of the API is in its OpenAPI document
    failures: list[str] = []
    for operation in operations:
        if operation.path.endswith("/events"):
            continue  # a live stream: test_hardening_http covers it (its end needs a finished job)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def run(case) -> None:  # noqa: ANN001
            headers = dict(case.headers or {})
            # most cases carry the real credentials, so the fuzz gets past authentication into the routes
            if "authorization" not in {k.lower() for k in headers} or len(str(case.body)) % 3:
                headers["Authorization"] = ADMIN_TOKEN if "/admin/" in case.path else SERVICE_TOKEN
                headers.setdefault("X-User-Id", fuzz_app.state.fuzz_user)
            if isinstance(case.query, dict) and "wait" in case.query:
                case.query["wait"] = False
            response = case.call(headers=headers)
            case.validate_response(response, checks=[not_a_server_error, error_body_has_a_stable_code])

        try:
            run()
        except Unsatisfiable:
            continue  # nothing in this operation can be made invalid (no parameters, no body)
        except Exception as exc:  # noqa: BLE001 - gather every operation's failure, then report them all
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert not failures, "\n\n".join(failures)
