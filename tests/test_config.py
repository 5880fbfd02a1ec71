"""The training config: defaults, table-driven validation, error messages, TOML round trip, overrides."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer.config import (
    FIELDS,
    SECTIONS,
    ConfigError,
    TrainConfig,
    apply_overrides,
    check_field,
    config_diff,
    config_from_dict,
    config_to_dict,
    config_to_toml,
    load_config,
)
from trainer.errors import ZitError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MINIMAL = {"model": {"transformer": "tiny"}, "data": {"dataset": "images"}, "preview": {"prompts": ["a cat"]}}


def _with(**sections: dict) -> dict:
    """MINIMAL with some sections' keys added or replaced."""
    out = {name: dict(values) for name, values in MINIMAL.items()}
    for name, values in sections.items():
        out.setdefault(name, {}).update(values)
    return out


def _errors(d: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(d)
    return info.value.errors


def test_defaults_are_zit_defaults() -> None:
    cfg = config_from_dict(MINIMAL)
    assert cfg.lora.rank == 32 and cfg.lora.alpha == 32.0
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.999) and cfg.optim.steps == 2000
    assert cfg.data.resolutions == (1024,) and cfg.data.caption_dropout == 0.05
    assert cfg.objective.shift == 3.0 and cfg.preview.turbo_steps == 8 and cfg.preview.deturbo_cfg == 2.0
    assert cfg.model.dtype == "bf16" and cfg.model.gradient_checkpointing is True
    assert cfg.save.every == 250 and cfg.save.keep_last == 3 and cfg.save.state is True
    assert cfg.turbo.mode == "sft" and cfg.turbo.dg_scale == 0.0


def test_every_field_has_doc_and_valid_default() -> None:
    for spec in FIELDS.values():
        assert spec.doc, spec.dotted
        assert check_field(spec.dotted, spec.default) == spec.default
    assert set(SECTIONS) == {"model", "data", "lora", "turbo", "objective", "optim", "save", "preview", "log"}


def test_config_error_is_a_value_error_and_zit_error() -> None:
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, ZitError)


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("optim", "lr", -1, "optim.lr = -1: must be > 0"),
        ("optim", "steps", 1.5, "optim.steps = 1.5: must be an integer"),
        ("optim", "steps", True, "optim.steps = true: must be an integer"),
        ("optim", "lr", "fast", 'optim.lr = "fast": must be a number'),
        ("optim", "lr", math.nan, "optim.lr = nan: must be finite"),
        ("model", "gradient_checkpointing", 1, "model.gradient_checkpointing = 1: must be true or false"),
        (
            "model",
            "dtype",
            "bf32",
            'model.dtype = "bf32": must be one of "bf16", "fp16", "fp32" (did you mean',
        ),
        ("data", "caption_dropout", 1.0, "data.caption_dropout = 1.0: must be < 1"),
        (
            "data",
            "resolutions",
            [1024, 1000],
            "data.resolutions = [1024, 1000]: item 1000 must be a multiple of 16",
        ),
        ("data", "resolutions", [], "data.resolutions = []: must have at least 1 item"),
        ("data", "resolutions", 1024, "data.resolutions = 1024: must be a list of integers"),
        ("data", "caption_ext", "txt", "data.caption_ext = \"txt\": must start with '.'"),
        ("optim", "betas", [0.9], "optim.betas = [0.9]: must have exactly 2 items"),
        ("optim", "betas", [0.9, 1.0], "optim.betas = [0.9, 1.0]: item 1.0 must be < 1"),
        ("preview", "width", 1000, "preview.width = 1000: must be a multiple of 16"),
        ("preview", "prompts", ["a", 3], 'preview.prompts = ["a", 3]: item 3 must be a string'),
        ("save", "name", "../x", 'save.name = "../x": must be a file name'),
        ("save", "keep_last", -1, "save.keep_last = -1: must be >= 0"),
        ("lora", "rank", 0, "lora.rank = 0: must be >= 1"),
    ],
)
def test_field_errors_name_field_and_value(section: str, key: str, value: object, message: str) -> None:
    errors = _errors(_with(**{section: {key: value}}))
    assert len(errors) == 1 and errors[0].startswith(message), errors


def test_ints_are_accepted_for_floats() -> None:
    cfg = config_from_dict(_with(optim={"lr": 1, "betas": [0, 0]}, lora={"alpha": 16}))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.lora.alpha == 16.0
    assert cfg.optim.betas == (0.0, 0.0) and all(isinstance(b, float) for b in cfg.optim.betas)


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ({"optim": {"stpes": 3}}, "unknown key optim.stpes (did you mean optim.steps?)"),
        ({"optim": {"batch_size": 3}}, "unknown key optim.batch_size (did you mean data.batch_size?)"),
        ({"optimizer": {"lr": 1.0}}, "unknown section [optimizer] (did you mean [optim]?)"),
        ({"lr": 1.0}, "unknown top-level key lr (did you mean optim.lr?)"),
        ({"optim": 3}, "optim = 3: must be a table [optim]"),
    ],
)
def test_unknown_keys_and_sections_suggest(d: dict, message: str) -> None:
    assert _errors(_with(**{}) | d) == [message]


