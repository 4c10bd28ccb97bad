"""The fetch-relations stage: L Wikidata item-to-item properties (pid, English label).

Live: the Wikidata SPARQL endpoint (User-Agent, timeout, retries with backoff, a cache file).
Offline, or when the live fetch fails: the snapshot shipped in `pipeline/assets/` (CC0), with a
warning printed and `"source": "snapshot"` recorded in relations.json.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

WIKIDATA_SPARQL = "https://query.wikidata.org/sparql"
SNAPSHOT = Path(__file__).resolve().parent / "assets" / "wikidata_relations.tsv"
USER_AGENT = (
    "prompt-me-up/0.1 (multimodal IE research pipeline; https://github.com/prompt-me-up) "
    "python-urllib"
)
QUERY = """SELECT ?property ?propertyLabel WHERE {
  ?property a wikibase:Property ;
            wikibase:propertyType wikibase:WikibaseItem .
  SERVICE wikibase:label { bd:serviceParam wikibase:language "en". }
}"""
_PID = re.compile(r"^P[1-9][0-9]*$")
RETRY_STATUS = {429, 500, 502, 503, 504}


class FetchFailed(RuntimeError):
    """The live endpoint gave no usable answer after all retries."""


def pid_number(pid: str) -> int:
    return int(pid[1:])


def normalise(rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Valid pids with a real English label, one per pid, in numeric pid order."""
    best: dict[str, str] = {}
    for pid, label in rows:
        label = " ".join(str(label).split())
        if _PID.match(pid) and label and label != pid and pid not in best:
            best[pid] = label
    return sorted(best.items(), key=lambda kv: pid_number(kv[0]))


def read_snapshot(path: str | os.PathLike = SNAPSHOT) -> list[tuple[str, str]]:
    """The shipped (pid, label) rows: a two-column TSV with a header."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:2] != ["pid", "label"]:
            raise ValueError(f"{path}: expected a pid/label header, got {header}")
        return normalise([(row[0], row[1]) for row in reader if len(row) >= 2])


def build_snapshot(properties_tsv: str | os.PathLike, out: str | os.PathLike = SNAPSHOT) -> int:
    """Write the snapshot from a full property list (pid, label, datatype, ...): WikibaseItem
    rows only, pid and label only, numeric pid order. Returns the number of rows."""
    with open(properties_tsv, encoding="utf-8", newline="") as f:
        rows = [
            (r["pid"], r["label"])
            for r in csv.DictReader(f, delimiter="\t")
            if r.get("datatype") == "WikibaseItem"
        ]
    rows = normalise(rows)
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write("pid\tlabel\n")
        for pid, label in rows:
            f.write(f"{pid}\t{label.replace(chr(9), ' ')}\n")
    os.replace(tmp, out)
    return len(rows)


def parse_sparql_json(payload: bytes) -> list[tuple[str, str]]:
    """(pid, label) rows from an application/sparql-results+json answer to QUERY."""
    doc = json.loads(payload)
    rows = []
    for binding in doc["results"]["bindings"]:
        uri = binding.get("property", {}).get("value", "")
        label = binding.get("propertyLabel", {}).get("value", "")
        rows.append((uri.rsplit("/", 1)[-1], label))
    return normalise(rows)


def fetch_sparql(
    endpoint: str = WIKIDATA_SPARQL,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 2.0,
    query: str = QUERY,
) -> list[tuple[str, str]]:
    """Run QUERY against the endpoint; retry timeouts, connection errors, 429 and 5xx."""
    url = f"{endpoint}?{urllib.parse.urlencode({'query': query, 'format': 'json'})}"
    headers = {"User-Agent": USER_AGENT, "Accept": "application/sparql-results+json"}
    last = "no attempt"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(
                urllib.request.Request(url, headers=headers), timeout=timeout
            ) as resp:
                rows = parse_sparql_json(resp.read())
            if not rows:
                raise FetchFailed("the endpoint answered with no properties")
            return rows
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
            if exc.code not in RETRY_STATUS:
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"{type(reason).__name__}: {reason}"
        except (ValueError, KeyError) as exc:  # malformed JSON: retrying will not help
            last = f"bad response: {exc}"
            break
    raise FetchFailed(f"{endpoint}: {last} after {attempt + 1} attempt(s)")


def _cache_key(endpoint: str, query: str) -> str:
    return hashlib.sha256(f"{endpoint}\n{query}".encode()).hexdigest()


def read_cache(path: str | os.PathLike, endpoint: str, query: str = QUERY):
    """Cached rows for this endpoint and query, or None."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if doc.get("key") != _cache_key(endpoint, query):
        return None
    return normalise([(r[0], r[1]) for r in doc.get("rows", [])]) or None


def write_cache(path: str | os.PathLike, endpoint: str, rows, query: str = QUERY) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    doc = {"endpoint": endpoint, "key": _cache_key(endpoint, query), "rows": rows}
    tmp.write_text(json.dumps(doc, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def fetch_relations(
    out_path: str | os.PathLike,
    l: int = 1000,  # noqa: E741 (the paper's name for the number of relations)
    live: bool = False,
    endpoint: str = WIKIDATA_SPARQL,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 2.0,
    cache: str | os.PathLike | None = None,
    snapshot: str | os.PathLike = SNAPSHOT,
    warn=None,
) -> dict[str, Any]:
    """Run the stage and write relations.json: `source` is `sparql` or `snapshot`."""
    from pipeline.shards import file_sha256, write_json_atomic

    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    doc: dict[str, Any] = {"l": l}
    rows = None
    why = "live fetch disabled (fetch_relations.live: false / --offline)"
    if live:
        rows = read_cache(cache, endpoint) if cache else None
        if rows is not None:
            doc.update(source="sparql", endpoint=endpoint, cached=True)
        else:
            try:
                rows = fetch_sparql(endpoint, timeout, retries, backoff)
                doc.update(source="sparql", endpoint=endpoint, cached=False)
                if cache:
                    write_cache(cache, endpoint, rows)
            except FetchFailed as exc:
                why = f"live fetch failed: {exc}"
    if rows is None:
        rows = read_snapshot(snapshot)
        warning = (
            f"relations come from the bundled Wikidata snapshot ({Path(snapshot).name}, "
            f"{len(rows)} WikibaseItem properties, CC0), not the live endpoint: {why}"
        )
        doc.update(
            source="snapshot",
            snapshot=Path(snapshot).name,
            snapshot_sha256=file_sha256(snapshot),
            warning=warning,
        )
        warn(f"WARNING: {warning}")
    kept = rows[:l]
    doc.update(
        n_available=len(rows), relations=[{"pid": pid, "label": label} for pid, label in kept]
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_path, doc)
    return doc
