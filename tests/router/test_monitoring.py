"""deploy/: the Grafana dashboard and the Prometheus alert rules query only what a live router exports,
the rules are well formed, and (where promtool is installed) Prometheus accepts them and they fire
when they should."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.serving import ENGINE_KWARGS, RouterThread, greedy

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "nanoserve.json"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "alerts.yml"

# What issue 9 asks the dashboard to show, by the metric that shows it.
DASHBOARD_MUST_SHOW = {
    "request rate": "nanoserve_requests_total",
    "TTFT": "nanoserve_time_to_first_token_seconds_bucket",
    "ITL": "nanoserve_inter_token_latency_seconds_bucket",
    "tokens/s": "nanoserve_tokens_total",
    "KV usage": "nanoserve_kv_cache_usage",
    "prefix hit rate": "nanoserve_prefix_cache_hit_tokens_total",
    "queue depth": "nanoserve_queue_depth",
    "replica up/down": "nanoserve_replica_up",
    "failovers": "nanoserve_failovers_total",
}
REQUIRED_ALERTS = {"NanoserveNoHealthyReplica", "NanoserveHighErrorRate", "NanoserveTTFTHigh",
                   "NanoserveKVCacheNearFull", "NanoserveFailoverStorm"}

# --- reading PromQL: which metrics and labels an expression names ---

_PROMQL_TOKEN = re.compile(r"""
    "(?:[^"\\]|\\.)*" | '(?:[^'\\]|\\.)*'     # string
  | \{[^}]*\}                                 # label matchers
  | \[[^\]]*\]                                # range
  | \$\{?\w+\}?                               # Grafana variable
  | \d+(?:\.\d*)?(?:[eE][+-]?\d+)?            # number
  | [A-Za-z_:][\w:]*                          # identifier
  | \S                                        # operator or bracket
""", re.VERBOSE)
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_KEYWORDS = _LABEL_LISTS | {"bool", "and", "or", "unless", "offset", "sum", "min", "max", "avg", "group", "stddev",
                            "stdvar", "count", "count_values", "bottomk", "topk", "quantile"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names an expression uses (functions and keywords left out)."""
    tokens = _PROMQL_TOKEN.findall(expr)
    metrics: set[str] = set()
    labels: set[str] = set()
    i = 0
    while i < len(tokens):
        token, after = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
        if token.startswith("{"):
            labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", token))
        elif token in _LABEL_LISTS and after == "(":
            end = tokens.index(")", i)
            labels |= {t for t in tokens[i + 2 : end] if t != ","}
            i = end
        elif re.fullmatch(r"[A-Za-z_:][\w:]*", token) and after != "(" and token not in _KEYWORDS:
            metrics.add(token)
        i += 1
    return metrics, labels


def test_promql_names() -> None:
    expr = 'histogram_quantile(0.99, sum by (le, x) (rate(a_bucket{y=~"1|2"}[$__rate_interval]))) > 2e-3 and b'
    assert promql_names(expr) == ({"a_bucket", "b"}, {"le", "x", "y"})
    assert promql_names("sum(up) == 0 or absent(c:d)") == ({"up", "c:d"}, set())


# --- the files ---


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def scrape(router: RouterThread) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{router.router.metrics_port}/metrics", timeout=10) as answer:
        return answer.read().decode()


@pytest.fixture(scope="module")
def router(start_module_router: Callable[..., RouterThread]) -> RouterThread:
    return start_module_router(num_replicas=2, metrics_port=0)


@pytest.fixture(scope="module")
def exported(router: RouterThread) -> dict[str, set[str]]:
    """Every sample name the live router's /metrics serves (after a request), with its label names."""
    with router.client() as client:
        client.complete([1, 2, 3], timeout=60, **greedy(2))
    families = list(text_string_to_metric_families(scrape(router)))
    defined = {family.name for family in router.router.metrics.registry.collect()}
    assert defined <= {family.name for family in families}
    samples: dict[str, set[str]] = {}
    for family in families:
        assert family.samples, f"{family.name} is defined but exports no sample"
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return samples


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_name_only_exported_metrics_and_labels(exported: dict[str, set[str]], source: str) -> None:
    exprs = dashboard_exprs() if source == "dashboard" else [rule["expr"] for rule in alert_rules()]
    assert exprs
    for expr in exprs:
        metrics, labels = promql_names(expr)
        assert metrics, expr
        assert metrics <= exported.keys(), f"{expr!r} names {sorted(metrics - exported.keys())}, not exported"
        their_labels = set().union(*(exported[m] for m in metrics))
        assert labels <= their_labels, f"{expr!r} uses labels {sorted(labels - their_labels)} its metrics lack"


