"""The pack as ComfyUI sees it (in-process, CPU): every node is described (schema, tooltips, /object_info),
the nodes execute on ComfyUI's locked class clones, and importing the pack at start-up stays light (no
engine, diffusers or peft).

Runs against a ComfyUI checkout (COMFYUI_PATH, or this repo inside ComfyUI/custom_nodes/); skipped otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _comfy_inproc as host  # noqa: E402

ROOT, PACK = host.setup_or_skip()  # ComfyUI on the CPU, the pack as zit_trainer_pack; imports below

from _patching_helpers import _like_comfyui as _like_comfyui  # a fixture (autouse here)  # noqa: E402
from _patching_helpers import base as base  # a fixture (module-scoped here)  # noqa: E402
from _patching_helpers import dmodel as dmodel  # a fixture (module-scoped here)  # noqa: E402
from _patching_helpers import lora_for  # noqa: E402
from _patching_helpers import loras as loras  # a fixture (module-scoped here)  # noqa: E402
from zit_trainer_pack.nodes import ZitExtension, adapters, lora_nodes, patching  # noqa: E402
from zit_trainer_pack.trainer.lora import formats  # noqa: E402


def test_every_node_is_described(loras):
    import asyncio

    node_list = asyncio.run(ZitExtension().get_node_list())
    ids = [cls.GET_SCHEMA().node_id for cls in node_list]
    assert len(set(ids)) == len(ids) and all(i.startswith("ZIT") for i in ids)
    assert {"ZITTrainingAdapterAttach", "ZITTrainingAdapterRemove", "ZITDistillPatchAttach",
            "ZITDistillPatchRemove", "ZITLoraLoaderBlockWeight", "ZITLoraMergeSave", "ZITLoraInspect",
            "ZITLoraConvert"} <= set(ids)
    for cls in node_list:
        schema = cls.GET_SCHEMA()
        assert schema.category.startswith("ZIT") and schema.description, schema.node_id
        assert all(i.tooltip for i in schema.inputs), schema.node_id
        assert all(o.tooltip for o in schema.outputs), schema.node_id
        assert cls.GET_NODE_INFO_V1()["input"]["required"], schema.node_id  # what /object_info serves


def test_executes_as_comfyui_calls_it(base, loras):
    """execute on ComfyUI's locked class clone (no instance state): the adapter nodes share one base class."""
    from comfy_api.internal import make_locked_method_func

    loras("adapter_locked.safetensors", lora_for(18))

    def call(cls, **inputs):
        cls.VALIDATE_CLASS()
        return make_locked_method_func(cls, "EXECUTE_NORMALIZED", cls.PREPARE_CLASS_CLONE(None))(**inputs)

    attached = call(adapters.ZITTrainingAdapterAttach, model=base, lora_name="adapter_locked.safetensors",
                    strength=1.0)
    assert set(patching.attachments(attached.result[0])) == {"training_adapter"}
    removed = call(adapters.ZITTrainingAdapterRemove, model=attached.result[0], mode="exact",
                   lora_name="adapter_locked.safetensors", strength=1.0)
    assert removed.result[0].patches == {}
    assert lora_nodes.DIALECTS == formats.DIALECTS
    from zit_trainer_pack.trainer.lora.inspect import METRICS

    assert set(lora_nodes.METRICS) <= set(METRICS)


def test_importing_the_pack_is_light():
    """ComfyUI start-up: the pack and its schemas load without the engine, diffusers or peft (the job registry
    imports only trainer.job, which imports nothing but the standard library)."""
    code = "\n".join([
        "import asyncio, sys",
        "sys.path.insert(0, sys.argv[1])",
        "import _comfy_inproc as h",
        "h.prepare(h.Path(sys.argv[2]))",
        "pack = h.load_pack()",
        "extension = asyncio.run(pack.comfy_entrypoint())",
        "schemas = [c.GET_SCHEMA() for c in asyncio.run(extension.get_node_list())]",
        "heavy = ('zit_trainer_pack.trainer', 'zit_trainer_pack.nodes.patching', 'diffusers', 'peft')",
        "light = {'zit_trainer_pack.trainer' + m for m in ('', '.errors', '.job')}",
        "loaded = sorted(m for m in sys.modules if m.startswith(heavy) and m not in light)",
        "print(len(schemas), 'schemas; heavy modules loaded:', loaded)",
        "sys.exit(1 if loaded or len(schemas) < 8 else 0)",
    ])
    result = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(ROOT)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
