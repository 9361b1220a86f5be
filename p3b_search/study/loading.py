"""Loading a study: from its YAML file (paths resolved, every check run) or from its folder.

:func:`load_study` checks everything before any compute and raises
:class:`~p3b_search.study.messages.StudyError` with one line naming the field and the fix.
Relative paths (``output_dir``, ``data.root``, a ``model.weights`` file) are resolved against
the current directory when the study is loaded (trials run elsewhere).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from p3b_search.errors import first_line
from p3b_search.study.checks import check_study
from p3b_search.study.field_error import FieldError
from p3b_search.study.layout import StudyLayout
from p3b_search.study.messages import StudyError, first_error
from p3b_search.study.sections import StudyConfig

_NAMED_WEIGHTS = ("source-pretrained", "hub")


def load_study(path: str | Path) -> StudyConfig:
    """Read and fully validate a study file; raise :class:`StudyError` (one line) on any problem."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise StudyError(f"{source}: cannot read the study file ({error.strerror})") from None
    return parse_study(text, source)


def parse_study(text: str, source: str) -> StudyConfig:
    """A study from the YAML text of a study file (``source`` names it in messages), checked as
    :func:`load_study` checks a file (e.g. the study stored in a table's metadata)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(error, "problem", None) or first_line(error)
        raise StudyError(f"{where}: invalid YAML: {problem}") from None
    if raw is None:
        raise StudyError(f"{source}: the study file is empty: start from studies/quickstart.yaml")
    if not isinstance(raw, dict):
        raise StudyError(f"{source}: the study file must be a mapping of key: value (got {type(raw).__name__})")
    return _validated(_resolve_paths(raw), source)


def _resolve_paths(raw: dict[str, Any]) -> dict[str, Any]:
    """Make relative paths absolute against the current directory (trials run elsewhere)."""
    raw = dict(raw)
    if isinstance(raw.get("output_dir", "runs"), str):
        raw["output_dir"] = str(Path(raw.get("output_dir", "runs")).expanduser().resolve())
    data = raw.get("data")
    if isinstance(data, dict) and isinstance(data.get("root"), str):
        raw["data"] = {**data, "root": str(Path(data["root"]).expanduser().resolve())}
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("weights"), str) and model["weights"] not in _NAMED_WEIGHTS:
        raw["model"] = {**model, "weights": str(Path(model["weights"]).expanduser().resolve())}
    return raw


def _validated(raw: dict[str, Any], source: str) -> StudyConfig:
    try:
        study = StudyConfig.model_validate(raw)
    except ValidationError as error:
        field, reason = first_error(error, StudyConfig)
        raise StudyError(f"{source}: {field}: {reason}", field, reason) from None
    study._source = source
    try:
        study = check_study(study)
    except FieldError as error:
        raise StudyError(f"{source}: {error.path}: {error.message}", error.path, error.message) from None
    return study


def with_overrides(study: StudyConfig, **changes: Any) -> StudyConfig:
    """A copy of ``study`` with top-level fields replaced (e.g. ``n_trials``), checked again."""
    data = study.model_dump(mode="python")
    data.update(changes)
    if "output_dir" in changes:
        data["output_dir"] = Path(changes["output_dir"]).expanduser().resolve()
    return _validated(data, study.source)


def study_from_folder(folder: str | Path) -> StudyConfig:
    """The study saved in a study folder (``<output_dir>/<name>``) by ``search.py run``."""
    layout = StudyLayout(Path(folder).expanduser().resolve())
    if not layout.study_file.exists():
        raise StudyError(f"{folder}: not a study folder (no study.yaml): give the folder printed by "
                         "`search.py run`, e.g. runs/quickstart")
    study = load_study(layout.study_file)
    if study.layout.root != layout.root:  # the folder was moved or renamed since the study ran
        study = with_overrides(study, output_dir=layout.root.parent, name=layout.root.name)
    return study


def study_folder(name: str, output_dir: str) -> Path:
    """The study folder NAME refers to: a folder, a study file, or a name under ``output_dir``."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return load_study(path).layout.root
    candidate = Path(output_dir).expanduser() / name
    if candidate.is_dir():
        return candidate
    raise StudyError(f"study {name!r}: no study folder {candidate}: pass the folder printed by `search.py run`, "
                     "the study file, or set --output-dir to where the study ran")
