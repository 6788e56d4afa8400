"""Which lm-eval tasks a run evaluates, and where their data comes from (the Hub or a folder).

Task names are resolved without building lm-eval's whole task index (about 14,000 YAML files,
20 s on two cores) where possible: GLaM's groups and tasks come from `glam_suite`, YAML paths
are read directly, and other names are found by a quick scan of lm-eval's task folder.

Local data (`data_dir`): one folder per task, named like the task, holding one file per split
named like the split (`train.jsonl`, `validation.parquet`, `test.arrow`, ...), with the fields
of the task's Hugging Face dataset. A task found there reads those files and nothing else;
splits without a file are dropped from its config (a task with a test split in lm-eval but
only `validation.jsonl` here is evaluated on validation).
"""

import copy
import dataclasses
import difflib
import functools
import os
import pathlib
import re
import urllib.request

import lm_eval.tasks
from lm_eval.tasks import TaskManager
from lm_eval.tasks.manager import load_yaml

from keras_glam.evaluation import glam_suite

LM_EVAL_TASKS_DIR = pathlib.Path(lm_eval.tasks.__file__).parent
# File suffixes of local task data, and the `datasets` builder that reads each.
DATA_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
# Split names of class-based lm-eval tasks (their YAML names none).
DEFAULT_SPLITS = ("train", "validation", "test")
HUB_PROBE_TIMEOUT = 5.0


class TaskSelectionError(ValueError):
    """A task name, a task file or a task's data is unusable; the message says what to do."""


class MissingPackageError(TaskSelectionError):
    """An lm-eval task's code imports a package that is not installed (`reason` says which)."""

    def __init__(self, task_file, package):
        self.reason = f"lm-eval's task code needs the package {package} (pip install {package})"
        super().__init__(f"Cannot use task file {task_file}: {self.reason}.")


@dataclasses.dataclass(frozen=True)
class MissingTask:
    """A task of GLaM's suite that a run cannot evaluate, and why."""

    name: str
    reason: str


@dataclasses.dataclass
class TaskSelection:
    """The tasks of a run: lm-eval task configs (or lm-eval group/tag names) and missing tasks.

    Attributes:
        specs: dict configs (data sources already resolved) or names of lm-eval groups/tags.
        missing: `MissingTask`s of GLaM's suite that are not evaluated.
        data_dir: the local data folder, or None.
    """

    specs: list
    missing: list
    data_dir: str = None

    def load(self):
        """`{task name: lm-eval Task}`, freshly built (a Task remembers its few-shot setting).

        Raises:
            TaskSelectionError: a task's data is neither local nor reachable, or unreadable.
        """
        defaults = any(isinstance(spec, str) for spec in self.specs)
        manager = TaskManager(include_defaults=defaults)
        tasks = {}
        for spec in self.specs:
            try:
                loaded = manager.load(copy.deepcopy(spec))
            except Exception as error:  # Before the model is built: any failure is the data's.
                raise TaskSelectionError(self._load_error(spec, error)) from None
            tasks.update(loaded["tasks"])
        return tasks

    def _load_error(self, spec, error):
        name = spec if isinstance(spec, str) else spec["task"]
        detail = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        local_files = _local_data_files(spec)
        if local_files:
            return f"Task '{name}': cannot read {', '.join(local_files.values())} ({detail})."
        if isinstance(spec, str):
            source = f"the data of lm-eval group '{name}'"
        elif "class" in spec:
            source = f"the Hub dataset {spec['class'].DATASET_PATH}"
        else:
            source = f"the Hub dataset {spec.get('dataset_path')}"
        looked = (
            f"no local files ({_expected_files(self.data_dir, spec)}) and " if self.data_dir else ""
        )
        return (
            f"Task '{name}': {looked}{source} cannot be fetched ({detail}). Put its splits into "
            f"{os.path.join(self.data_dir or 'DATA_DIR', name)}/ (JSON lines, Parquet or Arrow) "
            "and pass --data-dir, or run where the Hugging Face Hub is reachable."
        )


