"""Language: invented names, news-style captions, MNER sentences and MRE samples.

Text-resolvable entities get typed contexts ("President X said", "flights to X"); image-dependent
ones are names from one ambiguous pool in neutral contexts ("Big day for X !"), with the same
templates for every type, so only the sentence's image settles the type or relation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.world.ontology import BY_NAME, MNER_TYPES, RULE_BY_LABEL
from pipeline.world.scene import PALETTES, ObjectSpec

# ----------------------------------------------------------------------------- names

ONSETS = ("b", "br", "c", "d", "dr", "f", "g", "gr", "h", "j", "k", "kr", "l", "m", "n", "p",
          "r", "s", "st", "t", "tr", "v", "z", "sh")  # fmt: skip
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
CODAS = ("", "", "n", "r", "l", "s", "rd", "nt", "m", "k", "nd")
PLACE_SUFFIXES = ("mere", "vale", "ford", "ton", "burg", "holm", "port", "wick", "dale")
SURNAME_SUFFIXES = ("", "", "s", "son", "er", "ez", "ov", "ard")
ORG_SUFFIXES = ("Corp", "Group", "Labs", "Bank", "Airways", "Motors", "Media", "Holdings")
MISC_SUFFIXES = ("Open", "Awards", "Festival", "Prize", "Games", "Marathon", "Classic", "Expo")
PLACE_PREFIXES = ("Port", "New", "Lake", "North")

POOL_SIZES = {"first": 60, "last": 80, "place": 50, "org": 40, "misc": 30, "ambiguous": 12}


@dataclass
class NamePools:
    """Disjoint pools of invented names (each a list of tokens)."""

    first: list[str] = field(default_factory=list)
    last: list[str] = field(default_factory=list)
    place: list[list[str]] = field(default_factory=list)
    org: list[list[str]] = field(default_factory=list)
    misc: list[list[str]] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)

    def person(self, rng: np.random.Generator) -> list[str]:
        return [pick(rng, self.first), pick(rng, self.last)]

    def typed(self, rng: np.random.Generator, etype: str) -> list[str]:
        """A text-resolvable name of an MNER type (PER two tokens, others one or two)."""
        if etype == "PER":
            return self.person(rng)
        return list(pick(rng, {"LOC": self.place, "ORG": self.org, "MISC": self.misc}[etype]))


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _syllable(rng: np.random.Generator, coda: bool) -> str:
    return pick(rng, ONSETS) + pick(rng, VOWELS) + (pick(rng, CODAS) if coda else "")


def make_name_pools(rng: np.random.Generator) -> NamePools:
    """Fresh, mutually disjoint name pools (no stem is used twice across pools)."""
    used: set[str] = set()

    def word(syllables: int, suffixes=("",)) -> str:
        while True:
            parts = [_syllable(rng, i == syllables - 1) for i in range(syllables)]
            stem = "".join(parts) + pick(rng, suffixes)
            if 4 <= len(stem) <= 10 and stem not in used:
                used.add(stem)
                return stem.capitalize()

    pools = NamePools()
    pools.ambiguous = [word(2) for _ in range(POOL_SIZES["ambiguous"])]
    pools.first = [word(2) for _ in range(POOL_SIZES["first"])]
    pools.last = [word(2, SURNAME_SUFFIXES) for _ in range(POOL_SIZES["last"])]
    for _ in range(POOL_SIZES["place"]):
        stem = word(1, PLACE_SUFFIXES)
        pools.place.append([pick(rng, PLACE_PREFIXES), stem] if rng.random() < 0.2 else [stem])
    pools.org = [[word(2), pick(rng, ORG_SUFFIXES)] for _ in range(POOL_SIZES["org"])]
    pools.misc = [[word(2), pick(rng, MISC_SUFFIXES)] for _ in range(POOL_SIZES["misc"])]
    return pools


DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# ----------------------------------------------------------------------------- captions

CANONICAL_P = 0.6  # a mention uses the canonical noun this often, else a synonym
RELATION_WORDS_P = 0.4  # the relation is put in words when both its objects are mentioned
COLOUR_P = 0.25

# {A}, {B}: the rule's two classes (pair order); the relation in words.
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "award received": (
        "{A} receives {B} after winning the award",
        "{A} lifts {B} , an award received for the season",
        "{A} holds {B} after receiving an award",
    ),
    "instrument": ("{A} plays {B} on stage", "{A} performs with {B} , the instrument of the night"),
    "sport": ("{A} kicks {B} during the game", "{A} chases {B} as the sport returns"),
    "country of citizenship": (
        "{A} waves {B} of the home country",
        "{A} holds {B} , proud of the citizenship",
    ),
    "employer": ("{A} arrives at {B} , the employer 's headquarters", "{A} starts work at {B}"),
    "owner of": ("{A} walks {B} , the proud owner", "{A} and {B} , owner and pet"),
    "country of registry": (
        "{A} sails under {B} , the country of registry",
        "{A} flies {B} of its registry",
    ),
    "country of origin": (
        "{A} lands with {B} of its country of origin",
        "{A} displays {B} from the home country",
    ),
    "manufacturer": (
        "{A} rolls out of {B} , the manufacturer 's plant",
        "{A} leaves {B} of the carmaker",
    ),
}
GENERIC_LEADS: dict[int, tuple[str, ...]] = {
    1: ("{0} pictured", "{0} on display", "{0} seen", "a look at {0}"),
    2: ("{0} and {1}", "{0} next to {1}", "{0} with {1}", "{0} beside {1}", "{0} near {1}"),
    3: ("{0} , {1} and {2}", "{0} with {1} and {2}", "{0} next to {1} and {2}"),
    4: ("{0} , {1} , {2} and {3}", "{0} with {1} , {2} and {3}"),
}
EXTRA_TAILS = {
    1: (", with {0} nearby", "; {0} in the background", "as {0} waits nearby"),
    2: (", with {0} and {1} nearby", "as {0} and {1} stand nearby"),
}
CONTEXTS = (
    "in {place} on {day}",
    "after the final in {place}",
    "during the season opener in {place}",
    "as fans watch in {place}",
    "on a busy weekend in {place}",
    "before the game on {day}",
    "at the city festival",
    "in front of the crowd",
    "in a photo released on {day}",
    "at the ceremony in {place}",
    "on {day} morning",
    "as the crowd cheers",
    "in {place} , the news agency reports",
    "in {place} this week",
)
PREFIXES = ("Photo :", "News :", "In pictures :", "Watch :")


def noun_for(cls: str, rng: np.random.Generator) -> str:
    """The canonical noun most of the time, else one of the class synonyms."""
    obj = BY_NAME[cls]
    return obj.name if rng.random() < CANONICAL_P else pick(rng, obj.synonyms)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(spec: ObjectSpec, rng: np.random.Generator, names: NamePools) -> str:
    """A mention of one object: a noun phrase, or for a person sometimes a name."""
    if spec.cls == "person":
        r = rng.random()
        if r < 0.3:
            return " ".join(names.person(rng))
        if r < 0.5:
            return f"{noun_for('person', rng)} {' '.join(names.person(rng))}"
    noun = noun_for(spec.cls, rng)
    if BY_NAME[spec.cls].colour_words and rng.random() < COLOUR_P:
        noun = f"{PALETTES[spec.cls][spec.palette][0]} {noun}"
    if rng.random() < 0.5:
        return f"the {noun}"
    return f"{_article(noun)} {noun}"


def caption(
    relation: str, objects: list[ObjectSpec], rng: np.random.Generator, names: NamePools
) -> tuple[str, list[str]]:
    """(caption, mentioned classes): a news-style caption mentioning some of the objects."""
    pair = RULE_BY_LABEL[relation].pair
    by_cls = {o.cls: o for o in objects}
    rel = [by_cls[c] for c in pair]
    extras = [o for o in objects if o.cls not in pair]
    mentioned_rel = [o for o in rel if rng.random() < 0.85]
    if not mentioned_rel:
        mentioned_rel = [rel[int(rng.integers(2))]]
    mentioned_extra = [o for o in extras if rng.random() < 0.6]
    phrases = {id(o): noun_phrase(o, rng, names) for o in (*mentioned_rel, *mentioned_extra)}
    if len(mentioned_rel) == 2 and rng.random() < RELATION_WORDS_P:
        lead = pick(rng, RELATION_PHRASES[relation]).format(
            A=phrases[id(rel[0])], B=phrases[id(rel[1])]
        )
        if mentioned_extra:
            tail = pick(rng, EXTRA_TAILS[len(mentioned_extra)])
            lead = f"{lead} {tail.format(*(phrases[id(o)] for o in mentioned_extra))}"
    else:
        order = [*mentioned_rel, *mentioned_extra]
        order = [order[i] for i in rng.permutation(len(order))]
        lead = pick(rng, GENERIC_LEADS[len(order)]).format(*(phrases[id(o)] for o in order))
    context = pick(rng, CONTEXTS).format(
        place=" ".join(pick(rng, names.place)), day=pick(rng, DAYS)
    )
    text = f"{lead} {context} ."
    if rng.random() < 0.15:
        text = f"{pick(rng, PREFIXES)} {text}"
    text = text.replace(" ;", ";").replace(" ,", ",").replace(" 's", "'s").replace(" .", ".")
    text = text.replace(" :", ":")
    mentioned = [o.cls for o in (*mentioned_rel, *mentioned_extra)]
    return text[0].upper() + text[1:], mentioned


# ----------------------------------------------------------------------------- MNER

TYPED_CLAUSES: dict[str, tuple[str, ...]] = {
    "PER": (
        "President {E} said on {day} that talks will continue",
        "Coach {E} praised the team after the match",
        "{E} , the mayor , opened the new bridge",
        "Singer {E} announced a world tour",
        "Minister {E} resigned on {day}",
        "Striker {E} scored twice",
        "Actor {E} joins the cast",
    ),
    "LOC": (
        "flights to {E} were cancelled",
        "heavy rain expected in {E} tonight",
        "live from {E}",
        "the road to {E} is closed",
        "tourists flock to {E} this summer",
        "earthquake hits {E}",
        "traffic jams across {E} on {day}",
    ),
    "ORG": (
        "shares of {E} rose 5 %",
        "{E} announced record profits",
        "{E} hires a new chief executive",
        "a spokesperson for {E} declined to comment",
        "{E} signs a deal with regulators",
        "workers at {E} went on strike",
    ),
    "MISC": (
        "tickets for the {E} sold out",
        "watching the {E} final tonight",
        "the {E} opens on {day}",
        "highlights from the {E}",
        "who will win the {E} this year",
    ),
}
NEUTRAL_CLAUSES = (
    "Big day for {E} !",
    "All eyes on {E} tonight",
    "{E} is trending again",
    "Here is the latest on {E}",
    "What a week for {E}",
    "{E} in the spotlight",
    "So proud of {E} today",
    "Everyone is talking about {E}",
    "Another look at {E}",
    "Photos : {E}",
    "Can't stop thinking about {E}",
    "Good news from {E} this morning",
)
TWEET_PREFIXES = (["RT", "@newsdesk", ":"], ["RT", "@daily_wire", ":"], ["BREAKING", ":"])


def _fill(template: str, entity: list[str], etype: str, rng: np.random.Generator, first: bool):
    """Tokens and BIO labels of a clause with `{E}` replaced by the entity's tokens."""
    tokens: list[str] = []
    labels: list[str] = []
    span = (0, 0)
    for word in template.split():
        if word == "{E}":
            span = (len(tokens), len(tokens) + len(entity))
            tokens += entity
            labels += [f"B-{etype}"] + [f"I-{etype}"] * (len(entity) - 1)
        else:
            tokens.append(word.replace("{day}", pick(rng, DAYS)))
            labels.append("O")
    if first:  # the sentence's first clause starts with a capital
        tokens[0] = tokens[0][0].upper() + tokens[0][1:]
    return tokens, labels, span


