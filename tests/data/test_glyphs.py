"""The embedded glyphs transfer task: sizes, determinism, disjoint splits, the cache, the loaders."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from p3b_search.config import EMBEDDED_TASKS, DataConfig
from p3b_search.data import build_loaders, glyphs
from p3b_search.data.glyphs import GLYPHS, GlyphsSpec, glyphs_arrays, render
from p3b_search.data.loaders import embedded_class_count
from p3b_search.models import GLYPHS_VIT, create_timm_model

SMALL = GlyphsSpec(source_train_per_class=3, source_val_per_class=2, target_train_per_class=3, target_val_per_class=2)


@pytest.fixture(scope="module")
def target():
    """The real target domain (generated once into the suite's cache)."""
    return glyphs_arrays(GLYPHS, "target")


def test_target_has_other_classes_another_appearance_and_a_large_val_set():
    assert not set(GLYPHS.source_classes) & set(GLYPHS.target_classes)
    assert not set(GLYPHS.source.faces) & set(GLYPHS.target.faces)
    assert GLYPHS.target.coloured and not GLYPHS.source.coloured
    assert GLYPHS.target_val_per_class * len(GLYPHS.target_classes) >= 2000  # one image <= 0.05 points


def test_real_target_splits_are_balanced_and_disjoint(target):
    for split, per_class in (("train", GLYPHS.target_train_per_class), ("val", GLYPHS.target_val_per_class)):
        images, labels = target[f"{split}_images"], target[f"{split}_labels"]
        assert images.shape == (26 * per_class, GLYPHS.size, GLYPHS.size, 3) and images.dtype == np.uint8
        assert np.bincount(labels, minlength=26).tolist() == [per_class] * 26
    train = {image.tobytes() for image in target["train_images"]}
    assert not any(image.tobytes() in train for image in target["val_images"])
    assert len({image.tobytes() for image in target["val_images"]}) == len(target["val_images"])


def test_rendering_is_deterministic_and_seeded():
    first, labels = render(SMALL, "target", 2, seed=0)
    again, labels_again = render(SMALL, "target", 2, seed=0)
    other, _ = render(SMALL, "target", 2, seed=1)
    assert np.array_equal(first, again) and np.array_equal(labels, labels_again)
    assert not np.array_equal(first, other)


def test_domains_differ_in_appearance():
    source, _ = render(SMALL, "source", 4, seed=0)
    target, _ = render(SMALL, "target", 4, seed=0)
    # source: grey (equal channels up to noise); target: coloured
    assert np.abs(source.astype(int) - source.mean(axis=-1, keepdims=True)).mean() < 5
    assert np.abs(target.astype(int) - target.mean(axis=-1, keepdims=True)).mean() > 15


def test_arrays_are_cached_by_spec(tmp_path, monkeypatch):
    first = glyphs_arrays(SMALL, "source", tmp_path)

    def render_again(*args, **kwargs):
        raise RuntimeError("re-rendered")

    monkeypatch.setattr(glyphs, "render", render_again)
    again = glyphs_arrays(SMALL, "source", tmp_path)  # a cache hit: no rendering
    assert all(np.array_equal(first[k], again[k]) for k in first)
    with pytest.raises(RuntimeError, match="re-rendered"):  # another spec is another cache entry
        glyphs_arrays(dataclasses.replace(SMALL, seed=1), "source", tmp_path)
    with pytest.raises(ValueError, match="glyphs domain 'middle' is unknown"):
        glyphs_arrays(SMALL, "middle", tmp_path)


def test_cache_keys_cover_the_domain_the_fonts_and_the_renderer(monkeypatch):
    source, target = GLYPHS.key("source"), GLYPHS.key("target")
    other_target = dataclasses.replace(GLYPHS, target=dataclasses.replace(GLYPHS.target, rotation=1.0))
    assert other_target.key("source") == source and other_target.key("target") != target
    monkeypatch.setattr(glyphs, "_renderer_fingerprint", lambda faces: "another FreeType")
    assert GLYPHS.key("source") != source


def test_every_embedded_task_has_a_class_count():
    assert [embedded_class_count(kind) for kind in EMBEDDED_TASKS] == [5, 26]
    assert [embedded_class_count(kind, "source") for kind in EMBEDDED_TASKS] == [5, 26]


def test_loaders_give_normalised_images_at_the_model_input(target):
    model = create_timm_model(GLYPHS_VIT, num_classes=26)
    train, val, classes = build_loaders(DataConfig(kind="glyphs"), model, batch_size=64, seed=0)
    images, labels = next(iter(train))
    assert classes == 26 and images.shape == (64, 3, 24, 24) and labels.max() < 26
    assert len(val.dataset) == len(target["val_labels"])
    assert torch.isfinite(images).all() and images.mean().abs() < 1.5
    assert DataConfig(kind="glyphs").source_task == "glyphs"
