"""GLaM's builtin presets: one KerasHub preset directory per name, in the repository's `presets/`.

No GLaM weights were ever published, so a builtin preset is an *architecture*: its directory holds
`config.json` (what `save_to_preset` writes for the backbone), `metadata.json` (the description)
and a model card `README.md`, but no weights, and `from_preset` builds it with GLaM's random
initialisation. The paper's 11 sizes count a 32,000-entry vocabulary (the size the paper's
parameter table implies) and have no tokenizer; the small presets add `tokenizer.json`,
`preprocessor.json` and a 4096-piece SentencePiece vocabulary trained on Python's documentation
(`assets/tokenizer/vocabulary.spm`; `python -m keras_glam.data.vocabulary` regenerates it).

The files are the truth: `count_params`, the planner, the `presets` listings and the README's
table all read them. keras-hub's own registry (`register_presets`) is private and would list our
names among keras-hub's; instead `GLaMPresets` gives each GLaM class a `from_preset` that turns a
builtin name into its directory and hands that to keras-hub's own loader, as any other preset.
"""

import difflib
import functools
import json
import os
import pathlib

import keras
import keras_hub

_HANDLE_SCHEMES = ("hf://", "kaggle://", "gs://", "modelscope://")
# The files keras-hub reads from a preset: configs, weights (one file, or an index and its
# shards) and assets. A repository may hold more (keras_glam's training checkpoints with their
# optimizer state under checkpoints/), which loading a revision must not download.
_PRESET_FILE_PATTERNS = (
    "config.json",
    "metadata.json",
    "task.json",
    "preprocessor.json",
    "tokenizer.json",
    "model.weights.h5",
    "model.weights.json",
    "model_*.weights.h5",
    "task.weights.h5",
    "assets/*",
)


@functools.cache
def _presets_root():
    package = pathlib.Path(__file__).resolve().parents[1]
    # A wheel installs them as package data (keras_glam/presets/); a source checkout has them
    # at the top level, beside the package.
    candidates = (package / "presets", package.parent / "presets")
    for root in candidates:
        if root.is_dir():
            return root
    raise FileNotFoundError(
        f"keras_glam's builtin presets are missing (looked in {candidates[0]} and "
        f"{candidates[1]}). Reinstall keras-glam."
    )


@functools.cache
def builtin_preset_names():
    """The builtin preset names, sorted: the directories of `presets/`.

    Example:

    >>> builtin_preset_names()[:3]
    ('glam_0.1b', 'glam_0.1b_64e', 'glam_1.7b')
    """
    root = _presets_root()
    return tuple(sorted(path.name for path in root.iterdir() if (path / "config.json").is_file()))


def builtin_preset_directory(preset):
    """The preset directory of a builtin preset name, or None if `preset` is not one.

    Example:

    >>> os.path.basename(builtin_preset_directory("glam_tiny_8e")), builtin_preset_directory("x")
    ('glam_tiny_8e', None)
    """
    if isinstance(preset, str) and preset in builtin_preset_names():
        return str(_presets_root() / preset)
    return None


def _has_tokenizer(directory):
    return os.path.isfile(os.path.join(directory, "tokenizer.json"))


def builtin_preset_has_tokenizer(preset):
    """Whether builtin preset `preset` ships a vocabulary (the paper's sizes do not).

    Example:

    >>> builtin_preset_has_tokenizer("glam_tiny_8e"), builtin_preset_has_tokenizer("glam_8b")
    (True, False)
    """
    directory = builtin_preset_directory(preset)
    if directory is None:
        raise ValueError(f"'{preset}' is not a builtin preset name.")
    return _has_tokenizer(directory)


def builtin_presets():
    """`{name: {"description": ..., "params": total, "activated_params": ...}}` of the builtins:
    each preset's `metadata.json` and the counts of its `config.json`."""
    # parameter_count reads presets through this module.
    from keras_glam.models.parameter_count import count_params

    listing = {}
    for name in builtin_preset_names():
        with open(os.path.join(builtin_preset_directory(name), "metadata.json"),
                  encoding="utf-8") as file:
            metadata = json.load(file)
        total, activated = count_params(name)
        listing[name] = {**metadata, "params": total, "activated_params": activated}
    return listing