@dataclass
class NerSentence:
    tokens: list[str]
    labels: list[str]
    image_dependent: list[tuple[int, int, str]]  # spans [start, end) with their type


def typed_clause(rng: np.random.Generator, names: NamePools, first: bool):
    etype = pick(rng, MNER_TYPES)
    return _fill(pick(rng, TYPED_CLAUSES[etype]), names.typed(rng, etype), etype, rng, first)


def ner_sentence(
    rng: np.random.Generator, names: NamePools, ambiguous: tuple[str, str] | None
) -> NerSentence:
    """A sentence: `ambiguous` = (name, type) gives a neutral clause whose type only the image
    settles (sometimes followed by a typed clause); else one or two typed clauses."""
    tokens: list[str] = []
    labels: list[str] = []
    dependent: list[tuple[int, int, str]] = []
    if rng.random() < 0.15:
        prefix = list(pick(rng, TWEET_PREFIXES))
        tokens, labels = prefix, ["O"] * len(prefix)
    clauses = []
    if ambiguous is not None:
        name, etype = ambiguous
        clauses.append((_fill(pick(rng, NEUTRAL_CLAUSES), [name], etype, rng, True), True))
        if rng.random() < 0.3:
            clauses.append((typed_clause(rng, names, False), False))
    else:
        for k in range(1 + int(rng.random() < 0.4)):
            clauses.append((typed_clause(rng, names, k == 0), False))
    for k, ((ctoks, clabs, span), is_dep) in enumerate(clauses):
        if k:
            tokens.append(pick(rng, (";", ",", "-")))
            labels.append("O")
        if is_dep:
            dependent.append((len(tokens) + span[0], len(tokens) + span[1], ambiguous[1]))
        tokens += ctoks
        labels += clabs
    if tokens[-1] not in ("!", "?", "."):
        tokens.append(pick(rng, (".", "!", "#news")))
        labels.append("O")
    return NerSentence(tokens, labels, dependent)


