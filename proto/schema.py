"""Prints the JSON Schema of the client protocol (`make schema` writes proto/client.schema.json)."""

from __future__ import annotations

import json

import msgspec

from proto import client


def client_schema() -> dict[str, object]:
    _, components = msgspec.json.schema_components(
        [
            client.ClientFrame,
            client.ServerFrame,
            client.SendRequest,
            client.StopRequest,
            client.SessionHistory,
            client.PollResponse,
            client.CreateSessionResponse,
        ],
        ref_template="#/$defs/{name}",
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "tidewire client protocol v1",
        "$defs": components,
        "anyOf": [{"$ref": "#/$defs/" + n} for n in sorted(components)],
    }


def render() -> str:
    return json.dumps(client_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
