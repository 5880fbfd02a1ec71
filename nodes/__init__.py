"""ComfyUI glue: the V3 extension listing the pack's nodes."""

from comfy_api.latest import ComfyExtension, io


class ZitExtension(ComfyExtension):
    """The zit-trainer extension; nodes arrive with the inference and training issues."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
