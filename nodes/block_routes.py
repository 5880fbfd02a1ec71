"""HTTP routes of the browser's block-weight editor: the presets, and block/component text resolved by the
one parser (trainer.lora.blocks), so the editor never parses weights in JavaScript.

GET  /zit/blocks/presets -> {"presets": {name: {"blocks": [35], "components": {...}, "text": block text,
                                        "components_text": text}},
                             "blocks": ["BASE", "L00", ...], "components": ["adaLN", ...]}
POST /zit/blocks/resolve {"blocks": text, "components": text}
                         -> {"blocks": [35], "components": {...}, "vector": text, "components_text": text}
                         or 400 {"error": message quoting the offending token}

The engine is imported by the handlers, not here: importing the pack stays light.
"""

from __future__ import annotations

import sys
from typing import Any

PRESETS_PATH = "/zit/blocks/presets"
RESOLVE_PATH = "/zit/blocks/resolve"
SHAPE = '{"blocks": text, "components": text}'


def _json(data: dict[str, Any], status: int = 200) -> Any:
    from aiohttp import web

    return web.json_response(data, status=status)


async def presets(request: Any) -> Any:
    """Every preset resolved to its 35 block weights and 8 component multipliers."""
    from ..trainer.lora.blocks import PRESETS, resolve
    from ..trainer.lora.spec import COMPONENTS, VECTOR_BLOCKS

    table = {}
    for name, (text, components_text) in PRESETS.items():
        weights = resolve(name)
        table[name] = {"blocks": list(weights.blocks), "components": weights.components, "text": text,
                       "components_text": components_text}
    return _json({"presets": table, "blocks": list(VECTOR_BLOCKS), "components": list(COMPONENTS)})


async def resolve_text(request: Any) -> Any:
    """The weights of a block text (preset, vector or ranges) and a component text; 400 naming a bad token."""
    from ..trainer.lora.blocks import BlockWeightError, resolve

    try:
        body = await request.json()
    except ValueError:
        return _json({"error": f"the body is not JSON: send {SHAPE}"}, 400)
    if not isinstance(body, dict):
        return _json({"error": f"the body must be a JSON object {SHAPE}"}, 400)
    blocks, components = body.get("blocks", "all"), body.get("components", "")
    for field, value in (("blocks", blocks), ("components", components)):
        if not isinstance(value, str):
            return _json({"error": f"{field!r} must be a string, got {type(value).__name__}"}, 400)
    try:
        weights = resolve(blocks, components)
    except BlockWeightError as e:
        return _json({"error": str(e)}, 400)
    return _json({"blocks": list(weights.blocks), "components": weights.components,
                  "vector": weights.vector_string(), "components_text": weights.components_string()})


def register_block_routes() -> bool:
    """Add the routes to ComfyUI's running server; False (nothing added) where there is none, e.g. when the
    pack is imported by a script or a test without a PromptServer."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None:
        return False
    instance.routes.get(PRESETS_PATH)(presets)
    instance.routes.post(RESOLVE_PATH)(resolve_text)
    return True
