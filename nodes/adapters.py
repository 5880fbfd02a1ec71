"""Training adapter and DistillPatch nodes: attach a LoRA-form adapter to a MODEL, remove exactly that."""

from __future__ import annotations

from typing import Any, ClassVar

from comfy_api.latest import io

from .lora_nodes import lora_input

CATEGORY = "ZIT"


class _Adapter(io.ComfyNode):
    """Shared schema/execute of the attach and remove nodes; subclasses set the adapter's name and texts."""

    NAME: ClassVar[str]  # model_options attachment name, e.g. "training_adapter"
    TITLE: ClassVar[str]  # e.g. "Training Adapter"
    HINT: ClassVar[str]  # lower-case part of the usual file name, preselected in the picker
    ABOUT: ClassVar[str]  # what the adapter is, for the descriptions
    SETTINGS: ClassVar[str] = ""  # recommended sampling settings, for the attach node's tooltips


class _Attach(_Adapter):
    @classmethod
    def define_schema(cls) -> io.Schema:
        extra = f" {cls.SETTINGS}" if cls.SETTINGS else ""
        return io.Schema(
            node_id=f"ZIT{cls.TITLE.replace(' ', '')}Attach",
            display_name=f"ZIT {cls.TITLE}: Attach",
            category=CATEGORY,
            description=(f"Attaches the {cls.ABOUT} to the MODEL as ComfyUI patches (a LoRA of any dialect, "
                         f"or a LyCORIS LoKr / LoHa / full-diff file through ComfyUI's own adapters). "
                         f"'ZIT {cls.TITLE}: Remove' (mode exact) later takes away exactly these patches."
                         f"{extra}"),
            inputs=[
                io.Model.Input("model", tooltip="The Z-Image diffusion model."),
                lora_input(tooltip=f"The {cls.TITLE.lower()} file in the loras folders (a LoRA of any "
                                   f"dialect, or LoKr / LoHa / full diff).{extra}",
                           hint=cls.HINT),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip=f"Strength of the {cls.TITLE.lower()} (1 = as published)."
                                       f"{extra}"),
            ],
            outputs=[io.Model.Output(display_name="MODEL",
                                     tooltip=f"The model with the {cls.TITLE.lower()} attached.")],
        )

    @classmethod
    def execute(cls, model: Any, lora_name: str, strength: float) -> io.NodeOutput:
        from . import patching

        lora = patching.read_adapter_file(lora_name, patching.model_spec(model))
        return io.NodeOutput(patching.attach(model, lora, strength, name=cls.NAME, source=lora_name))


class _Remove(_Adapter):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=f"ZIT{cls.TITLE.replace(' ', '')}Remove",
            display_name=f"ZIT {cls.TITLE}: Remove",
            category=CATEGORY,
            description=(
                f"Removes the {cls.ABOUT}. exact: takes away the patches 'ZIT {cls.TITLE}: Attach' added "
                f"(found by identity), giving bit-identical weights; fails clearly if none were attached. "
                f"subtract: for a MODEL with the adapter baked into its weights, adds the file at -strength "
                f"(only approximate in bf16/fp8, where the baked weights were rounded)."),
            inputs=[
                io.Model.Input("model", tooltip="The Z-Image-Turbo diffusion model carrying the adapter."),
                io.Combo.Input("mode", options=["exact", "subtract"], default="exact", tooltip=(
                    f"exact: remove the patches attached by 'ZIT {cls.TITLE}: Attach' (lora_name and "
                    f"strength unused). subtract: add lora_name at -strength to cancel a baked-in copy.")),
                lora_input(tooltip=f"The {cls.TITLE.lower()} file to subtract (mode subtract only).",
                           hint=cls.HINT),
                io.Float.Input("strength", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="Strength the adapter was baked in with (mode subtract only)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL",
                                     tooltip=f"The model without the {cls.TITLE.lower()}.")],
        )

    @classmethod
    def execute(cls, model: Any, mode: str, lora_name: str, strength: float = 1.0) -> io.NodeOutput:
        from . import patching

        if mode == "exact":
            return io.NodeOutput(patching.remove_attachment(model, cls.NAME))
        lora = patching.read_adapter_file(lora_name, patching.model_spec(model))
        return io.NodeOutput(patching.subtract(model, lora, strength, cls.NAME))


class _TrainingAdapter:
    NAME, TITLE, HINT = "training_adapter", "Training Adapter", "adapter"
    ABOUT = ("Z-Image-Turbo training adapter (ostris' de-distilling LoRA: attach it while training or "
             "testing a LoRA on the turbo model, remove it for 8-step inference)")


class _DistillPatch:
    NAME, TITLE, HINT = "distill_patch", "DistillPatch", "distill"
    ABOUT = ("distill LoRA: the Z-Image-Turbo DistillPatch (DiffSynth: restores few-step, cfg 1 sampling "
             "over an SFT LoRA) or a Z-Image-Fun distill LoRA for the base model")
    SETTINGS = ("Recommended: Turbo DistillPatch: 8 steps, cfg 1, strength 1. Z-Image-Fun distill LoRAs "
                "for the base model: strength 0.8, cfg 1, and the steps of the file (they come as 2-, 4- "
                "and 8-step variants: 8 steps for the 8-step file, 4 for the 4-step one, 2 for the "
                "2-step one).")


class ZITTrainingAdapterAttach(_TrainingAdapter, _Attach):
    """Attach the ZIT training adapter."""


class ZITTrainingAdapterRemove(_TrainingAdapter, _Remove):
    """Remove the ZIT training adapter."""


class ZITDistillPatchAttach(_DistillPatch, _Attach):
    """Attach the ZIT DistillPatch LoRA."""


class ZITDistillPatchRemove(_DistillPatch, _Remove):
    """Remove the ZIT DistillPatch LoRA."""
