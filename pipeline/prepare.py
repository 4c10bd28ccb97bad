"""The prepare stage: validate raw pairs, record rejections, de-duplicate, add negatives, write.

Outputs (all written atomically): `pairs.parquet` (schema in docs/architecture.md; matched
and mismatched pairs interleaved at an even rate, so every shard holds both),
`rejected.jsonl` (one `{id, source, stage, reason, detail}` per rejected input) and
`summary.json` (counts only, no timings, so a re-run gives identical files). Finished chunks
are saved in a work folder beside the outputs (pipeline.prepare_work), so a killed run resumes.
"""

from __future__ import annotations

import os
import random
import sys
import time
import unicodedata
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from pipeline.images import (
    DECODE_ERROR,
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    decode_rgb,
    read_image_bytes,
)
from pipeline.pairs import Pair, Rejection, write_jsonl_atomic, write_pairs_parquet
from pipeline.prepare_work import WORK_VERSION, WorkDir, chain_digest, default_work_dir
from pipeline.readers.records import CAPTION_TOO_LONG, MAX_CAPTION_INPUT_CHARS, RawRecord
from pipeline.settings import PrepareSettings
from pmu.errors import InputError
from pmu.shards import sample_key

__all__ = [
    "CAPTION_TOO_LONG",
    "MAX_CAPTION_INPUT_CHARS",
    "Pair",
    "Rejection",
    "prepare",
    "validate",
    "write_pairs_parquet",
    "format_summary",
]

DEFAULT_MAX_CAPTION_CHARS = PrepareSettings.max_caption_chars
DEFAULT_CHUNK_SIZE = PrepareSettings.chunk_size  # ~20 s of decoding at 230 pairs/s
# The settings recorded in the work folder's fingerprint and summary (they shape the pairs).
RECORDED_SETTINGS = (
    "source", "negatives", "negative_ratio", "seed", "max_pixels", "max_caption_chars"
)  # fmt: skip
PAIRS_FILE = "pairs.parquet"
REJECTED_FILE = "rejected.jsonl"
SUMMARY_FILE = "summary.json"

# Reason categories besides the image ones in pipeline.images.
CAPTION_MISSING = "caption: missing"
CAPTION_EMPTY = "caption: empty"
CAPTION_NOT_UTF8 = "caption: not UTF-8"
CAPTION_BINARY = "caption: binary data"  # NUL or mostly control characters
CAPTION_NO_LETTERS = "caption: no letters"  # digits, punctuation, emoji only
IMAGE_NO_PATH = "image: no path"
DUPLICATE_ID = "duplicate id"
DUPLICATE_KEY = "duplicate shard key"  # another id maps to the same tar member name


@dataclass
class PrepareResult:
    pairs: list[Pair] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    n_input: int = 0
    n_negatives: int = 0
    seconds: float = 0.0
    chunks: int = 0
    chunks_resumed: int = 0  # read back from the work folder instead of decoded
    work_discarded: bool = False  # a work folder from other inputs or parameters was removed
    n_truncated: int = 0  # accepted pairs whose caption was cut to max_caption_chars

    def counts(self) -> dict:
        """Counts by source / itm and rejections by reason (deterministic, no timings)."""
        by_source: dict[str, dict[str, int]] = {}
        for p in self.pairs:
            entry = by_source.setdefault(p.source, {"matched": 0, "mismatched": 0})
            entry["matched" if p.itm == 1 else "mismatched"] += 1
        reasons = Counter(r.reason for r in self.rejected)
        counts = {
            "n_input": self.n_input,
            "n_pairs": len(self.pairs),
            "n_negatives_generated": self.n_negatives,
            "n_rejected": len(self.rejected),
            "by_source": dict(sorted(by_source.items())),
            "rejected_by_reason": dict(sorted(reasons.items())),
        }
        if self.n_truncated:  # only when there are some: earlier summaries keep their bytes
            counts["n_captions_truncated"] = self.n_truncated
        return counts


def clean_caption(caption: str | bytes | None) -> tuple[str | None, str, str]:
    """(stripped text, "", "") for something that can be a caption, else (None, reason, detail).

    Long captions are fine here (`shorten_caption` cuts them); refused is what cannot be one:
    over `MAX_CAPTION_INPUT_CHARS` characters, binary data, or text without a single letter.
    """
    if caption is None:
        return None, CAPTION_MISSING, ""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, CAPTION_NOT_UTF8, f"invalid byte at {exc.start}"
    if not isinstance(caption, str):
        return None, CAPTION_MISSING, f"not text: {type(caption).__name__}"
    try:
        caption.encode("utf-8")
    except UnicodeEncodeError:
        return None, CAPTION_NOT_UTF8, "lone surrogate"
    text = caption.strip()
    if not text:
        return None, CAPTION_EMPTY, ""
    if len(text) > MAX_CAPTION_INPUT_CHARS:
        return None, CAPTION_TOO_LONG, f"{len(text)} > {MAX_CAPTION_INPUT_CHARS} characters"
    if _looks_binary(text):
        return None, CAPTION_BINARY, f"{_control_chars(text)} control characters"
    if not any(ch.isalpha() for ch in text):
        return None, CAPTION_NO_LETTERS, ""
    return text, "", ""


def _control_chars(text: str) -> int:
    # Tab, newline and carriage return are layout; other C0/C1 controls are not text.
    return sum(1 for ch in text if unicodedata.category(ch) == "Cc" and ch not in "\t\n\r")


def _looks_binary(text: str) -> bool:
    """NUL, or over a tenth control characters: bytes that happen to decode, not words
    (a stray form feed in scraped text is not enough)."""
    return "\0" in text or _control_chars(text) * 10 > len(text)


def shorten_caption(text: str, max_chars: int) -> tuple[str, bool]:
    """(caption, whether it was cut): at most `max_chars` characters, cut at a word boundary
    (back to the last space when the cut falls inside a word) like a tokenizer's max length
    would; a single word longer than half the limit is cut where the limit falls."""
    if len(text) <= max_chars:
        return text, False
    cut = max_chars
    if text[cut - 1].isalnum() and text[cut].isalnum():
        space = max((text.rfind(ch, 0, cut) for ch in " \t\n\r"), default=-1)
        if space > max_chars // 2:
            cut = space
    return text[:cut].rstrip(), True


def image_size(image_path: str, max_pixels: int) -> tuple[int, int] | tuple[str, str]:
    """(width, height) of a fully decodable image, or (reason, detail). Runs in worker processes."""
    try:
        img = decode_rgb(read_image_bytes(image_path), max_pixels=max_pixels)
    except ImageRejected as exc:
        return exc.reason, exc.detail
    except Exception as exc:  # noqa: BLE001 (a decoder bug in one file must not stop the run)
        return DECODE_ERROR, f"{type(exc).__name__}: {exc}"
    return img.size


def _chunks(records: Iterable[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    it = iter(records)
    while chunk := list(islice(it, size)):
        yield chunk


# Rejections are keyed by the record's position in the reader: rejected.jsonl lists them in
# reader order whatever the chunk size, so chunked and resumed runs write the same bytes.
Keyed = tuple[int, Rejection]
DECODE_BLOCK = 256  # records whose images are decoded together (one pool.map)


def _validate_chunk(
    chunk: list[RawRecord],
    offset: int,
    seen: dict[str, str],
    sizes: dict[str, tuple],
    max_pixels: int,
    max_caption_chars: int,
    mapper,
    bar,
) -> tuple[list[Pair], list[Keyed], int]:
    """Accept or reject one chunk (records `offset`, `offset + 1`, ... of the reader);
    `seen` (shard key -> the id that owns it) and `sizes` carry across chunks. Rejections come
    with their record index; the count is of accepted pairs whose caption was cut."""
    pairs: list[Pair] = []
    rejected: list[Keyed] = []
    n_truncated = 0
    for start in range(0, len(chunk), DECODE_BLOCK):
        todo: list[tuple[int, RawRecord, str, bool]] = []
        for i, rec in enumerate(chunk[start : start + DECODE_BLOCK], offset + start):
            key = sample_key(rec.id)
            owner = seen.get(key)
            if owner is not None:
                # Distinct ids may share a tar member name (`k/1` vs `k_1_<hash>`): the shards
                # would hold two samples under one key, so the later one is refused.
                reason, detail = (
                    (DUPLICATE_ID, "")
                    if owner == rec.id
                    else (DUPLICATE_KEY, f"same shard key {key!r} as id {owner!r}")
                )
                rejected.append((i, Rejection(rec.id, rec.source, "dedup", reason, detail)))
                continue
            seen[key] = rec.id
            if rec.problem:
                reason, _, detail = rec.problem.partition(" (")
                rejection = Rejection(rec.id, rec.source, "read", reason, detail.rstrip(")"))
                rejected.append((i, rejection))
                continue
            text, reason, detail = clean_caption(rec.caption)
            if text is None:
                rejection = Rejection(rec.id, rec.source, "caption", reason, detail)
                rejected.append((i, rejection))
                continue
            if not rec.image_path:
                rejection = Rejection(rec.id, rec.source, "image", IMAGE_NO_PATH)
                rejected.append((i, rejection))
                continue
            todo.append((i, rec, *shorten_caption(text, max_caption_chars)))
        paths = sorted({rec.image_path for _, rec, _, _ in todo} - sizes.keys())
        for path, size in zip(
            paths, mapper(image_size, paths, [max_pixels] * len(paths)), strict=True
        ):
            sizes[path] = size
        for i, rec, text, cut in todo:
            first, second = sizes[rec.image_path]
            if isinstance(first, str):
                rejection = Rejection(rec.id, rec.source, "image", first, second)
                rejected.append((i, rejection))
                continue
            pairs.append(
                Pair(rec.id, rec.source, rec.image_path, text, int(rec.itm), first, second)
            )
            n_truncated += cut
        bar.update(min(DECODE_BLOCK, len(chunk) - start))
    return pairs, rejected, n_truncated


def validate(
    records: Iterable[RawRecord],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
    workers: int = 1,
    progress: bool = True,
    work: WorkDir | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> PrepareResult:
    """Accept or reject every record in reader order; the first record with an id owns it.

    Records go in chunks of `chunk_size`; with a `work` folder each finished chunk is saved, and
    a chunk saved by an earlier run over the same records is read back instead of decoded. The
    reader is still read in full, so ids (duplicates) and the record digest chain stay exact.
    """
    from tqdm import tqdm

    result = PrepareResult()
    keyed: list[Keyed] = []
    seen: dict[str, str] = {}  # shard key -> the first id with it (ids are keys' owners)
    sizes: dict[str, tuple] = {}  # image path -> (w, h) or (reason, detail); images repeat
    digest, reuse = "", True  # after the first chunk that is redone, later ones are redone too
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    bar = tqdm(desc="prepare", unit="pair", disable=not progress)
    try:
        for index, chunk in enumerate(_chunks(records, chunk_size)):
            offset = result.n_input
            result.n_input += len(chunk)
            result.chunks += 1
            digest = chain_digest(digest, chunk)
            if work is not None and reuse and work.is_done(index, digest):
                pairs, rejected = work.read(index)
                truncated = work.truncated(index)
                for rec in chunk:
                    seen.setdefault(sample_key(rec.id), rec.id)
                result.chunks_resumed += 1
                bar.update(len(chunk))
            else:
                reuse = False
                mapper = pool.map if pool else map
                pairs, rejected, truncated = _validate_chunk(
                    chunk, offset, seen, sizes, max_pixels, max_caption_chars, mapper, bar
                )
                if work is not None:
                    work.write(index, digest, pairs, rejected, truncated)
            result.pairs.extend(pairs)
            result.n_truncated += truncated
            keyed.extend(rejected)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown()
    keyed.sort(key=lambda kr: kr[0])
    result.rejected = [r for _, r in keyed]
    return result


def sattolo(n: int, rng: random.Random) -> list[int]:
    """A uniformly random n-cycle: perm[i] != i for every i (a derangement) when n >= 2."""
    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = rng.randrange(i)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def make_negatives(pairs: list[Pair], seed: int, ratio: float = 1.0) -> list[Pair]:
    """Mismatched pairs (itm 0) for each source that has none: image i gets the caption of
    perm[i] from a seeded derangement, never its own. Pairs whose borrowed caption or image
    equals their own are skipped, since they would not be mismatched."""
    taken = {p.id for p in pairs}
    taken_keys = {sample_key(p.id) for p in pairs}
    negatives: list[Pair] = []
    sources = sorted({p.source for p in pairs})
    for source in sources:
        if any(p.source == source and p.itm == 0 for p in pairs):
            continue
        pos = [p for p in pairs if p.source == source and p.itm == 1]
        if len(pos) < 2:
            continue
        rng = random.Random(f"negatives:{seed}:{source}")  # str seeds hash with SHA-512: stable
        perm = sattolo(len(pos), rng)
        k = min(len(pos), max(0, round(ratio * len(pos))))
        for i in sorted(rng.sample(range(len(pos)), k)):
            own, other = pos[i], pos[perm[i]]
            if other.caption == own.caption or other.image_path == own.image_path:
                continue
            neg_id, n = f"{own.id}-neg", 1
            while neg_id in taken or sample_key(neg_id) in taken_keys:
                n += 1
                neg_id = f"{own.id}-neg{n}"
            taken.add(neg_id)
            taken_keys.add(sample_key(neg_id))
            negatives.append(
                Pair(neg_id, source, own.image_path, other.caption, 0, own.width, own.height)
            )
    return negatives


def interleave_by_itm(pairs: list[Pair]) -> list[Pair]:
    """Matched and mismatched pairs merged at an even rate, each kind in its own order.

    Shards are contiguous slices of pairs.parquet, so appended negatives would give whole shards
    of one itm class (and batches where CIT, COE and CIR see nothing). After this, any slice of
    n pairs holds n * (mismatched / total) mismatched pairs, within one.
    """
    matched = [p for p in pairs if p.itm == 1]
    mismatched = [p for p in pairs if p.itm != 1]
    n, k = len(pairs), len(mismatched)
    out: list[Pair] = []
    i = j = 0
    for t in range(n):
        if j < k and (t + 1) * k // n > j:  # mismatched so far lags floor((t + 1) * k / n)
            out.append(mismatched[j])
            j += 1
        else:
            out.append(matched[i])
            i += 1
    return out


def prepare(
    records: Iterable[RawRecord],
    out_dir: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
    negatives: bool = True,
    negative_ratio: float = 1.0,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    params: dict | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    inputs: dict | None = None,
    work_dir: str | os.PathLike | None = None,
) -> PrepareResult:
    """Run the whole stage and write pairs.parquet, rejected.jsonl and summary.json.

    Resumable: finished chunks go to `work_dir` (default: `.{out name}.work` beside `out_dir`),
    fingerprinted by `inputs` (see `prepare_work.describe_inputs`), the limits and `chunk_size`;
    a re-run after a kill decodes only the chunks that were not finished. The work folder is
    removed once the outputs are written. Outputs do not depend on `chunk_size` or `workers`.
    """
    from pmu.io import write_json_atomic

    if chunk_size < 1:
        raise InputError(f"chunk_size must be at least 1, got {chunk_size}")
    start = time.perf_counter()
    fingerprint = {
        "version": WORK_VERSION,
        "inputs": inputs,
        "max_pixels": max_pixels,
        "max_caption_chars": max_caption_chars,
        "chunk_size": chunk_size,
    }
    work = WorkDir(work_dir if work_dir is not None else default_work_dir(out_dir), fingerprint)
    found, discarded = work.open()
    if discarded:
        print(
            f"prepare: {work.path} was left by other inputs or parameters; discarded it",
            file=sys.stderr,
        )
    elif found:
        print(f"prepare: resuming, {found} finished chunks in {work.path}", file=sys.stderr)
    try:
        result = validate(
            records, max_pixels, max_caption_chars, workers, progress, work, chunk_size
        )
        if result.n_input == 0:
            raise InputError("the input holds no records", "check --input (and the column options)")
    except BaseException:
        if not work.finished_chunks():  # nothing to resume from: leave nothing behind
            work.remove()
        raise
    result.work_discarded = discarded
    if negatives:
        extra = make_negatives(result.pairs, seed, negative_ratio)
        result.pairs.extend(extra)
        result.n_negatives = len(extra)
    result.pairs = interleave_by_itm(result.pairs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_pairs_parquet(result.pairs, out / PAIRS_FILE)
    write_jsonl_atomic((asdict(r) for r in result.rejected), out / REJECTED_FILE)
    write_json_atomic(out / SUMMARY_FILE, {**result.counts(), "params": params or {}})
    work.remove()
    result.seconds = time.perf_counter() - start
    return result


def format_summary(result: PrepareResult, out_dir: str | os.PathLike) -> str:
    """A one-screen summary: counts by source, rejections by reason, throughput."""
    c = result.counts()
    rate = result.n_input / result.seconds if result.seconds > 0 else float("inf")
    lines = [
        f"prepare: {c['n_input']} input records -> {c['n_pairs']} pairs "
        f"({c['n_negatives_generated']} generated negatives), {c['n_rejected']} rejected",
    ]
    for source, n in c["by_source"].items():
        lines.append(f"  {source:<14} matched {n['matched']:>7}  mismatched {n['mismatched']:>7}")
    if c["rejected_by_reason"]:
        lines.append("  rejected by reason:")
        for reason, n in sorted(c["rejected_by_reason"].items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    {n:>7}  {reason}")
    if result.n_truncated:
        lines.append(f"  {result.n_truncated} long captions cut to --max-caption-chars")
    lines.append(
        f"  {result.chunks} chunks, {result.chunks_resumed} resumed from an interrupted run"
    )
    lines.append(f"  {result.seconds:.2f} s, {rate:.1f} records/s")
    lines.append(f"  wrote {Path(out_dir) / PAIRS_FILE}, {REJECTED_FILE}, {SUMMARY_FILE}")
    return "\n".join(lines)


def run_stage(settings: PrepareSettings) -> str:
    """prepare as the command runs it: the source's reader, validation, the summary text."""
    from pipeline.prepare_work import describe_inputs
    from pipeline.readers import read_source
    from pipeline.readers.sample import default_sample_dir
    from pipeline.readers.tabular import Columns

    s = settings
    columns = Columns(s.id_col, s.image_col, s.caption_col, s.itm_col)
    image_store = Path(s.out) / "images"  # hf: images held as bytes, content-addressed
    records = read_source(
        s.source,
        s.input,
        s.image_root,
        s.visualnews_data,
        columns,
        allow_outside_root=s.allow_outside_root,
        split=s.split,
        image_store=image_store,
    )
    source_input = s.input
    if s.source == "world":  # fingerprint the pairs file, not every file of the world
        from pipeline.readers.world import world_pairs_path

        source_input = str(world_pairs_path(s.input))
    params = {k: getattr(s, k) for k in RECORDED_SETTINGS}
    options: dict[str, Any] = {"allow_outside_root": True} if s.allow_outside_root else {}
    if s.source == "hf":
        options.update(split=s.split, image_store=str(image_store))
    result = prepare(
        records,
        s.out,
        max_pixels=s.max_pixels,
        max_caption_chars=s.max_caption_chars,
        negatives=s.negatives,
        negative_ratio=s.negative_ratio,
        seed=s.seed,
        workers=s.workers,
        progress=s.progress,
        params=params,
        chunk_size=s.chunk_size,
        inputs=describe_inputs(
            s.source,
            source_input if source_input or s.source != "sample" else default_sample_dir(),
            s.image_root,
            s.visualnews_data,
            columns if s.source in ("table", "hf") else None,
            options,
        ),
    )
    return format_summary(result, s.out)
