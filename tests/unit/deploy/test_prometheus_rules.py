"""The shipped alert rules: valid for promtool, and every rule fires (and stays quiet) in its unit test."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from rmq.testing.prometheus import ensure_prometheus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
RULES_DIR = os.path.join(ROOT, "deploy", "prometheus")
RULES = os.path.join(RULES_DIR, "rules.yml")
RULES_TEST = os.path.join(RULES_DIR, "rules_test.yml")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = ensure_prometheus(os.path.join(ROOT, "scripts", "install_prometheus"))
    if isinstance(found, str):
        pytest.skip(found)
    return found[1]


def _alerts() -> list[str]:
    with open(RULES) as fh:
        groups = yaml.safe_load(fh)["groups"]
    return [rule["alert"] for group in groups for rule in group["rules"] if "alert" in rule]


def test_rules_pass_promtool_check(promtool):
    out = subprocess.run([promtool, "check", "rules", RULES], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in out.stdout


def test_rule_unit_tests_pass_promtool_test_rules(promtool):
    out = subprocess.run([promtool, "test", "rules", RULES_TEST], capture_output=True, text=True, timeout=120,
                         cwd=RULES_DIR)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_rule_has_a_test_where_it_fires_and_one_where_it_stays_quiet():
    with open(RULES_TEST) as fh:
        cases = [case for test in yaml.safe_load(fh)["tests"] for case in test["alert_rule_test"]]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    alerts = set(_alerts())
    assert alerts - fires == set(), "rules never seen firing in rules_test.yml"
    assert alerts - quiet == set(), "rules never checked quiet in rules_test.yml"


def test_a_broken_rule_fails_its_unit_test(promtool, tmp_path):
    # the tests would catch a rule that looks at the wrong line: the memory rule on the kill line
    text = open(RULES).read().replace('rmq_memory_line_bytes{line="pause"}', 'rmq_memory_line_bytes{line="kill"}')
    (tmp_path / "rules.yml").write_text(text)
    (tmp_path / "rules_test.yml").write_text(open(RULES_TEST).read())
    out = subprocess.run([promtool, "test", "rules", "rules_test.yml"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode != 0 and "RmqMemoryNearKillLine" in out.stdout + out.stderr


def test_the_example_scrape_config_passes_promtool_check(promtool):
    out = subprocess.run([promtool, "check", "config", "prometheus.yml"], capture_output=True, text=True,
                         timeout=60, cwd=RULES_DIR)
    assert out.returncode == 0, out.stdout + out.stderr


def test_scrape_configs_name_the_jobs_the_rules_and_dashboard_select():
    # Debian's promtool is built without Kubernetes discovery: the Kubernetes variant is checked as data
    for name in ("prometheus.yml", "prometheus-kubernetes.yml"):
        with open(os.path.join(RULES_DIR, name)) as fh:
            config = yaml.safe_load(fh)
        assert [job["job_name"] for job in config["scrape_configs"]] == ["rmq-workers", "rmq-exporter"], name
        assert config["rule_files"] == ["rules.yml"]
    rules = open(RULES).read()
    assert 'job="rmq-workers"' in rules and 'job="rmq-exporter"' in rules
