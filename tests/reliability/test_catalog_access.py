"""The Tiled server of ``scripts/postgres.sh`` refuses writes without its API key (issue 9).

Plain HTTP as a stranger on the network would send it: a container created with no key or
a wrong key is refused (401/403) and not created; the same request with the key succeeds,
so the refusal is about the key and not about the request.
"""

from __future__ import annotations

import uuid

import httpx
import pytest


def create_container(uri: str, key: str | None, name: str) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Apikey {key}"}
    body = {"structure_family": "container", "metadata": {"probe": name}, "specs": [],
            "data_sources": [], "id": name}
    return httpx.post(f"{uri.rstrip('/')}/api/v1/metadata/", json=body, headers=headers,
                      timeout=10.0)


def exists(uri: str, key: str, name: str) -> bool:
    response = httpx.get(f"{uri.rstrip('/')}/api/v1/metadata/{name}",
                         headers={"Authorization": f"Apikey {key}"}, timeout=10.0)
    return response.status_code == 200


@pytest.mark.parametrize("key", [None, "wrongkey123"], ids=["no-key", "wrong-key"])
def test_the_server_refuses_a_write_without_its_api_key(postgres_server, key) -> None:
    uri, good = postgres_server["TILED_URI"], postgres_server["TILED_API_KEY"]
    name = f"intruder-{uuid.uuid4().hex[:8]}"
    refused = create_container(uri, key, name)
    assert refused.status_code in (401, 403), (refused.status_code, refused.text[:300])
    assert not exists(uri, good, name)
    allowed = create_container(uri, good, f"owner-{name}")
    assert allowed.status_code == 200, (allowed.status_code, allowed.text[:300])
    assert exists(uri, good, f"owner-{name}")
