"""Scene compositions: which objects an image holds, so that its truth follows the rule table."""

from __future__ import annotations

import zlib

import numpy as np

from pipeline.world.ontology import (
    CLASS_NAMES,
    MNER_KEY_CLASS,
    RULE_BY_LABEL,
    RULES,
    matching_rules,
)
from pipeline.world.scene import ASPECT_RATIOS, PALETTES, ObjectSpec

MAX_EXTRAS = 2


def stream_rng(seed: int, stream: str, *keys: int) -> np.random.Generator:
    """An independent generator per (seed, stream name, keys): reproducible in any process."""
    return np.random.default_rng([seed, zlib.crc32(stream.encode("utf-8")), *keys])


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def shuffled(items: list, rng: np.random.Generator) -> list:
    """A permuted copy (drawing order: later objects may overlap earlier ones a little)."""
    return [items[i] for i in rng.permutation(len(items))]


def with_palettes(classes: list[str], rng: np.random.Generator) -> list[ObjectSpec]:
    return [ObjectSpec(c, int(rng.integers(len(PALETTES[c])))) for c in classes]


def relation_scene(rng: np.random.Generator, relation: str | None = None) -> tuple[str, list[str]]:
    """(relation, classes): the relation's two classes and 0-2 extra classes that trigger no
    other rule, so that exactly one rule matches the image; classes in drawing order."""
    label = relation if relation is not None else _pick(rng, [r.label for r in RULES])
    classes = list(RULE_BY_LABEL[label].pair)
    for _ in range(int(rng.integers(0, MAX_EXTRAS + 1))):
        allowed = [
            c for c in CLASS_NAMES if c not in classes and matching_rules([*classes, c]) == [label]
        ]
        if not allowed:
            break
        classes = [*classes, _pick(rng, allowed)]
    return label, shuffled(classes, rng)


def key_scene(rng: np.random.Generator, mner_type: str) -> list[str]:
    """The MNER key class of a type (person, flag, building, trophy) and 0-2 distractors from the
    classes that are no MNER key, so the image holds exactly one key object; drawing order."""
    keys = set(MNER_KEY_CLASS.values())
    others = [c for c in CLASS_NAMES if c not in keys]
    n = int(rng.integers(0, MAX_EXTRAS + 1))
    extras = [others[i] for i in rng.choice(len(others), size=n, replace=False)]
    return shuffled([MNER_KEY_CLASS[mner_type], *extras], rng)


def canvas_ratio(rng: np.random.Generator) -> tuple[int, int]:
    return _pick(rng, ASPECT_RATIOS)
