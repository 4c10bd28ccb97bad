"""MNER / MRE data: file readers, word-to-sub-token alignment and entity-marker insertion.

Formats (see ../shared/data/README.md):
- Twitter-2015/2017 NER: `IMGID:<id>` line, then `token<TAB>BIO-label` lines, a blank line
  between sentences. `OTHER` (Twitter-2015) is read as `MISC`.
- MNRE: one Python dict literal per line (read with `ast.literal_eval`, never `eval`):
  `{'token': [...], 'h': {'name', 'pos': [start, end)}, 't': {...}, 'img_id', 'relation'}`,
  relation labels from a rel2id JSON file.
Malformed input raises `DataFormatError` naming the file and the line.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pmu.errors import InputError

NER_TYPES = ("PER", "LOC", "ORG", "MISC")
TYPE_ALIASES = {"OTHER": "MISC"}  # Twitter-2015 calls MISC "OTHER"
MARKERS = ("[E1]", "[/E1]", "[E2]", "[/E2]")  # head start/end, tail start/end
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class DataFormatError(InputError):
    """An input file does not follow its format; the message names the file and line."""

    def __init__(self, path: str | os.PathLike, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


# ----------------------------------------------------------------------------- readers


@dataclass
class NerSentence:
    tokens: list[str]
    labels: list[str]
    img_id: str | None = None
    line: int = 0  # line of the first token, for messages


@dataclass
class Span:
    name: str
    start: int
    end: int  # exclusive


@dataclass
class RelSample:
    tokens: list[str]
    head: Span
    tail: Span
    relation: str
    img_id: str | None = None
    line: int = 0


def _normalise_label(label: str, path: Path, line: int) -> str:
    if label == "O":
        return label
    prefix, sep, etype = label.partition("-")
    if not sep or prefix not in ("B", "I") or not etype:
        raise DataFormatError(path, line, f"label {label!r} is not O, B-TYPE or I-TYPE")
    return f"{prefix}-{TYPE_ALIASES.get(etype, etype)}"


def read_ner(path: str | os.PathLike) -> list[NerSentence]:
    """Read a Twitter-2015/2017 style file: `IMGID:` line, `token<TAB>label` lines, blank line."""
    path = Path(path)
    sentences: list[NerSentence] = []
    current: NerSentence | None = None
    pending_img: str | None = None
    pending_line = 0

    def close() -> None:
        nonlocal current
        if current is not None:
            sentences.append(current)
            current = None

    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                close()
                if pending_img is not None:
                    raise DataFormatError(path, pending_line, "IMGID line without tokens")
                continue
            if line.startswith("IMGID:"):
                close()
                if pending_img is not None:
                    raise DataFormatError(path, pending_line, "IMGID line without tokens")
                pending_img, pending_line = line[len("IMGID:") :].strip(), lineno
                if not pending_img:
                    raise DataFormatError(path, lineno, "empty IMGID")
                continue
            parts = line.split("\t")
            if len(parts) != 2 or not parts[0] or not parts[1].strip():
                raise DataFormatError(
                    path, lineno, f"expected 'token<TAB>label', got {line[:60]!r}"
                )
            label = _normalise_label(parts[1].strip(), path, lineno)
            if current is None:
                current = NerSentence([], [], pending_img, lineno)
                pending_img = None
            current.tokens.append(parts[0])
            current.labels.append(label)
    close()
    if pending_img is not None:
        raise DataFormatError(path, pending_line, "IMGID line without tokens")
    return sentences


def load_rel2id(path: str | os.PathLike) -> dict[str, int]:
    """rel2id JSON: relation label -> index; indices must be 0..n-1 without gaps."""
    path = Path(path)
    try:
        rel2id = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataFormatError(path, e.lineno, f"invalid JSON: {e.msg}") from e
    if not isinstance(rel2id, dict) or sorted(rel2id.values()) != list(range(len(rel2id))):
        raise DataFormatError(path, 1, "expected an object mapping labels to indices 0..n-1")
    return {str(k): int(v) for k, v in rel2id.items()}


def _span(obj: Any, key: str, n_tokens: int, path: Path, lineno: int) -> Span:
    if not isinstance(obj, dict) or "pos" not in obj:
        raise DataFormatError(path, lineno, f"'{key}' must be a dict with 'name' and 'pos'")
    pos = obj["pos"]
    if (
        not isinstance(pos, (list, tuple))
        or len(pos) != 2
        or not all(isinstance(p, int) for p in pos)
        or not 0 <= pos[0] < pos[1] <= n_tokens
    ):
        raise DataFormatError(
            path, lineno, f"'{key}' pos {pos!r} is not [start, end) within {n_tokens} tokens"
        )
    return Span(str(obj.get("name", "")), pos[0], pos[1])


def read_mnre(path: str | os.PathLike, rel2id: dict[str, int]) -> list[RelSample]:
    """Read an MNRE file: one dict literal per line, spans end-exclusive, labels from rel2id."""
    path = Path(path)
    samples: list[RelSample] = []
    with open(path, encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line:
                continue
            try:
                obj = ast.literal_eval(line)
            except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
                raise DataFormatError(path, lineno, f"not a Python literal ({e})") from None
            if not isinstance(obj, dict):
                raise DataFormatError(path, lineno, "expected a dict literal")
            missing = [k for k in ("token", "h", "t", "relation") if k not in obj]
            if missing:
                raise DataFormatError(path, lineno, f"missing keys {missing}")
            tokens = obj["token"]
            if (
                not isinstance(tokens, list)
                or not tokens
                or not all(isinstance(t, str) for t in tokens)
            ):
                raise DataFormatError(path, lineno, "'token' must be a non-empty list of strings")
            relation = obj["relation"]
            if relation not in rel2id:
                raise DataFormatError(path, lineno, f"relation {relation!r} not in rel2id")
            samples.append(
                RelSample(
                    tokens=tokens,
                    head=_span(obj["h"], "h", len(tokens), path, lineno),
                    tail=_span(obj["t"], "t", len(tokens), path, lineno),
                    relation=relation,
                    img_id=str(obj["img_id"]) if obj.get("img_id") is not None else None,
                    line=lineno,
                )
            )
    return samples


def ner_label_list(sentences: Sequence[NerSentence]) -> list[str]:
    """`O` then B-/I- for the four standard types, then any other type seen, sorted."""
    types = list(NER_TYPES)
    extra = sorted({lab[2:] for s in sentences for lab in s.labels if lab != "O"} - set(types))
    return ["O"] + [f"{p}-{t}" for t in types + extra for p in ("B", "I")]


# ----------------------------------------------------------------------------- images


# A split's own image folder inside --images, as releases lay them out (MNRE: img_org/train,
# img_org/val, img_org/test); looked in when the image is not at the top level.
SPLIT_FOLDERS = {"train": ("train",), "dev": ("dev", "val", "valid"), "test": ("test",)}


def image_folders(images_dir: str | os.PathLike | None, split: str) -> list[Path]:
    """Where a split's images may be: the folder itself, then its split subfolder if any."""
    if images_dir is None:
        return []
    base = Path(images_dir)
    sub = [base / name for name in SPLIT_FOLDERS.get(split, ()) if (base / name).is_dir()]
    return [base, *sub[:1]]


