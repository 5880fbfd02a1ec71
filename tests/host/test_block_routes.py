"""The block-weight editor's routes in the real server: presets, resolving text, refusals naming the token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest
from conftest import ComfyClient

from trainer.lora.blocks import PRESETS, resolve
from trainer.lora.spec import COMPONENTS, VECTOR_BLOCKS


def post(comfy: ComfyClient, path: str, body: Any, raw: bytes | None = None) -> tuple[int, dict]:
    """POST JSON (or raw bytes); (HTTP status, JSON body), including an error's body."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(comfy.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_presets_lists_every_preset_resolved(comfy: ComfyClient, prefix: str):
    body = comfy.get(prefix + "/zit/blocks/presets")
    assert body["blocks"] == list(VECTOR_BLOCKS) and len(body["blocks"]) == 35
    assert body["components"] == list(COMPONENTS)
    assert set(body["presets"]) == set(PRESETS)
    for name, entry in body["presets"].items():
        weights = resolve(name)
        assert entry["blocks"] == list(weights.blocks), name
        assert entry["components"] == weights.components, name
        assert (entry["text"], entry["components_text"]) == PRESETS[name]
    late = body["presets"]["late"]["blocks"]
    assert late[VECTOR_BLOCKS.index("L25")] == 1 and late[VECTOR_BLOCKS.index("L05")] == 0
    assert body["presets"]["attention-only"]["components"]["w1"] == 0


@pytest.mark.parametrize("blocks, components", [
    ("late", ""),
    ("%default=1,L10-19=0.5,NR=0", "adaLN=0,q=0.5"),
    (",".join(["0.25"] * 35), ""),
    ("0.5", "attn=2"),
    ("attention-only", "q=0.5"),
    ("", ""),
])
def test_resolve_matches_the_parser(comfy: ComfyClient, blocks: str, components: str):
    status, body = post(comfy, "/api/zit/blocks/resolve", {"blocks": blocks, "components": components})
    assert status == 200, body
    weights = resolve(blocks, components)
    assert body == {"blocks": list(weights.blocks), "components": weights.components,
                    "vector": weights.vector_string(), "components_text": weights.components_string()}
    # the vector text the editor writes back resolves to the same weights
    again = resolve(body["vector"], body["components_text"])
    assert again.blocks == weights.blocks and again.components == weights.components


@pytest.mark.parametrize("body, token", [
    ({"blocks": "L10-19=0.5,X7=1", "components": ""}, "X7"),
    ({"blocks": "L40=1", "components": ""}, "L40"),
    ({"blocks": "1,2,3", "components": ""}, "3 values"),
    ({"blocks": "all", "components": "adaLN=0,qq=1"}, "qq"),
    ({"blocks": "all", "components": "q=half"}, "half"),
    ({"blocks": 1, "components": ""}, "'blocks' must be a string"),
    (["all"], "JSON object"),
])
def test_resolve_refuses_naming_the_token(comfy: ComfyClient, body: Any, token: str):
    status, answer = post(comfy, "/zit/blocks/resolve", body)
    assert status == 400
    assert set(answer) == {"error"} and token in answer["error"], answer


def test_resolve_refuses_a_body_that_is_not_json(comfy: ComfyClient):
    status, answer = post(comfy, "/zit/blocks/resolve", None, raw=b"late")
    assert status == 400 and "not JSON" in answer["error"]