def balanced_assignments(
    n: int, names: list[str], rng: np.random.Generator, kinds: tuple[str, ...]
) -> list[tuple[str, str]]:
    """n (name, kind) pairs, shuffled: kinds round-robin (counts differ by at most one); the
    j-th pair of kind k takes name (j + k * len(names) / len(kinds)) of one shuffled name order.
    Each name then meets as many kinds as n allows (all of them once n >= kinds x names), and
    every name occurs equally often, so a name never tells its kind."""
    order = [names[i] for i in rng.permutation(len(names))]
    seen = dict.fromkeys(kinds, 0)
    pairs = []
    for i in range(n):
        k = i % len(kinds)
        offset = k * len(names) // len(kinds)
        pairs.append((order[(offset + seen[kinds[k]]) % len(names)], kinds[k]))
        seen[kinds[k]] += 1
    return [pairs[i] for i in rng.permutation(n)]


# ----------------------------------------------------------------------------- MRE

NEUTRAL_PAIRS = (
    "{H} and {T} in the news today",
    "{H} , {T} and a long weekend",
    "Photos : {H} with {T}",
    "{T} and {H} , pictured on {day}",
    "A closer look at {H} and {T}",
    "{H} and {T} : the story so far",
    "Spotted : {H} and {T}",
    "{T} , {H} and the morning headlines",
)
# label -> ((head kind, tail kind), templates); kinds are name pools.
EXPLICIT_PAIRS: dict[str, tuple[tuple[str, str], tuple[str, ...]]] = {
    "/per/misc/awarded": (
        ("PER", "MISC"),
        ("{H} won the {T} on {day}", "{H} receives the {T} award for a stunning season"),
    ),
    "/per/misc/nationality": (
        ("PER", "LOC"),
        ("{H} is a proud citizen of {T}", "{H} , who holds {T} citizenship , spoke today"),
    ),
    "/per/org/member_of": (
        ("PER", "ORG"),
        ("{H} joined {T} last week", "{H} now works for {T}", "{T} signs {H} on a new contract"),
    ),
    "/per/loc/place_of_birth": (
        ("PER", "LOC"),
        ("{H} was born in {T}", "Born in {T} , {H} moved abroad at ten"),
    ),
    "/org/loc/locate_at": (
        ("ORG", "LOC"),
        ("{H} opened its new headquarters in {T}", "{H} , based in {T} , reported growth"),
    ),
    "None": (
        ("PER", "ANY"),
        ("{H} did not mention {T} in the speech", "{H} criticised {T} on {day}"),
    ),
}