def find_image(
    images_dir: str | os.PathLike | Sequence[Path] | None, img_id: str | None
) -> Path | None:
    """The image file for an IMGID / img_id in `images_dir` (or the first of several folders
    that has it), or None when there is none."""
    if images_dir is None or not img_id:
        return None
    folders = [Path(images_dir)] if isinstance(images_dir, (str, os.PathLike)) else images_dir
    name = Path(img_id).name  # ids are file names; never follow a path out of the folder
    for base in folders:
        candidates = [base / name] if Path(name).suffix.lower() in IMAGE_SUFFIXES else []
        candidates += [base / f"{name}{suffix}" for suffix in IMAGE_SUFFIXES]
        found = next((c for c in candidates if c.is_file()), None)
        if found is not None:
            return found
    return None


# ----------------------------------------------------------------------------- encoding


@dataclass
class NerFeatures:
    input_ids: list[int]
    word_index: list[int]  # sub-token position of each kept word's first sub-token
    label_ids: list[int]  # one per kept word
    n_words: int  # words in the sentence (kept + truncated)
    image: Path | None = None


@dataclass
class RelFeatures:
    input_ids: list[int]
    head_pos: int  # position of [E1]
    tail_pos: int  # position of [E2]
    label_id: int
    image: Path | None = None
    truncated: bool = False


@dataclass
class EncodeStats:
    truncated_words: int = 0
    truncated_samples: int = 0
    text_only: int = 0
    missing_images: list[str] = field(default_factory=list)


