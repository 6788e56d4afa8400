"""Builtin preset names for `from_preset`, resolved with public keras-hub API only.

keras-hub's own registry (`register_presets`) is private and would list our names among
keras-hub's; instead each GLaM class overrides `from_preset`: a builtin name is built here from
`glam_presets.BACKBONE_PRESETS` (architectures, randomly initialised, plus the shipped vocabulary),
and anything else (a directory, `hf://org/name`, `kaggle://...`) goes to keras-hub's loader.
"""

import importlib.resources
import os

from keras_glam.models.glam_presets import BACKBONE_PRESETS

_HANDLE_SCHEMES = ("hf://", "kaggle://", "gs://", "modelscope://")


class classproperty(property):
    """A read-only property of the class (keras-hub's own is private)."""

    def __get__(self, _, owner_cls):
        return self.fget(owner_cls)


def preset_metadata():
    """`{name: {"description": ..., "params": total, "activated_params": ...}}` of builtins."""
    from keras_glam.models.parameter_count import count_params

    metadata = {}
    for name, preset in BACKBONE_PRESETS.items():
        total, activated = count_params(preset["config"])
        metadata[name] = {
            "description": preset["description"],
            "params": total,
            "activated_params": activated,
            "path": "glam",
        }
    return metadata


def builtin_backbone_config(preset):
    """The backbone config of a builtin preset name, else None."""
    if isinstance(preset, str) and preset in BACKBONE_PRESETS:
        return dict(BACKBONE_PRESETS[preset]["config"])
    return None


def builtin_vocabulary_path(preset):
    """Path of the SentencePiece model shipped for a builtin preset, or None if it has none."""
    filename = BACKBONE_PRESETS[preset]["vocabulary"]
    if filename is None:
        return None
    return str(importlib.resources.files("keras_glam") / "presets" / filename)


def resolve_handle(preset, revision=None):
    """The handle to give keras-hub's loader, or a clear error for an unknown one.

    keras-hub downloads `hf://` presets at the head of `main` only; a `revision` (a branch, tag
    or commit id, also written `hf://org/name@revision`) is fetched here with
    `huggingface_hub.snapshot_download` and loaded from the local snapshot.
    """
    if not isinstance(preset, (str, os.PathLike)):
        raise TypeError(
            f"preset must be a preset name, a directory or a handle, got {type(preset).__name__}."
        )
    preset = os.fspath(preset)
    if preset.startswith("hf://"):
        repo_id, _, handle_revision = preset.removeprefix("hf://").partition("@")
        if handle_revision and revision and handle_revision != revision:
            raise ValueError(
                f"Two revisions given: '{handle_revision}' in the handle and '{revision}' as "
                "an argument. Pass one."
            )
        revision = revision or handle_revision
        if not revision:
            return preset
        import huggingface_hub

        return huggingface_hub.snapshot_download(repo_id=repo_id, revision=revision)
    if revision is not None:
        raise ValueError(f"revision= applies to hf:// handles only, got preset '{preset}'.")
    if preset.startswith(_HANDLE_SCHEMES) or os.path.isdir(preset):
        return preset
    known = ", ".join(BACKBONE_PRESETS)
    if os.path.exists(preset):
        raise ValueError(
            f"Preset '{preset}' is a file, not a preset directory. Pass the directory that "
            "holds config.json (as written by save_to_preset)."
        )
    raise ValueError(
        f"Unknown preset '{preset}'. Builtin GLaM presets: {known}. Alternatively pass a "
        "local preset directory (from save_to_preset) or a handle such as hf://org/name."
    )


def no_tokenizer_error(preset):
    return ValueError(
        f"Preset '{preset}' is an architecture preset without a vocabulary (GLaM's own "
        "vocabulary was never published). Build the task with a tokenizer of your own: "
        f"GLaMCausalLM.from_preset('{preset}', preprocessor=GLaMCausalLMPreprocessor("
        "GLaMTokenizer(proto='your.spm'))) with a vocabulary_size matching it, or use "
        "preprocessor=None and feed token ids."
    )
