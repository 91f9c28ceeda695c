"""schemathesis against the app's own /openapi.json: a bounded number of generated requests per
operation (valid and invalid by the schema), on every served model and on an unknown one; none may
get a 5xx, and every error is the JSON error body."""

from __future__ import annotations

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from tests.serving.conftest import MODELS

EXAMPLES = 6  # per operation and generation mode: the run stays bounded (about 200 requests)


def test_no_generated_request_gets_a_server_error(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    calls = []

    for operation in operations:
        # Invalid requests exist only where there is something to get wrong: a body or a path parameter.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case):
                names = [*MODELS.values(), "no-such-model"] if "name" in (case.path_parameters or {}) else [None]
                for name in names:
                    if name is not None:
                        case.path_parameters["name"] = name
                    response = case.call(base_url=server, timeout=120)
                    calls.append(response.status_code)
                    assert response.status_code < 500, (
                        f"{case.method} {case.formatted_path} {case.body!r:.300}: {response.status_code} {response.text[:500]}")
                    if response.status_code >= 400:
                        assert set(response.json()["error"]) == {"field", "reason", "status"}, response.text

            check()
    assert len(calls) >= 50 and any(c == 200 for c in calls) and any(400 <= c < 500 for c in calls)
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200
