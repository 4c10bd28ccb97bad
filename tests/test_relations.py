"""fetch-relations against a real HTTP server on 127.0.0.1: success, retry after a 500,
timeout -> snapshot fallback with a warning, cache reuse; and the shipped snapshot itself."""

import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline import relations
from pipeline.cli import app
from pmu.errors import InputError

# Shaped exactly like the endpoint's application/sparql-results+json answer to relations.QUERY,
# with real pids and labels (out of pid order, plus one property without an English label).
RESPONSE = (Path(__file__).parent / "data" / "wikidata_sparql_sample.json").read_bytes()
FAST = {"timeout": 0.5, "backoff": 0.05}


class Server:
    """Serves a script of behaviours, one per request: an HTTP status, or 'sleep'."""

    def __init__(self, script):
        self.script = list(script)
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                outer.requests.append((self.path, dict(self.headers)))
                action = outer.script.pop(0) if outer.script else 200
                if action == "sleep":
                    time.sleep(1.5)  # longer than the client's 0.5 s timeout
                    action = 200
                try:
                    body = RESPONSE if action == 200 else b'{"error": "boom"}'
                    self.send_response(action)
                    self.send_header("Content-Type", "application/sparql-results+json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/sparql"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _fetch(tmp_path, endpoint, warnings=None, **kw):
    warnings = [] if warnings is None else warnings
    args = {"live": True, "endpoint": endpoint, "retries": 2, **FAST, **kw}
    return relations.fetch_relations(tmp_path / "relations.json", warn=warnings.append, **args)


def test_live_success_parses_sorts_and_identifies_itself(tmp_path):
    with Server([200]) as srv:
        warnings = []
        doc = _fetch(tmp_path, srv.url, warnings, l=5, order="pid")
    assert doc["source"] == "sparql" and doc["endpoint"] == srv.url and not warnings
    assert [r["pid"] for r in doc["relations"]] == ["P6", "P16", "P17", "P19", "P25"]
    assert doc["n_available"] == 10  # P99999 has no English label
    assert json.loads((tmp_path / "relations.json").read_text())["relations"] == doc["relations"]
    path, headers = srv.requests[0]
    query = urllib.parse.parse_qs(urllib.parse.urlparse(path).query)
    assert "wikibase:WikibaseItem" in query["query"][0] and query["format"] == ["json"]
    assert headers["User-Agent"].startswith("prompt-me-up/")


def test_500_then_success_is_retried(tmp_path):
    with Server([500, 200]) as srv:
        doc = _fetch(tmp_path, srv.url)
    assert doc["source"] == "sparql" and len(srv.requests) == 2


def test_persistent_500_falls_back_to_snapshot(tmp_path):
    with Server([500, 500, 500]) as srv:
        warnings = []
        doc = _fetch(tmp_path, srv.url, warnings)
    assert len(srv.requests) == 3  # first attempt + 2 retries
    assert doc["source"] == "snapshot" and "HTTP 500" in doc["warning"]
    assert warnings and "snapshot" in warnings[0]


def test_timeout_falls_back_to_snapshot_quickly(tmp_path):
    with Server(["sleep", "sleep"]) as srv:
        warnings = []
        start = time.perf_counter()
        doc = _fetch(tmp_path, srv.url, warnings, retries=1, l=1000)
        elapsed = time.perf_counter() - start
    assert elapsed < 3.0
    assert doc["source"] == "snapshot" and "timed out" in doc["warning"].lower()
    assert warnings[0].startswith("WARNING:") and "snapshot" in warnings[0]
    saved = json.loads((tmp_path / "relations.json").read_text())
    assert saved["source"] == "snapshot" and len(saved["relations"]) == 1000
    assert saved["relations"][0] == {"pid": "P6", "label": "head of government"}


def test_cache_is_reused_without_network(tmp_path):
    cache = tmp_path / "cache.json"
    with Server([200]) as srv:
        first = _fetch(tmp_path, srv.url, cache=cache)
        second = _fetch(tmp_path, srv.url, cache=cache)
        assert len(srv.requests) == 1
    assert first["cached"] is False and second["cached"] is True
    assert first["relations"] == second["relations"]
    # A cache for another endpoint is not used.
    with Server([500, 500, 500]) as other:
        doc = _fetch(tmp_path, other.url, cache=cache)
    assert doc["source"] == "snapshot"


def test_unreachable_endpoint_falls_back(tmp_path):
    doc = _fetch(tmp_path, "http://127.0.0.1:9/sparql", retries=0)
    assert doc["source"] == "snapshot" and "live fetch failed" in doc["warning"]


def test_offline_default_uses_snapshot_with_warning(tmp_path):
    res = CliRunner().invoke(
        app, ["fetch-relations", "--out", str(tmp_path / "r.json"), "--l", "7"]
    )
    assert res.exit_code == 0, res.output
    assert "WARNING" in res.output and "snapshot" in res.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["source"] == "snapshot" and doc["l"] == 7 and len(doc["relations"]) == 7
    assert "live fetch disabled" in doc["warning"]


def test_shipped_snapshot_is_the_wikibaseitem_subset():
    rows = relations.read_snapshot()
    assert len(rows) == 1717
    pids = [relations.pid_number(p.pid) for p in rows]
    assert pids == sorted(pids) and len(set(pids)) == len(pids)
    labels = {p.pid: p.label for p in rows}
    assert labels["P31"] == "instance of"
    assert "P18" not in labels  # image: CommonsMedia, not an item-to-item relation
    assert sum(bool(p.description) for p in rows) > 1600  # descriptions travel for ranking


def test_relevance_order_puts_news_relations_first():
    rows = relations.read_snapshot()
    ranked = relations.order_properties(rows, "relevance")
    by_pid = relations.order_properties(rows, "pid")
    assert sorted(p.pid for p in ranked) == sorted(p.pid for p in rows)
    tiers = [relations.relevance_tier(p) for p in ranked]
    assert tiers == sorted(tiers)  # tier by tier, pid order within
    labels = {p.pid: p.label for p in ranked[:1000]}
    assert "P166" in labels and "P27" in labels  # award received, country of citizenship
    # the off-topic properties the sample report showed on top are gone from the first 1000
    off = [p.label for p in rows if relations.relevance_tier(p) == 2]
    assert "FAO risk status" in off and "taxonomic type" in off and "lake on watercourse" in off
    assert not any(relations.relevance_tier(p) == 2 for p in ranked[:1000])
    assert sum(relations.relevance_tier(p) == 2 for p in by_pid[:1000]) > 200
    # checked against MNRE: at every size at least as many relation types find a close property
    for size in (25, 50, 100, 200, 500, 1000):
        ours = relations.mnre_coverage(p.pid for p in ranked[:size])["covered"]
        old = relations.mnre_coverage(p.pid for p in by_pid[:size])["covered"]
        assert ours >= old, size
    assert relations.mnre_coverage(p.pid for p in ranked[:1000])["covered"] == 20


def test_stage_records_order_and_mnre_coverage(tmp_path):
    doc = relations.fetch_relations(tmp_path / "r.json", l=50, warn=lambda m: None)
    assert doc["order"] == "relevance" and doc["mnre_coverage"]["covered"] == 10
    old = relations.fetch_relations(tmp_path / "r.json", l=50, warn=lambda m: None, order="pid")
    assert old["mnre_coverage"]["covered"] == 7
    assert [r["pid"] for r in old["relations"][:3]] == ["P6", "P16", "P17"]
    with pytest.raises(InputError, match="order"):
        relations.fetch_relations(tmp_path / "r.json", order="random")


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("r.tsv", "pid\tlabel\textra\nP166\taward received\tx\nX9\tholds\t\n",
         [("P166", "award received"), ("X9", "holds")]),
        ("r.json", json.dumps({"relations": [{"pid": "P1303", "label": "instrument"}]}),
         [("P1303", "instrument")]),
        ("r.json", json.dumps(["sport", "employer"]), [("R1", "sport"), ("R2", "employer")]),
        ("r.txt", "# my relations\nsport\n\nowner of\n", [("R1", "sport"), ("R2", "owner of")]),
    ],
)  # fmt: skip
def test_relations_from_a_file_keep_its_order(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    res = CliRunner().invoke(
        app, ["fetch-relations", "--from", str(path), "--out", str(tmp_path / "o.json")]
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((tmp_path / "o.json").read_text())
    assert [(r["pid"], r["label"]) for r in doc["relations"]] == expected
    assert doc["source"] == "file" and doc["order"] == "file" and "warning" not in doc
    assert "WARNING" not in res.output


def test_bad_relation_files_are_refused(tmp_path):
    dup = tmp_path / "dup.txt"
    dup.write_text("sport\nsport\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# nothing\n")
    header = tmp_path / "h.tsv"
    header.write_text("id\tname\nP1\tx\n")
    for path, why in ((dup, "duplicate"), (empty, "no relations"), (header, "pid and label")):
        with pytest.raises(InputError, match=why):
            relations.read_relations_file(path)
    res = CliRunner().invoke(app, ["fetch-relations", "--from", str(dup), "--out", "x.json"])
    assert res.exit_code == 2 and "duplicate" in res.output
    res = CliRunner().invoke(app, ["fetch-relations", "--from", str(tmp_path / "missing.tsv")])
    assert res.exit_code == 2


def test_sparql_descriptions_feed_the_ranking():
    payload = json.dumps(
        {
            "results": {
                "bindings": [
                    {
                        "property": {"value": "http://www.wikidata.org/entity/P9"},
                        "propertyLabel": {"value": "host"},
                        "propertyDescription": {"value": "taxon that hosts the organism"},
                    },
                    {
                        "property": {"value": "http://www.wikidata.org/entity/P12"},
                        "propertyLabel": {"value": "employer"},
                        "propertyDescription": {"value": "organization a person works for"},
                    },
                ]
            }
        }
    ).encode()
    rows = relations.parse_sparql_json(payload)
    assert rows[0].description == "taxon that hosts the organism"
    assert [p.pid for p in relations.order_properties(rows)] == ["P12", "P9"]


def test_snapshot_rebuilds_identically_from_the_shared_tsv(tmp_path):
    from conftest import SHARED_DATA

    source = SHARED_DATA / "wikidata" / "wikidata_properties.tsv"
    if not source.exists():
        pytest.skip(f"{source} not present")
    out = tmp_path / "snap.tsv"
    assert relations.build_snapshot(source, out) == 1717
    assert out.read_bytes() == relations.SNAPSHOT.read_bytes()
