"""The fetch-relations stage: L Wikidata item-to-item properties (pid, English label).

Live: the Wikidata SPARQL endpoint (User-Agent, timeout, retries with backoff, a cache file).
Offline, or when the live fetch fails: the snapshot shipped in `pipeline/assets/` (CC0), with a
warning printed and `"source": "snapshot"` recorded in relations.json. Or a relation list of
your own (`--from FILE`).

Which L: the properties are ranked by relevance to what news images show (`relevance_tier`):
properties about people, organisations, places, works and events first, then the rest, and
properties of off-topic domains (taxa, genes, chemistry, astronomy, Wikimedia bookkeeping, ...)
last; numeric pid order within a tier (older properties are the widely used ones). `--order
pid` restores plain numeric pid order.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.settings import FetchRelationsSettings
from pmu.errors import InputError, require_file
from pmu.io import atomic_path, write_text_atomic

WIKIDATA_SPARQL = "https://query.wikidata.org/sparql"
SNAPSHOT = Path(__file__).resolve().parent / "assets" / "wikidata_relations.tsv"
USER_AGENT = (
    "prompt-me-up/0.1 (multimodal IE research pipeline; https://github.com/prompt-me-up) "
    "python-urllib"
)
QUERY = """SELECT ?property ?propertyLabel ?propertyDescription WHERE {
  ?property a wikibase:Property ;
            wikibase:propertyType wikibase:WikibaseItem .
  SERVICE wikibase:label { bd:serviceParam wikibase:language "en". }
}"""
_PID = re.compile(r"^P[1-9][0-9]*$")
RETRY_STATUS = {429, 500, 502, 503, 504}


class FetchFailed(RuntimeError):
    """The live endpoint gave no usable answer after all retries."""


@dataclass(frozen=True)
class Property:
    """One relation: a Wikidata pid (or a file's own id), its English label and, where known,
    its description and aliases (used only to rank)."""

    pid: str
    label: str
    description: str = ""
    aliases: str = ""  # "|"-separated


def pid_number(pid: str) -> int:
    return int(pid[1:])


def _clean(text: Any) -> str:
    return " ".join(str(text or "").split())


def normalise(rows: Iterable[Property | tuple]) -> list[Property]:
    """Valid pids with a real English label, one per pid, in numeric pid order."""
    best: dict[str, Property] = {}
    for row in rows:
        prop = row if isinstance(row, Property) else Property(*row)
        prop = Property(
            prop.pid, _clean(prop.label), _clean(prop.description), _clean(prop.aliases)
        )
        if _PID.match(prop.pid) and prop.label and prop.label != prop.pid and prop.pid not in best:
            best[prop.pid] = prop
    return sorted(best.values(), key=lambda p: pid_number(p.pid))


# ----------------------------------------------------------------------------- relevance

# What news images and captions are about (matched as whole words in the label, description and
# aliases): a property that names one of these domains relates people, organisations, places,
# works or events.
RELEVANT_DOMAINS = {
    "person": r"persons?|people|humans?|individual|spouse|partner|child|children|father|mother|"
    r"parent|sibling|relative|family|friend|member|player|athlete|artist|actor|author|"
    r"politician|citizen|student|teacher|employee|he|she|his|her|someone|whom|who",
    "organisation": r"organi[sz]ations?|company|companies|business|team|club|party|university|"
    r"school|institution|band|agency|government|league|employer|brand|airline",
    "place": r"country|countries|city|cities|town|place|location|located|territory|territorial|"
    r"region|capital|headquarters|residence|venue|border|state|nationality|citizenship",
    "work": r"works?|film|book|album|song|series|painting|publication|awards?|prize|genre|"
    r"performer|cast|director|producer|music|television|game|recognition",
    "event": r"events?|competition|tournament|election|war|battle|participant|ceremony|festival|"
    r"sports?|match|conflict",
}
# Domains no photograph of news shows (matched anywhere in the text).
OFF_TOPIC = (
    r"taxon|species|genus|\bgenes?\b|protein|chemical|molecul|compound|isotope|mineral|crystal|"
    r"astronom|\bstars?\b|planet|galax|constellation|anatom|disease|symptom|\bdrugs?\b|medical|"
    r"wikimedia|wikipedia|wikidata|template|categor|lexeme|grammatical|linguistic|mathemati|"
    r"algorithm|software|file format|programming|conservation status|\bfao\b|\bcells?\b|"
    r"enzyme|receptor|biolog|physical quantity|watercourse|\blakes?\b|\brivers?\b|geolog|"
    r"\bmodel item\b|\bscholarly\b|\bdisambiguation\b"
)
_DOMAIN_RES = {d: re.compile(rf"\b(?:{p})\b") for d, p in RELEVANT_DOMAINS.items()}
_OFF_RE = re.compile(OFF_TOPIC)
ORDERS = ("relevance", "pid")

# MNRE's relation types and the Wikidata properties closest to them: a check of a relation
# vocabulary (how many types find a close property in it), recorded in relations.json.
MNRE_CLOSE_PROPERTIES = {
    "/per/per/parent": ("P22", "P25", "P40", "P8810"),
    "/per/per/siblings": ("P3373",),
    "/per/per/couple": ("P26", "P451"),
    "/per/per/neighbor": ("P3342",),
    "/per/per/peer": ("P3342", "P1327"),
    "/per/per/charges": ("P1399",),
    "/per/per/alumi": ("P69",),
    "/per/per/alternate_names": (),  # names are strings, not item-to-item relations
    "/per/org/member_of": ("P463", "P54", "P102"),
    "/per/loc/place_of_residence": ("P551",),
    "/per/loc/place_of_birth": ("P19",),
    "/org/org/alternate_names": (),
    "/org/org/subsidiary": ("P355", "P749"),
    "/org/loc/locate_at": ("P159", "P131"),
    "/loc/loc/contain": ("P150", "P131"),
    "/per/misc/present_in": ("P1344", "P710"),
    "/per/misc/awarded": ("P166",),
    "/per/misc/race": ("P172",),
    "/per/misc/religion": ("P140",),
    "/per/misc/nationality": ("P27",),
    "/misc/misc/part_of": ("P361",),
    "/misc/loc/held_on": ("P276", "P17"),
}


def relevance_tier(prop: Property) -> int:
    """0: names a person / organisation / place / work / event domain; 1: neutral;
    2: an off-topic domain (taxa, genes, chemistry, astronomy, Wikimedia bookkeeping, ...)."""
    text = " | ".join((prop.label, prop.description, prop.aliases.replace("|", " "))).lower()
    if _OFF_RE.search(text):
        return 2
    return 0 if any(r.search(text) for r in _DOMAIN_RES.values()) else 1


def order_properties(rows: list[Property], order: str = "relevance") -> list[Property]:
    """`relevance`: by relevance tier, numeric pid order within a tier; `pid`: numeric order."""
    if order not in ORDERS:
        raise InputError(f"order must be one of {ORDERS}, got {order!r}")
    by_pid = sorted(rows, key=lambda p: pid_number(p.pid))
    if order == "pid":
        return by_pid
    return sorted(by_pid, key=relevance_tier)  # stable: pid order within a tier


def mnre_coverage(pids: Iterable[str]) -> dict[str, Any]:
    """How many of MNRE's 22 relation types (besides None) have a close property in `pids`."""
    kept = set(pids)
    found = {t: [p for p in ps if p in kept] for t, ps in MNRE_CLOSE_PROPERTIES.items()}
    return {
        "types": len(found),
        "covered": sum(1 for ps in found.values() if ps),
        "missing": sorted(t for t, ps in found.items() if not ps),
    }


def read_snapshot(path: str | os.PathLike = SNAPSHOT) -> list[Property]:
    """The shipped properties: a TSV with a pid, label, description, aliases header."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        if header[:2] != ["pid", "label"]:
            raise InputError(f"{path}: expected a pid/label header, got {header}")
        return normalise(Property(*row[:4]) for row in reader if len(row) >= 2)


def build_snapshot(properties_tsv: str | os.PathLike, out: str | os.PathLike = SNAPSHOT) -> int:
    """Write the snapshot from a full property list (pid, label, datatype, description,
    aliases...): WikibaseItem rows only, numeric pid order. Returns the number of rows."""
    with open(properties_tsv, encoding="utf-8", newline="") as f:
        rows = [
            Property(r["pid"], r["label"], r.get("description", ""), r.get("aliases_2022", ""))
            for r in csv.DictReader(f, delimiter="\t")
            if r.get("datatype") == "WikibaseItem"
        ]
    rows = normalise(rows)
    with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write("pid\tlabel\tdescription\taliases\n")
        for p in rows:
            cells = (p.pid, p.label, p.description, p.aliases)
            f.write("\t".join(c.replace("\t", " ") for c in cells) + "\n")
    return len(rows)


def parse_sparql_json(payload: bytes) -> list[Property]:
    """(pid, label) rows from an application/sparql-results+json answer to QUERY."""
    doc = json.loads(payload)
    rows = []
    for binding in doc["results"]["bindings"]:
        uri = binding.get("property", {}).get("value", "")
        label = binding.get("propertyLabel", {}).get("value", "")
        description = binding.get("propertyDescription", {}).get("value", "")
        rows.append(Property(uri.rsplit("/", 1)[-1], label, description))
    return normalise(rows)


def fetch_sparql(
    endpoint: str = WIKIDATA_SPARQL,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 2.0,
    query: str = QUERY,
) -> list[Property]:
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
    return normalise(Property(*r[:4]) for r in doc.get("rows", [])) or None


def write_cache(path: str | os.PathLike, endpoint: str, rows, query: str = QUERY) -> None:
    doc = {
        "endpoint": endpoint,
        "key": _cache_key(endpoint, query),
        "rows": [[p.pid, p.label, p.description, p.aliases] for p in rows],
    }
    write_text_atomic(path, json.dumps(doc, ensure_ascii=False) + "\n")


def read_relations_file(path: str | os.PathLike) -> list[Property]:
    """A relation list of your own, in file order: a TSV with a `pid` / `label` header (extra
    columns ignored), a JSON file (relations.json's `{"relations": [{"pid", "label"}]}`, or a
    list of labels or such objects), or plain text with one label per line (ids R1, R2, ...)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() == ".json":
        doc = json.loads(text)
        items = doc.get("relations", []) if isinstance(doc, dict) else doc
        for i, item in enumerate(items, 1):
            if isinstance(item, str):
                rows.append((f"R{i}", item))
            elif isinstance(item, dict) and "label" in item:
                rows.append((str(item.get("pid") or f"R{i}"), str(item["label"])))
            else:
                raise InputError(f"{path}: relation {i} is not a label or a {{pid, label}} object")
    elif path.suffix.lower() in (".tsv", ".tab"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
        if not reader.fieldnames or not {"pid", "label"} <= set(reader.fieldnames):
            raise InputError(f"{path}: expected a header with pid and label columns")
        rows = [(r["pid"] or "", r["label"] or "") for r in reader]
    else:
        labels = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        rows = [(f"R{i}", label) for i, label in enumerate(labels, 1)]
    out: list[Property] = []
    seen_ids: set[str] = set()
    seen_labels: set[str] = set()
    for pid, label in rows:
        pid, label = _clean(pid), _clean(label)
        if not pid or not label:
            raise InputError(f"{path}: a relation without id or label ({pid!r}, {label!r})")
        if pid in seen_ids or label in seen_labels:
            raise InputError(f"{path}: duplicate relation {pid!r} / {label!r}")
        seen_ids.add(pid)
        seen_labels.add(label)
        out.append(Property(pid, label))
    if not out:
        raise InputError(f"{path}: no relations")
    return out


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
    order: str = "relevance",
    from_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run the stage and write relations.json: `source` is `sparql`, `snapshot` or `file`.

    Wikidata properties are ranked by `order` (relevance tiers, or numeric pid); a relation
    file (`from_file`) is kept in its own order. The first `l` are kept."""
    from pmu.io import file_sha256, write_json_atomic

    if order not in ORDERS:
        raise InputError(f"order must be one of {ORDERS}, got {order!r}")
    warn = warn or (lambda msg: print(msg, file=sys.stderr))
    doc: dict[str, Any] = {"l": l}
    rows = None
    if from_file:
        rows = read_relations_file(from_file)
        doc.update(source="file", file=str(from_file), file_sha256=file_sha256(from_file))
        doc["order"] = "file"
    else:
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
        rows = order_properties(rows, order)
        doc["order"] = order
    kept = rows[:l]
    doc.update(
        n_available=len(rows),
        relations=[{"pid": p.pid, "label": p.label} for p in kept],
        mnre_coverage=mnre_coverage(p.pid for p in kept),
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_path, doc)
    return doc


def run_stage(settings: FetchRelationsSettings) -> str:
    """fetch-relations as the command runs it; returns what it prints (warnings to stderr)."""
    s = settings
    if s.from_file:
        require_file(s.from_file, "--from file", "pass your relation list (TSV, JSON or lines)")
    doc = fetch_relations(
        s.out,
        s.l,
        s.live,
        s.endpoint,
        s.timeout,
        s.retries,
        s.backoff,
        s.cache,
        warn=lambda msg: print(msg, file=sys.stderr),
        order=s.order,
        from_file=s.from_file,
    )
    where = doc.get("endpoint", doc.get("snapshot", doc.get("file")))
    cached = " (cached)" if doc.get("cached") else ""
    cov = doc["mnre_coverage"]
    return (
        f"fetch-relations: {len(doc['relations'])} of {doc['n_available']} relations "
        f"(l={s.l}, order {doc['order']}) from {doc['source']}{cached}: {where}; wrote {s.out}\n"
        f"  MNRE relation types with a close property among them: {cov['covered']} of "
        f"{cov['types']}"
    )