def resolve_handle(preset, revision=None):
    """The preset to give keras-hub's loader: a builtin name's directory, or the handle itself.

    keras-hub downloads `hf://` presets at the head of `main` only; a `revision` (a branch, tag
    or commit id, also written `hf://org/name@revision`) is fetched here with
    `huggingface_hub.snapshot_download` (the preset's files only) and loaded from the local
    snapshot. A builtin name wins over a local directory of the same name.

    Raises:
        ValueError: an unknown name (with the closest builtin names), a file, or a revision
            for anything but an `hf://` handle.
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

        return huggingface_hub.snapshot_download(
            repo_id=repo_id, revision=revision, allow_patterns=list(_PRESET_FILE_PATTERNS)
        )
    if revision is not None:
        raise ValueError(f"revision= applies to hf:// handles only, got preset '{preset}'.")
    builtin = builtin_preset_directory(preset)
    if builtin is not None:
        return builtin
    if preset.startswith(_HANDLE_SCHEMES) or os.path.isdir(preset):
        return preset
    if os.path.exists(preset):
        raise ValueError(
            f"Preset '{preset}' is a file, not a preset directory. Pass the directory that "
            "holds config.json (as written by save_to_preset)."
        )
    names = builtin_preset_names()
    close = difflib.get_close_matches(preset, names, n=3, cutoff=0.7)
    suggestion = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"Unknown preset '{preset}'.{suggestion} Builtin GLaM presets: {', '.join(names)}. "
        "Alternatively pass a local preset directory (from save_to_preset) or a handle such "
        "as hf://org/name."
    )


def local_backbone_config(preset):
    """The backbone config of a builtin preset name or a local preset directory, read from its
    `config.json` without building anything (remote handles are not read here).

    Raises:
        ValueError: naming what is wrong: an unknown name (with the closest builtin names), a
            file, a remote handle, a directory without a readable `config.json`, or a preset
            of another model.
    """
    directory = resolve_handle(preset)
    if directory.startswith(_HANDLE_SCHEMES):
        raise ValueError(
            f"Preset '{directory}' is a remote handle; only builtin names and local preset "
            "directories are read here. Download it first (e.g. `GLaMCausalLM.from_preset("
            "handle).save_to_preset(directory)`) and pass the directory."
        )
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        inner = os.path.join(directory, "preset")  # A glam-train output directory.
        has_inner = os.path.isfile(os.path.join(inner, "config.json"))
        hint = f" Did you mean {inner}?" if has_inner else ""
        raise ValueError(
            f"'{directory}' is not a preset directory: it has no config.json.{hint} Pass a "
            "directory written by save_to_preset, or a builtin preset name."
        )
    try:
        with open(path, encoding="utf-8") as file:
            saved = json.load(file)
        registered_name, config = saved["registered_name"], dict(saved["config"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"'{path}' is not a readable preset config ({type(error).__name__}: {error}). "
            "Save the preset again with save_to_preset."
        ) from None
    from keras_glam.models.glam_backbone import GLaMBackbone  # Imports this module.

    glam_name = keras.saving.get_registered_name(GLaMBackbone)
    if registered_name != glam_name:
        raise ValueError(
            f"'{directory}' holds a {registered_name} preset, not a GLaM one ({glam_name}). "
            "Pass a GLaM preset directory or a builtin preset name."
        )
    return config


def no_tokenizer_error(preset):
    return ValueError(
        f"Preset '{preset}' is an architecture preset without a vocabulary (GLaM's own "
        "vocabulary was never published). Build the task with a tokenizer of your own: "
        f"GLaMCausalLM.from_preset('{preset}', preprocessor=GLaMCausalLMPreprocessor("
        "GLaMTokenizer(proto='your.spm'))) with a vocabulary_size matching it, or use "
        "preprocessor=None and feed token ids."
    )


class classproperty(property):
    """A read-only property of the class (keras-hub's own is private)."""

    def __get__(self, _, owner_cls):
        return self.fget(owner_cls)


class GLaMPresets:
    """`presets` and `from_preset` of the GLaM classes, mixed in before their keras-hub base.

    `from_preset(preset, ..., revision=None, **kwargs)` takes a builtin name, a preset directory
    or a handle (`hf://org/name`, `hf://org/name@revision`, `kaggle://...`) and loads it with
    keras-hub's own loader. A builtin name is its directory under `presets/`, loaded without
    weights (it has none: GLaM's random initialisation); a builtin without a vocabulary gives a
    task `preprocessor=None` (unless one is passed) and refuses to build a tokenizer or a
    preprocessor. `presets` lists the builtins with their parameter counts.
    """

    @classproperty
    def presets(cls):
        return builtin_presets()

    @classmethod
    def from_preset(cls, preset, *args, revision=None, **kwargs):
        directory = resolve_handle(preset, revision)
        builtin = builtin_preset_directory(preset)
        if builtin is not None:
            if issubclass(cls, keras_hub.models.Task) and not _has_tokenizer(builtin):
                kwargs.setdefault("preprocessor", None)
            if issubclass(cls, (keras_hub.models.Backbone, keras_hub.models.Task)):
                args, kwargs["load_weights"] = (), False
            elif not _has_tokenizer(builtin):
                raise no_tokenizer_error(preset)
        return super().from_preset(directory, *args, **kwargs)