def select_tasks(names, data_dir=None):
    """Resolve task names into a `TaskSelection`.

    Args:
        names: GLaM groups (`glam_all`, `glam_nlg`, `glam_nlu`), lm-eval task, group or tag
            names, or paths of task YAML files.
        data_dir: a folder of local task data (see the module docstring), or None.

    Raises:
        TaskSelectionError: no names, an unknown name (the message lists the closest known
            ones), a local data folder without an evaluation split.
    """
    names = [name for name in names if name and name.strip()]
    if not names:
        raise TaskSelectionError(
            "No tasks given: pass --tasks with GLaM groups (glam_all, glam_nlg, glam_nlu), "
            "lm-eval task names or task YAML files."
        )
    if data_dir is not None and not os.path.isdir(data_dir):
        raise TaskSelectionError(f"--data-dir {data_dir} is not a directory.")
    specs, missing, unknown = [], [], []
    for name in names:
        if name in glam_suite.GROUPS:
            for task in glam_suite.GROUPS[name]:
                if task.lm_eval_task is None:
                    missing.append(MissingTask(task.name, task.note))
                elif task.manual_download and not _has_local_data(data_dir, task.lm_eval_task):
                    missing.append(MissingTask(task.name, task.note))
                else:
                    try:
                        specs.append(_config_from_yaml(LM_EVAL_TASKS_DIR / task.yaml))
                    except MissingPackageError as error:
                        missing.append(MissingTask(task.name, error.reason))
            continue
        spec = _resolve(name)
        if spec is None:
            unknown.append(name)
        else:
            specs.append(spec)
    if unknown:
        raise TaskSelectionError(_unknown_names_message(unknown))
    if data_dir is not None:
        specs = [_with_local_data(spec, data_dir) for spec in specs]
    return TaskSelection(
        specs=_deduplicated(specs), missing=_deduplicated(missing), data_dir=data_dir
    )


