"""Which search-space keys a trial of a method samples: the method's knobs, and the entries of
the study's ``search_space`` that apply to it."""
from __future__ import annotations

from p3b_search.method_specs import method_spec
from p3b_search.study.sections import StudyConfig


def method_knobs(method: str) -> list[str]:
    """The knobs (config fields) a study may set or search for a registered method, sorted
    (the method's ``fixed_knobs`` left out)."""
    config_cls = method_spec(method).config_cls
    return sorted(set(config_cls.model_fields) - config_cls.fixed_knobs)


def active_keys(study: StudyConfig, method: str) -> list[str]:
    """The search-space entries a trial of ``method`` samples: all but ``method`` itself and the
    ``method_config.<knob>`` entries whose knob ``method`` lacks (or fixes)."""
    knobs = {f"method_config.{knob}" for knob in method_knobs(method)}
    return [key for key in study.search_space
            if key != "method" and (not key.startswith("method_config.") or key in knobs)]
