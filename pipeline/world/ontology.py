"""The world's fixed tables: object classes, composition rules, label sets, relation vocabulary.

Everything here is data. Class order is the class index everywhere (world.json, YOLO export).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ObjectClass:
    """One drawable class: canonical noun, caption synonyms, MNER key type (or None)."""

    name: str
    synonyms: tuple[str, ...]
    mner_type: str | None = None
    # Palette colour names a caption may use as an adjective ("a red car"); empty: never.
    colour_words: bool = True


CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("person", ("player", "man", "woman", "athlete"), "PER", colour_words=False),
    ObjectClass("trophy", ("cup", "award"), "MISC"),
    ObjectClass("dog", ("puppy", "hound")),
    ObjectClass("car", ("vehicle", "sedan")),
    ObjectClass("ball", ("football",)),
    ObjectClass("flag", ("banner",), "LOC", colour_words=False),
    ObjectClass("building", ("tower", "office"), "ORG"),
    ObjectClass("guitar", ("instrument",)),
    ObjectClass("boat", ("yacht", "sailboat", "vessel")),
    ObjectClass("plane", ("jet", "aircraft", "airliner")),
    ObjectClass("tree", ("oak",), colour_words=False),
    ObjectClass("phone", ("smartphone", "mobile")),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in CLASSES)
CLASS_INDEX: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}
BY_NAME: dict[str, ObjectClass] = {c.name: c for c in CLASSES}


@dataclass(frozen=True)
class RelationRule:
    """An image shows `label` when it contains both classes of `pair` (order irrelevant)."""

    label: str
    pid: str  # the Wikidata property with this English label
    pair: tuple[str, str]


RULES: tuple[RelationRule, ...] = (
    RelationRule("award received", "P166", ("person", "trophy")),
    RelationRule("instrument", "P1303", ("person", "guitar")),
    RelationRule("sport", "P641", ("person", "ball")),
    RelationRule("country of citizenship", "P27", ("person", "flag")),
    RelationRule("employer", "P108", ("person", "building")),
    RelationRule("owner of", "P1830", ("person", "dog")),
    RelationRule("country of registry", "P8047", ("boat", "flag")),
    RelationRule("country of origin", "P495", ("plane", "flag")),
    RelationRule("manufacturer", "P176", ("car", "building")),
)
RULE_BY_LABEL: dict[str, RelationRule] = {r.label: r for r in RULES}

# Wikidata item-to-item properties that no composition shows: the rest of relations.tsv.
# Labels are the English labels of pipeline/assets/wikidata_relations.tsv (checked in tests).
DISTRACTOR_RELATIONS: tuple[tuple[str, str], ...] = (
    ("P17", "country"),
    ("P19", "place of birth"),
    ("P54", "member of sports team"),
    ("P69", "educated at"),
    ("P102", "member of political party"),
    ("P106", "occupation"),
    ("P127", "owned by"),
    ("P131", "located in the administrative territorial entity"),
    ("P136", "genre"),
    ("P159", "headquarters location"),
    ("P175", "performer"),
    ("P276", "location"),
    ("P361", "part of"),
    ("P463", "member of"),
    ("P527", "has part(s)"),
    ("P1344", "participant in"),
)

MNER_TYPES: tuple[str, ...] = ("PER", "LOC", "ORG", "MISC")
# The class whose presence settles an image-dependent MNER entity's type.
MNER_KEY_CLASS: dict[str, str] = {c.mner_type: c.name for c in CLASSES if c.mner_type}

MRE_NONE = "None"
# World relation -> MNRE-style label, for relations an image can settle between a person and a
# name; every other composition settles `None`.
MRE_FROM_RELATION: dict[str, str] = {
    "award received": "/per/misc/awarded",
    "country of citizenship": "/per/misc/nationality",
    "employer": "/per/org/member_of",
}
# Labels only the text settles (explicit wording), besides the three above.
MRE_TEXT_ONLY: tuple[str, ...] = ("/per/loc/place_of_birth", "/org/loc/locate_at")
MRE_LABELS: tuple[str, ...] = (MRE_NONE, *MRE_FROM_RELATION.values(), *MRE_TEXT_ONLY)


def matching_rules(classes: list[str] | tuple[str, ...] | set[str]) -> list[str]:
    """Labels of every rule whose two classes are both present, in rule order."""
    present = set(classes)
    return [r.label for r in RULES if r.pair[0] in present and r.pair[1] in present]


def relation_rows() -> list[tuple[str, str]]:
    """relations.tsv rows: the world's relations (rule order), then the distractors."""
    return [(r.pid, r.label) for r in RULES] + list(DISTRACTOR_RELATIONS)


def describe() -> dict:
    """The tables as JSON-ready data for world.json."""
    return {
        "classes": [
            {
                "index": i,
                "name": c.name,
                "synonyms": list(c.synonyms),
                "mner_type": c.mner_type,
            }
            for i, c in enumerate(CLASSES)
        ],
        "relation_rules": [
            {"label": r.label, "pid": r.pid, "classes": list(r.pair)} for r in RULES
        ],
        "relation_vocabulary": [{"pid": p, "label": label} for p, label in relation_rows()],
        "mner_types": list(MNER_TYPES),
        "mner_key_class": dict(MNER_KEY_CLASS),
        "mre_labels": list(MRE_LABELS),
        "mre_from_relation": dict(MRE_FROM_RELATION),
    }