def test_all_errors_are_reported_at_once_with_source() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict(_with(optim={"lr": -1, "eps": 0}, lora={"rank": 0}), source="run.toml")
    assert len(info.value.errors) == 3
    assert str(info.value).startswith("run.toml: 3 problems:")


@pytest.mark.parametrize(
    ("d", "fragment"),
    [
        ({"model": {"transformer": ""}}, "model.transformer is required"),
        ({"data": {"dataset": ""}}, "data.dataset is required"),
        (
            {"model": {"transformer": "zit.safetensors", "vae": "ae.safetensors"}},
            "model.text_encoder is required",
        ),
        ({"lora": {"targets": "custom"}}, 'lora.target_regex is required when lora.targets = "custom"'),
        (
            {"lora": {"targets": "custom", "target_regex": "(to_q"}},
            'lora.target_regex = "(to_q": not a valid regex',
        ),
        (
            {"lora": {"target_regex": "to_q"}},
            'lora.target_regex = "to_q": only used when lora.targets = "custom"',
        ),
        ({"turbo": {"mode": "adapter"}}, 'turbo.adapter is required when turbo.mode = "adapter"'),
        (
            {"turbo": {"adapter": "a.safetensors"}},
            'turbo.adapter = "a.safetensors": only used when turbo.mode',
        ),
        (
            {"turbo": {"guidance_scale": 2.0}},
            'turbo.guidance_scale = 2.0: only used when turbo.mode = "adapter_dg"',
        ),
        (
            {"turbo": {"mode": "adapter_dg", "adapter": "a", "guidance_scale": 0}},
            "turbo.guidance_scale = 0.0: no",
        ),
        ({"data": {"missing_caption": "trigger"}}, "data.trigger is required"),
        ({"optim": {"warmup_steps": 10}}, 'the "constant" scheduler has no warmup'),
        ({"optim": {"scheduler": "cosine", "warmup_steps": 10, "steps": 10}}, "must be < optim.steps (10)"),
        (
            {"optim": {"scheduler": "cosine_with_restarts", "restarts": 11, "steps": 10}},
            "more cycles than steps",
        ),
        ({"optim": {"optimizer": "prodigy"}}, "optim.lr = 0.0001: Prodigy estimates the step size itself"),
        ({"preview": {"prompts": []}}, "preview.prompts is empty but preview.every = 250"),
    ],
)
def test_cross_field_rules(d: dict, fragment: str) -> None:
    errors = _errors(_with(**d))
    assert any(fragment in e for e in errors), errors


def test_valid_mode_combinations() -> None:
    cfg = config_from_dict(
        _with(
            model={
                "transformer": "zit.safetensors",
                "text_encoder": "qwen.safetensors",
                "vae": "ae.safetensors",
            },
            lora={"targets": "custom", "target_regex": r"layers\.\d+\.attention\.to_[qkv]"},
            turbo={"mode": "adapter_dg", "adapter": "adapter.safetensors", "guidance_scale": 2.5},
            optim={"optimizer": "prodigy", "lr": 1.0, "scheduler": "cosine", "warmup_steps": 100},
            preview={"every": 0, "prompts": []},
        )
    )
    assert cfg.turbo.dg_scale == 2.5


def _non_default() -> TrainConfig:
    """A valid config where many fields differ from their defaults, including awkward strings."""
    return config_from_dict(
        _with(
            model={"transformer": "C:\\models\\zit dir", "dtype": "fp32", "gradient_checkpointing": False},
            data={
                "caption": 'say "hi"\n\tand \\ bye \u00e9\u4e2d\x7f\x00',
                "resolutions": [512, 768, 1024],
                "repeats": 3,
            },
            lora={"rank": 16, "alpha": 8.5, "targets": "custom", "target_regex": r"\.attention\.to_q$"},
            turbo={"mode": "adapter", "adapter": "/a/b.safetensors", "adapter_strength": 0.75},
            objective={"timesteps": "logit_normal", "logit_mean": -0.5, "loss": "huber", "huber_delta": 0.1},
            optim={
                "lr": 3.3e-5,
                "eps": 1e-30,
                "scheduler": "cosine_with_restarts",
                "warmup_steps": 7,
                "ema": True,
            },
            save={"name": "my lora v2", "keep_last": 0},
            preview={"prompts": ["a", "b # not a comment", ""], "width": 768, "deturbo": True},
        )
    )


@pytest.mark.parametrize("comments", [True, False])
def test_toml_round_trip_is_identity(comments: bool) -> None:
    for cfg in (config_from_dict(MINIMAL), _non_default()):
        text = config_to_toml(cfg, comments=comments)
        assert config_from_dict(tomllib.loads(text)) == cfg
        assert config_from_dict(config_to_dict(cfg)) == cfg


