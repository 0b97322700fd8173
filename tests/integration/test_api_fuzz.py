"""Schemathesis against the live binding API: requests generated from its own OpenAPI document
(valid and invalid ones, for every operation) never get a 5xx.

Real processes: the shared redis-server (own key prefix) and one `python -m proxy api`.
"""

from __future__ import annotations

import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.integration.apiprocs import ApiProcess, api_config, bearer, free_tcp_port, start_api
from tests.integration.procs import delete_redis_prefix

pytestmark = pytest.mark.integration


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiProcess]:
    prefix = f"sip700test:{uuid.uuid4().hex[:12]}:"
    port = free_tcp_port()
    process = start_api(api_config(tmp_path, prefix, port=port), port, tmp_path / "api.log")
    yield process
    process.stop()
    delete_redis_prefix(prefix)
    assert "Traceback" not in process.log_text(), process.log_text()[-3000:]


def test_generated_requests_never_get_a_server_error(api: ApiProcess) -> None:
    with urllib.request.urlopen(f"{api.url}/v1/openapi.json") as response:
        import json

        document = json.load(response)
    schema = schemathesis.openapi.from_dict(document)
    statuses: Counter[int] = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode)

            @settings(max_examples=40, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=strategy)
            def call(case: schemathesis.Case) -> None:
                headers = {**(case.headers or {}), **bearer("shop1")}
                response = case.call(base_url=api.url, headers=headers)
                statuses[response.status_code] += 1
                assert response.status_code < 500, (case.method, case.path, case.body,
                                                    response.status_code, response.text)

            try:
                call()
            except Unsatisfiable:  # nothing invalid to make (an operation without input)
                assert mode is GenerationMode.NEGATIVE, operation.label
    print(f"statuses: {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) > 200
    assert statuses[201] + statuses[200] > 0  # some requests were valid all the way through