def word_pieces(tokenizer, words: Sequence[str]) -> list[list[int]]:
    """Sub-token ids per word; a word the tokenizer drops entirely becomes [UNK]."""
    if not words:
        return []
    enc = tokenizer(list(words), add_special_tokens=False)["input_ids"]
    return [ids if ids else [tokenizer.unk_token_id] for ids in enc]


def encode_ner(
    sentence: NerSentence, tokenizer, label2id: dict[str, int], max_len: int
) -> tuple[NerFeatures, int]:
    """[CLS] w1 ... [SEP]; CRF positions are the first sub-tokens. Returns (features, n_cut)."""
    if max_len < 3:
        raise InputError("max_len must leave room for [CLS], one sub-token and [SEP]")
    ids = [tokenizer.cls_token_id]
    word_index: list[int] = []
    for pieces in word_pieces(tokenizer, sentence.tokens):
        room = max_len - 1 - len(ids)
        if room < 1:
            break  # words from here on are cut: predicted O and counted
        # The CRF reads a word at its first sub-token, so a word that does not fit whole keeps
        # the pieces that fit (a first word longer than max_len still gets a label).
        word_index.append(len(ids))
        ids.extend(pieces[:room])
        if len(pieces) > room:
            break
    ids.append(tokenizer.sep_token_id)
    kept = len(word_index)
    labels = [label2id[lab] for lab in sentence.labels[:kept]]
    return NerFeatures(ids, word_index, labels, len(sentence.tokens)), len(sentence.tokens) - kept


def add_markers(tokenizer) -> list[int]:
    """Register the four entity markers as special tokens (idempotent); their ids."""
    missing = [m for m in MARKERS if m not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return [tokenizer.convert_tokens_to_ids(m) for m in MARKERS]


def marked_sequence(n_tokens: int, head: Span, tail: Span) -> list[int | str]:
    """Word indices with marker strings inserted; nesting is respected (outer opens first)."""
    events: dict[int, list[tuple[int, int, str]]] = {}
    for span, (open_m, close_m) in ((head, MARKERS[:2]), (tail, MARKERS[2:])):
        length = span.end - span.start
        # closes (0) sort before opens (1); the longer span opens first, the inner closes first
        events.setdefault(span.start, []).append((1, -length, open_m))
        events.setdefault(span.end, []).append((0, length, close_m))
    out: list[int | str] = []
    for i in range(n_tokens + 1):
        out.extend(m for *_, m in sorted(events.get(i, [])))
        if i < n_tokens:
            out.append(i)
    return out


def marked_words(tokens: Sequence[str], head: Span, tail: Span) -> list[str]:
    """The words with the marker strings inserted (for logs and tests)."""
    seq = marked_sequence(len(tokens), head, tail)
    return [x if isinstance(x, str) else tokens[x] for x in seq]


def _keep_window(n: int, anchors: Sequence[int], budget: int) -> list[int]:
    """Indices to keep: all anchors, then the nearest neighbours of anchors, in order."""
    if n <= budget:
        return list(range(n))
    order = sorted(range(n), key=lambda i: (min(abs(i - a) for a in anchors), i))
    return sorted(order[:budget])


def encode_rel(
    sample: RelSample,
    tokenizer,
    rel2id: dict[str, int],
    max_len: int,
    marker_ids: Sequence[int],
) -> RelFeatures:
    """[CLS] .. [E1] head [/E1] .. [E2] tail [/E2] .. [SEP], cut around the markers.

    `marker_ids` come from `add_markers(tokenizer)`, called once before encoding.
    """
    if max_len < 6:
        raise InputError("max_len must leave room for [CLS], four markers and [SEP]")
    marker_of = dict(zip(MARKERS, marker_ids, strict=True))
    pieces = word_pieces(tokenizer, sample.tokens)
    body: list[int] = []
    for item in marked_sequence(len(sample.tokens), sample.head, sample.tail):
        if isinstance(item, str):
            body.append(marker_of[item])
        else:
            body.extend(pieces[item])
    anchors = [i for i, t in enumerate(body) if t in marker_of.values()]
    keep = _keep_window(len(body), anchors, max_len - 2)
    ids = [tokenizer.cls_token_id] + [body[i] for i in keep] + [tokenizer.sep_token_id]
    return RelFeatures(
        input_ids=ids,
        head_pos=ids.index(marker_of["[E1]"]),
        tail_pos=ids.index(marker_of["[E2]"]),
        label_id=rel2id[sample.relation],
        truncated=len(keep) < len(body),
    )