def test_load_config_file(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(config_to_toml(_non_default()), encoding="utf-8")
    assert load_config(path) == _non_default()
    path.write_text("[optim]\nlr = = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run\.toml: invalid TOML"):
        load_config(path)


def test_to_dict_is_plain_and_json_ready() -> None:
    import json

    d = config_to_dict(_non_default())
    assert d["data"]["resolutions"] == [512, 768, 1024] and isinstance(d["optim"]["betas"], list)
    assert json.loads(json.dumps(d)) == d


def test_apply_overrides() -> None:
    base = config_from_dict(MINIMAL)
    cfg = apply_overrides(
        base, 'optim.lr = 2e-4\n[data]\nresolutions = [512]\n[lora]\nsave_dialect = "kohya"'
    )
    assert cfg.optim.lr == 2e-4 and cfg.data.resolutions == (512,) and cfg.lora.save_dialect == "kohya"
    assert cfg.optim.steps == base.optim.steps and cfg.data.dataset == "images"
    assert apply_overrides(base, "  \n# nothing\n") is base
    with pytest.raises(ConfigError, match=r"^advanced settings: unknown key optim\.lerning_rate"):
        apply_overrides(base, "optim.lerning_rate = 1")
    with pytest.raises(ConfigError, match="advanced settings: invalid TOML"):
        apply_overrides(base, "optim.lr = ")


def test_config_diff() -> None:
    a = config_from_dict(MINIMAL)
    b = apply_overrides(a, "optim.lr = 2e-4\ndata.resolutions = [512]")
    assert config_diff(a, b) == ["data.resolutions: [1024] -> [512]", "optim.lr: 0.0001 -> 0.0002"]
    assert config_diff(a, a) == []


def test_check_field_unknown_and_config_is_frozen() -> None:
    with pytest.raises(ConfigError, match=r"unknown key optim\.lrr \(did you mean optim\.lr\?\)"):
        check_field("optim.lrr", 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config_from_dict(MINIMAL).optim.lr = 1.0  # type: ignore[misc]


def test_paths() -> None:
    cfg = config_from_dict(_with(save={"output_dir": "out", "name": "run1"}))
    assert cfg.run_dir.as_posix() == "out/run1" and cfg.cache_path.as_posix() == "out/cache"
    assert apply_overrides(cfg, 'data.cache_dir = "/c"').cache_path.as_posix() == "/c"


# Fields whose values interact in cross-field rules keep MINIMAL's values in the property test below.
_LINKED = {
    "model.transformer", "model.text_encoder", "model.vae", "data.dataset", "data.missing_caption",
    "lora.targets", "lora.target_regex", "turbo.mode", "turbo.adapter", "turbo.adapter_strength",
    "turbo.teacher_steps", "turbo.teacher_cfg", "turbo.teacher_seeds", "turbo.teacher_prompts",
    "model.family", "preview.turbo_model", "turbo.distill_into", "turbo.rollout",
    "turbo.rollout_weight",
    "turbo.guidance_scale", "optim.optimizer", "optim.scheduler", "optim.warmup_steps", "optim.restarts",
    "preview.every", "preview.prompts", "model.memory", "model.memory_preference", "model.swap_blocks",
    "model.swap_prefetch", "model.lower_resolution", "model.gradient_checkpointing",
}  # fmt: skip


def _number(spec):  # noqa: ANN202 - hypothesis strategy
    """Ints or finite floats inside the field's bounds (and on its multiple_of grid)."""
    if spec.kind is int:
        lo = spec.ge if spec.ge is not None else -(2**40)
        hi = spec.le if spec.le is not None else (spec.lt - 1 if spec.lt is not None else 2**40)
        step = spec.multiple_of or 1
        return st.integers(-(-int(lo) // step), int(hi) // step).map(lambda i: i * step)
    return st.floats(
        min_value=spec.gt if spec.gt is not None else (spec.ge if spec.ge is not None else -1e300),
        max_value=spec.lt if spec.lt is not None else (spec.le if spec.le is not None else 1e300),
        exclude_min=spec.gt is not None,
        exclude_max=spec.lt is not None,
        allow_nan=False,
    )


def _strategy(spec):  # noqa: ANN202 - hypothesis strategy
    """Valid values of one field, from its FieldSpec."""
    if spec.choices:
        return st.sampled_from(spec.choices)
    if spec.kind is bool:
        return st.booleans()
    if spec.kind is str:
        return st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
    if spec.kind is tuple:
        item = _strategy(dataclasses.replace(spec, kind=spec.item))
        return st.lists(item, min_size=spec.length or spec.min_len, max_size=spec.length or 4)
    return _number(spec)


_FREE = {d: _strategy(s) for d, s in FIELDS.items() if d not in _LINKED and not s.pattern}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=_FREE))
def test_round_trip_property(values: dict) -> None:
    d = _with()
    for dotted, value in values.items():
        section, key = dotted.split(".")
        d[section] = {**d.get(section, {}), key: value}
    cfg = config_from_dict(d)
    assert config_from_dict(tomllib.loads(config_to_toml(cfg))) == cfg
    assert config_from_dict(config_to_dict(cfg)) == cfg
