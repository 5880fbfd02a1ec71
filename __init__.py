"""ComfyUI entry point of zit-trainer: a V3 extension. Imports nothing heavy at ComfyUI start-up."""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """Return the pack's ComfyExtension (its node modules import the engine lazily)."""
    from .nodes import ZitExtension

    return ZitExtension()
