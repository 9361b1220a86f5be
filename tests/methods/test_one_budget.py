"""One budget for every method: whatever a registered method solves internally (P3B's keep
ratios, DIMAP's module ratios, SViTE's ERK density, S²ViTE's head and neuron densities), the
result of its prune stage keeps ``1 - prune_ratio`` of *all* the model's parameters, within
0.01, on real timm configurations (random init, nothing downloaded).

Every method here reaches its final parameter count without training: one-shot methods decide
at ``prepare``, prune-and-grow swaps keep the counts of ``prepare``, and the gated methods'
``finalize`` makes the masks their budget asks for. The gated methods hold in both residual
modes (per block, and one shared residual width); the others have no ``residual`` knob and
refuse it with a one-line error naming ``method_config.residual``. Big models get a single
drawn example (the whole file runs in about a minute on two cores)."""
from __future__ import annotations

import copy
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from p3b_search.method_specs import method_spec
from p3b_search.methods import available_methods, get_method
from p3b_search.methods.target import TOLERANCE, kept_params
from p3b_search.models import DIGITS_VIT, create_timm_model
from p3b_search.study.loading import load_study
from p3b_search.study.messages import StudyError
from tests.conftest import make_model

NUM_CLASSES = 10
#: drawn prune ratios per (model, method) case: few on the big models
EXAMPLES = {"digits_vit": 4, "deit_tiny": 2, "deit_small": 1, "swin_tiny": 1}


@cache
def dense_model(key: str) -> nn.Module:
    """The dense model ``key`` (built once per session; tests prune copies)."""
    if key == "digits_vit":
        return create_timm_model(DIGITS_VIT, NUM_CLASSES)
    return make_model(key, num_classes=NUM_CLASSES)


def has_gates(method_name: str) -> bool:
    return "residual" in method_spec(method_name).config_cls.model_fields


#: (method, residual mode): every method, the gated ones in both modes
CASES = [(name, residual) for name in available_methods()
         for residual in (("per-block", "shared") if has_gates(name) else (None,))]


def kept_fraction(method_name: str, model_key: str, prune_ratio: float, residual: str | None) -> float:
    """Kept fraction of all parameters after ``method_name``'s prepare and finalize."""
    model = copy.deepcopy(dense_model(model_key))
    dense = sum(p.numel() for p in model.parameters())
    method_cls = get_method(method_name)
    knobs = {} if residual is None else {"residual": residual}
    method = method_cls(method_cls.spec.config_cls(prune_ratio=prune_ratio, **knobs), num_classes=NUM_CLASSES,
                        epochs=1, steps_per_epoch=200)
    method.prepare(model)
    return kept_params(method.finalize(model)) / dense


@pytest.mark.parametrize("model_key", list(EXAMPLES))
@pytest.mark.parametrize(("method_name", "residual"), CASES)
def test_every_method_keeps_one_minus_prune_ratio_of_all_parameters(method_name, residual, model_key):
    ratios = st.just(0.0) if method_name == "dense" else st.floats(0.05, 0.8)  # dense prunes nothing

    @settings(max_examples=EXAMPLES[model_key], deadline=None, database=None, derandomize=True)
    @given(prune_ratio=ratios)
    def check(prune_ratio: float) -> None:
        kept = kept_fraction(method_name, model_key, prune_ratio, residual)
        assert abs(kept - (1.0 - prune_ratio)) <= TOLERANCE, (method_name, residual, model_key, prune_ratio, kept)

    check()


@pytest.mark.parametrize("method_name", [name for name in available_methods() if not has_gates(name)])
def test_methods_without_gates_refuse_a_residual_mode_naming_the_knob(method_name, tmp_path):
    """Fixed or searched, ``residual`` on a method without gates fails when the study loads."""
    head = f"name: s\noutput_dir: {tmp_path}/runs\n"
    files = {"fixed": head + f"method: {{name: {method_name}, config: {{residual: shared}}}}\n",
             "searched": head + f"method: {{name: {method_name}}}\nsearch_space:\n"
                                "  method_config.residual: {type: categorical, choices: [shared]}\n"}
    for how, text in files.items():
        (tmp_path / "s.yaml").write_text(text)
        with pytest.raises(StudyError) as error:
            load_study(tmp_path / "s.yaml")
        field = "method.config.residual" if how == "fixed" else "search_space.method_config.residual"
        expected = (f"{tmp_path}/s.yaml: {field}: not a knob of method '{method_name}' "
                    "(it belongs to global-taylor, p3b, uniform-magnitude)")
        assert str(error.value).startswith(expected) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "runs").exists()
