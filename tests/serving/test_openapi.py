"""schemathesis against the app's own /openapi.json: a bounded number of generated requests per
operation and served model, valid by the schema (positive) and invalid (negative).

What the schema allows the app accepts: a positive request to a served model gets a 2xx, unless what
refused it is something only the model decides and ``GET /v1/models`` lists (:data:`MODEL_DECIDES`).
A negative one gets a 4xx. Every answer is one the schema documents (status, content type, body), no
answer is a 5xx, every error is the JSON error body, and a method a path does not take is a 405 with
``Allow`` (:func:`test_a_method_the_path_does_not_take_is_a_405_with_allow`; schemathesis's
``unsupported_method`` check runs on every answer but probes methods only in its coverage phase,
which ``as_strategy`` cannot draw for operations without parameters).
"""

from __future__ import annotations

import re

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, negative_data_rejection, response_schema_conformance, status_code_conformance,
    unsupported_method,
)

from tests.serving.conftest import MODELS

EXAMPLES = 6  # per operation, model and generation mode: the run stays bounded (a few hundred requests)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

# Request fields whose valid values depend on the model, not stated by the schema that all models share:
# the operations it can run (field `name`), its image size and channels (and whether a string is a
# PNG of them), its latent shape, its samplers, its edit factors and values, and whether it scores
# images or time series, the sample grids its version carries (`file`). A positive request refused on
# any other field is a limit the schema misses.
MODEL_DECIDES = re.compile(r"name|file|sampler|factor|value|source|series|windows|images(\[\d+\])?|latents(\..+)?|[ab]\.(image|latent)")


def _run(operation, mode: GenerationMode, path_parameters: dict | None, server: str, statuses: list):
    """``EXAMPLES`` generated cases of ``operation`` sent to ``server``, each answer checked."""

    @given(case=operation.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        response = case.call(base_url=server, timeout=120)
        statuses.append(response.status_code)
        what = f"{case.method} {case.formatted_path} {case.body!r:.300}: {response.status_code} {response.text[:500]}"
        case.validate_response(response, checks=CHECKS + [negative_data_rejection, unsupported_method])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"field", "reason", "status"}, what
            if response.status_code == 405:
                assert response.headers.get("Allow"), what
        if mode is GenerationMode.POSITIVE:
            assert response.status_code < 300 or MODEL_DECIDES.fullmatch(response.json()["error"]["field"]), what

    check()


def test_generated_requests_get_the_answers_the_schema_promises(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 9
    statuses: list[int] = []
    for operation in operations:
        per_model = "{name}" in operation.path
        for name in MODELS.values() if per_model else [None]:
            fixed = {"name": name} if name else None
            _run(operation, GenerationMode.POSITIVE, fixed, server, statuses)
            if operation.method.upper() == "POST":  # something to get wrong: a body
                _run(operation, GenerationMode.NEGATIVE, fixed, server, statuses)
        if per_model:  # the model name generated too: one outside the served names is a 404
            _run(operation, GenerationMode.NEGATIVE, None, server, statuses)
    # Most positive bodies carry generated strings as images, which only the model refuses (not PNGs of
    # its size); generate, the GET routes and latent-only bodies are answered.
    assert len(statuses) >= 200 and statuses.count(200) >= 10, statuses
    assert {404, 422} <= set(statuses), sorted(set(statuses))
    assert requests.get(f"{server}/healthz", timeout=10).status_code == 200


def test_the_schema_states_the_configured_limits_and_models(server):
    document = requests.get(f"{server}/openapi.json", timeout=10).json()
    schemas = document["components"]["schemas"]
    # conftest's serve_config: limits max_n 64, max_images 16, max_steps 16
    assert schemas["GenerateRequest"]["properties"]["n"]["maximum"] == 64
    seed = schemas["GenerateRequest"]["properties"]["seed"]["anyOf"][0]
    assert seed["maximum"] == 2**53 - 1 and isinstance(seed["maximum"], int), seed
    assert schemas["InterpolateRequest"]["properties"]["steps"]["maximum"] == 16
    assert schemas["ImagesRequest"]["properties"]["images"]["maxItems"] == 16
    assert schemas["TextDecodeRequest"]["properties"]["texts"]["maxItems"] == 16
    name = document["paths"]["/v1/models/{name}/generate"]["post"]["parameters"][0]
    assert name["schema"]["enum"] == sorted(MODELS.values())
    # What the schema states is what the app enforces: at the limit a 200, one above it a 422.
    url = f"{server}/v1/models/{MODELS['vae']}"
    ok = requests.post(f"{url}/interpolate", json={"a": {"latent": [0] * 4}, "b": {"latent": [1] * 4}, "steps": 16}, timeout=60)
    assert ok.status_code == 200 and len(ok.json()["images"]) == 16, ok.text
    over = requests.post(f"{url}/interpolate", json={"a": {"latent": [0] * 4}, "b": {"latent": [1] * 4}, "steps": 17}, timeout=60)
    assert over.status_code == 422 and over.json()["error"]["field"] == "steps", over.text
    top = requests.post(f"{url}/generate", json={"n": 1, "seed": 2**53 - 1}, timeout=60)
    assert top.status_code == 200 and top.json()["seed"] == 2**53 - 1, top.text
    over = requests.post(f"{url}/generate", json={"n": 1, "seed": 2**53}, timeout=60)
    assert over.status_code == 422 and over.json()["error"]["field"] == "seed", over.text


def test_a_method_the_path_does_not_take_is_a_405_with_allow(server):
    response = requests.put(f"{server}/v1/models/{MODELS['vae']}/generate", json={}, timeout=10)
    assert response.status_code == 405 and response.headers["Allow"] == "POST", response.headers
    assert response.json()["error"]["field"] == "path", response.text