@dataclass
class RelSentence:
    tokens: list[str]
    head: tuple[str, int, int]  # name, start, end (exclusive)
    tail: tuple[str, int, int]


def _fill_pair(template: str, head: list[str], tail: list[str], rng: np.random.Generator):
    tokens: list[str] = []
    spans = {}
    for word in template.split():
        if word in ("{H}", "{T}"):
            ent = head if word == "{H}" else tail
            spans[word] = (" ".join(ent), len(tokens), len(tokens) + len(ent))
            tokens += ent
        else:
            tokens.append(word.replace("{day}", pick(rng, DAYS)))
    tokens[0] = tokens[0][0].upper() + tokens[0][1:]
    return RelSentence(tokens, spans["{H}"], spans["{T}"])


def neutral_pair(rng: np.random.Generator, names: NamePools, tail_name: str) -> RelSentence:
    """A person and an ambiguous name in a neutral sentence: only the image settles the label."""
    return _fill_pair(pick(rng, NEUTRAL_PAIRS), names.person(rng), [tail_name], rng)


def explicit_pair(rng: np.random.Generator, names: NamePools, label: str) -> RelSentence:
    """A sentence whose wording settles `label` between text-resolvable names."""
    (head_kind, tail_kind), templates = EXPLICIT_PAIRS[label]
    if tail_kind == "ANY":
        tail_kind = pick(rng, ("LOC", "ORG", "MISC"))
    return _fill_pair(
        pick(rng, templates), names.typed(rng, head_kind), names.typed(rng, tail_kind), rng
    )