def go_offline():
    """Switch `huggingface_hub` and `datasets` to offline mode: no request, no retry loop."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets
    import huggingface_hub

    huggingface_hub.constants.HF_HUB_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True


def hub_reachable(timeout=HUB_PROBE_TIMEOUT):
    """Whether the Hugging Face Hub answers within `timeout` seconds (any HTTP answer counts)."""
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    try:
        request = urllib.request.Request(huggingface_hub.constants.ENDPOINT, method="HEAD")
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def _resolve(name):
    """A config dict or lm-eval group/tag name for `name`; None if unknown."""
    if name.endswith((".yaml", ".yml")) or os.path.isfile(name):
        if not os.path.isfile(name):
            raise TaskSelectionError(f"Task file {name} does not exist.")
        return _config_from_yaml(pathlib.Path(name))
    suite_task = glam_suite.glam_task(name)
    if suite_task is not None:
        return _config_from_yaml(LM_EVAL_TASKS_DIR / suite_task.yaml)
    tasks, groups = _lm_eval_names()
    if name in tasks:
        return _config_from_yaml(tasks[name])
    if name in groups:
        return name
    return None


def _config_from_yaml(path):
    try:
        config = load_yaml(path, resolve_func=True, recursive=True)
    except ModuleNotFoundError as error:
        raise MissingPackageError(path, error.name) from None
    except Exception as error:  # A YAML or import error in the task file: say which file.
        raise TaskSelectionError(f"Cannot read task file {path}: {error}") from None
    if "task" not in config:
        raise TaskSelectionError(f"{path} defines no task (no 'task:' key).")
    return config


@functools.lru_cache(maxsize=1)
def _lm_eval_names():
    """`({task name: yaml path}, {group and tag names})` of lm-eval's task folder, by a text scan.

    A scan of `task:`, `group:` and `tag:` lines: 2 s, where building lm-eval's index takes 20.
    """
    scalar = re.compile(r"^(task|group|tag):[ \t]*[\"']?([^\s\"'#\[]+)", re.MULTILINE)
    listed = re.compile(r"^tag:[ \t]*\n((?:[ \t]+-[ \t]*\S+[ \t]*\n)+)", re.MULTILINE)
    tasks, groups = {}, set()
    for path in sorted(LM_EVAL_TASKS_DIR.rglob("*.yaml")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        for key, value in scalar.findall(text):
            if key == "task":
                tasks.setdefault(value, path)
            else:
                groups.add(value)
        for block in listed.findall(text):
            groups.update(
                item.strip().lstrip("-").strip().strip("\"'") for item in block.splitlines()
            )
    return tasks, groups


def _unknown_names_message(unknown):
    tasks, groups = _lm_eval_names()
    known = set(tasks) | groups | set(glam_suite.GROUPS)
    parts = []
    for name in unknown:
        closest = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
        hint = f"closest: {', '.join(closest)}" if closest else "no close name"
        parts.append(f"'{name}' ({hint})")
    return (
        f"Unknown task {'; '.join(parts)}. GLaM groups: {', '.join(glam_suite.GROUPS)}; a task "
        "YAML file also works."
    )


def _split_names(spec):
    if "class" in spec:
        return list(DEFAULT_SPLITS)
    names = [spec.get(key) for key in SPLIT_KEYS]
    return list(dict.fromkeys(name for name in names if name))


def _expected_files(data_dir, spec):
    name = spec if isinstance(spec, str) else spec["task"]
    splits = DEFAULT_SPLITS if isinstance(spec, str) else _split_names(spec)
    suffixes = "|".join(DATA_FORMATS)
    return ", ".join(os.path.join(data_dir, name, f"{split}{{{suffixes}}}") for split in splits)


def _local_files(data_dir, task_name, splits):
    folder = pathlib.Path(data_dir, task_name)
    files = {}
    for split in splits:
        for suffix in DATA_FORMATS:
            path = folder / f"{split}{suffix}"
            if path.is_file():
                files[split] = path
                break
    return files


def _has_local_data(data_dir, task_name):
    return data_dir is not None and pathlib.Path(data_dir, task_name).is_dir()


def _with_local_data(spec, data_dir):
    """`spec` reading the task's files under `data_dir`, or `spec` unchanged if it has none."""
    if isinstance(spec, str):
        return spec
    files = _local_files(data_dir, spec["task"], _split_names(spec))
    if not files:
        return spec
    formats = {DATA_FORMATS[path.suffix] for path in files.values()}
    if len(formats) > 1:
        raise TaskSelectionError(
            f"Task '{spec['task']}': {os.path.join(data_dir, spec['task'])} mixes formats "
            f"({', '.join(sorted(formats))}); keep one format per task."
        )
    (data_format,) = formats
    data_files = {split: str(path) for split, path in files.items()}
    if "class" in spec:
        return {**spec, "class": _class_reading(spec["class"], data_format, data_files)}
    local = {
        **spec,
        "dataset_path": data_format,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": data_files},
    }
    for key in SPLIT_KEYS:
        if local.get(key) and local[key] not in data_files:
            local[key] = None
    if not (local.get("validation_split") or local.get("test_split")):
        raise TaskSelectionError(
            f"Task '{spec['task']}': no evaluation split under {data_dir} (looked for "
            f"{_expected_files(data_dir, spec)})."
        )
    return local


def _class_reading(task_class, data_format, data_files):
    """A subclass of a class-based lm-eval task that reads `data_files` instead of the Hub."""

    def download(self, *args, **kwargs):
        import datasets

        self.dataset = datasets.load_dataset(data_format, data_files=data_files)

    return type(
        task_class.__name__,
        (task_class,),
        {
            "download": download,
            "DATASET_PATH": data_format,
            "DATASET_NAME": None,
            "LOCAL_DATA_FILES": data_files,
        },
    )


def _local_data_files(spec):
    """`{split: path}` of a spec that reads local files, else None."""
    if isinstance(spec, str):
        return None
    if "class" in spec:
        return getattr(spec["class"], "LOCAL_DATA_FILES", None)
    if spec.get("dataset_path") in DATA_FORMATS.values():
        return (spec.get("dataset_kwargs") or {}).get("data_files")
    return None


def _deduplicated(items):
    seen, unique = set(), []
    for item in items:
        key = item if isinstance(item, (str, MissingTask)) else item["task"]
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique
