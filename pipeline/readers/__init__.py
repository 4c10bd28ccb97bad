"""Input readers: one module per format, each yielding `RawRecord`s and never raising per record."""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("sample", "newsclippings", "table", "wds", "world")


@dataclass
class RawRecord:
    """One image-caption pair as a reader found it, before validation.

    `caption` is bytes when the reader could not decode it as UTF-8 (prepare rejects it with a
    reason); `problem` is a reader-level reason (e.g. a missing field) that rejects the record.
    """

    id: str
    source: str
    image_path: str | None
    caption: str | bytes | None
    itm: int = 1
    problem: str | None = None


def text_or_bytes(raw: bytes) -> str | bytes:
    """UTF-8 text, or the raw bytes back when they do not decode (rejected later with a reason)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def unescape_surrogates(value: str) -> str | bytes:
    """A str decoded with `surrogateescape`: the text, or the original bytes if it was not UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return value.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes: still not valid UTF-8
            return value.encode("utf-8", "surrogatepass")
    return value


def read_source(
    source: str,
    input_path: str | None = None,
    image_root: str | None = None,
    visualnews_data: str | None = None,
    columns=None,
):
    """The record iterator for one source name (`sample`, `newsclippings`, `table`, `wds`,
    `world`)."""
    if source == "sample":
        from pipeline.readers.sample import read_sample

        return read_sample(input_path)
    if input_path is None:
        raise ValueError(f"--input is required for source {source!r}")
    if source == "newsclippings":
        from pipeline.readers.newsclippings import read_newsclippings

        if visualnews_data is None:
            raise ValueError("source 'newsclippings' needs --visualnews-data (data.json)")
        return read_newsclippings(input_path, visualnews_data, image_root)
    if source == "table":
        from pipeline.readers.tabular import read_table

        return read_table(input_path, columns, image_root)
    if source == "wds":
        from pipeline.readers.webdataset_tars import read_wds

        return read_wds(input_path)
    if source == "world":
        from pipeline.readers.world import read_world

        return read_world(input_path)
    raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
