"""ComfyUI glue: the V3 extension listing the pack's nodes."""

from comfy_api.latest import ComfyExtension, io

from .adapters import (
    ZITDistillPatchAttach,
    ZITDistillPatchRemove,
    ZITTrainingAdapterAttach,
    ZITTrainingAdapterRemove,
)
from .dataset import ZITDataset
from .loaders import ZITLoadModel
from .lora_nodes import ZITLoraConvert, ZITLoraInspect, ZITLoraLoaderBlockWeight, ZITLoraMergeSave
from .training import ZITStopTraining, ZITTrain


class ZitExtension(ComfyExtension):
    """The zit-trainer extension: every ZIT node of the pack."""

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [
            ZITTrainingAdapterAttach,
            ZITTrainingAdapterRemove,
            ZITDistillPatchAttach,
            ZITDistillPatchRemove,
            ZITLoraLoaderBlockWeight,
            ZITLoraMergeSave,
            ZITLoraInspect,
            ZITLoraConvert,
            ZITLoadModel,
            ZITDataset,
            ZITTrain,
            ZITStopTraining,
        ]


from .block_routes import register_block_routes  # noqa: E402 - routes of the browser's block-weight editor

register_block_routes()
from .routes import register_routes  # noqa: E402 - training jobs: /zit/jobs routes and zit.* events

register_routes()