def test_every_replica_is_exported_from_the_start(exported: dict[str, set[str]]) -> None:
    """Per-replica series exist at 0 before anything happens, so increase() counts a replica's first restart."""
    assert {"replica"} <= exported["nanoserve_replica_restarts_total"]


def test_each_replica_reports_its_dtypes_and_kv_cache_size(router: RouterThread) -> None:
    """nanoserve_replica_info carries what GetModelInfo says of the weights' and the KV cache's dtypes, and
    nanoserve_kv_cache_blocks the cache's size in blocks."""
    with router.client() as client:
        info = client.model_info(timeout=10)
    samples = [s for f in text_string_to_metric_families(scrape(router)) for s in f.samples]
    names = sorted(slot.name for slot in router.router.pool.slots)
    labels = [s.labels for s in samples if s.name == "nanoserve_replica_info" and s.value == 1]
    assert sorted(labels, key=lambda x: x["replica"]) == [
        {"replica": name, "dtype": info.dtype, "kv_cache_dtype": info.kv_cache_dtype} for name in names]
    blocks = {s.labels["replica"]: s.value for s in samples if s.name == "nanoserve_kv_cache_blocks"}
    assert blocks == dict.fromkeys(names, ENGINE_KWARGS["num_kv_blocks"])  # the cache the test engines are given


def test_prefix_hit_tokens_count_what_the_replicas_served(router: RouterThread) -> None:
    def hit_tokens() -> float:
        [sample] = [s for f in text_string_to_metric_families(scrape(router)) for s in f.samples
                    if s.name == "nanoserve_prefix_cache_hit_tokens_total"]
        return sample.value

    before = hit_tokens()
    with router.client() as client:
        usages = [client.complete(list(range(100, 140)), timeout=60, **greedy(2)).usage for _ in range(2)]
    assert usages[1].cached_prompt_tokens == 32  # two full blocks, on the replica that holds them
    assert hit_tokens() - before == sum(u.cached_prompt_tokens for u in usages)


def test_dashboard_is_well_formed_and_shows_what_the_issue_asks() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    [variable] = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24, p["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & area, f"panel {p['title']!r} overlaps another"
        cells |= area
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and p["description"], p["title"]
        ref_ids = [t["refId"] for t in p["targets"]]
        assert ref_ids and len(set(ref_ids)) == len(ref_ids), p["title"]
    named = set().union(*(promql_names(expr)[0] for expr in dashboard_exprs()))
    missing = {what for what, metric in DASHBOARD_MUST_SHOW.items() if metric not in named}
    assert not missing, f"the dashboard does not show {sorted(missing)}"


def test_alert_rules_are_well_formed() -> None:
    """The structure Prometheus expects, checked without promtool (which CI may not have)."""
    config = yaml.safe_load(RULES.read_text())
    assert set(config) == {"groups"}
    names = []
    for group in config["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert re.fullmatch(r"Nanoserve[A-Z]\w+", rule["alert"]) and isinstance(rule["expr"], str)
            assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), rule["alert"]
            assert rule["labels"]["severity"] in {"critical", "warning"}
            assert {"summary", "description"} <= set(rule["annotations"])
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            names.append(rule["alert"])
    assert len(names) == len(set(names))
    assert set(names) >= REQUIRED_ALERTS


def _promtool(*args: str, cwd: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (it comes with Prometheus, e.g. `apt-get install prometheus`)")
    result = subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_rules_and_config() -> None:
    _promtool("check", "rules", RULES.name, cwd=PROMETHEUS)
    _promtool("check", "config", "prometheus.yml", cwd=PROMETHEUS)


def test_promtool_alerts_fire_when_they_should() -> None:
    _promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS)


def test_promtool_parses_the_dashboards_queries(tmp_path: Path) -> None:
    """Each panel's query, as a recording rule, so Prometheus' own parser checks its syntax."""
    rules = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
             for i, expr in enumerate(dashboard_exprs())]
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool("check", "rules", "dashboard.yml", cwd=tmp_path)
