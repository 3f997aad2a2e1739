"""The synthetic world of bench/quality.py: its renderer, detectors and held-out split."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import world  # noqa: E402
from world.detect import read  # noqa: E402


def test_detectors_read_every_rendered_attribute_back():
    import quality

    acc = quality.detector_accuracy(n=120)
    assert acc == {k: 1.0 for k in acc}, acc


def test_held_out_pairs_never_appear_in_the_prior_training_set():
    seen = {(s.shape, s.colour) for s in world.training_scenes(2000, 0)}
    assert not seen & set(world.HELD_OUT)
    assert {s for s in world.SHAPES} == {s for s, _ in seen} and set(world.COLOURS) == {c for _, c in seen}


def test_the_subject_is_outside_the_prior_world_and_detected_only_as_itself():
    subject = world.subject_scenes()[0]
    assert read(world.render(subject)).subject
    plain = world.Scene(world.SUBJECT_SHAPE, "red", subject.background, subject.position)
    assert not read(world.render(plain)).subject  # the shape alone is not the subject: the two tones are
    assert all(s.shape != world.SUBJECT_SHAPE for s in world.training_scenes(500, 1))


def test_world_hash_changes_with_the_recipe():
    assert world.world_hash({"steps": 1}) != world.world_hash({"steps": 2})
    assert world.world_hash({"steps": 1}) == world.world_hash({"steps": 1})
