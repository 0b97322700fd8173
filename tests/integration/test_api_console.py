"""The support console in a real headless browser (Debian's chromium via Selenium and
chromedriver): log in with a tenant key, look up a number, see the binding masked, reveal it
(an audited action) and read its history.

Real processes: the shared redis-server (own key prefix), one `python -m proxy api`, chromium
and chromedriver (installed by scripts/test).
"""

from __future__ import annotations

import json
import shutil
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.integration.apiprocs import (
    KEYS,
    OPERATOR_KEY,
    ApiProcess,
    api_config,
    bearer,
    free_tcp_port,
    start_api,
)
from tests.integration.procs import REDIS_URL, delete_redis_prefix

pytestmark = pytest.mark.integration
A, B = "13800000077", "13900000077"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[ApiProcess, str]]:
    prefix = f"sip700test:{uuid.uuid4().hex[:12]}:"
    port = free_tcp_port()
    process = start_api(api_config(tmp_path, prefix, port=port), port, tmp_path / "api.log")
    yield process, prefix
    process.stop()
    delete_redis_prefix(prefix)


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        pytest.fail("chromium/chromedriver missing: scripts/test installs them")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(20)
    yield driver
    driver.quit()


def create(api: ApiProcess) -> dict:
    data = json.dumps({"a": A, "b": B, "ttl_s": 3600, "order_id": "ord-77"}).encode()
    request = urllib.request.Request(f"{api.url}/v1/bindings", data=data, method="POST",
                                     headers={**bearer("shop1"),
                                              "Content-Type": "application/json"})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def test_console_login_lookup_masked_reveal_audited(api: tuple[ApiProcess, str], browser,
                                                     tmp_path: Path) -> None:
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    process, prefix = api
    binding = create(process)
    driver = browser

    def find(by: str, value: str):  # the element of the page a click led to (no race)
        # a query that lands while the form's post navigates fails with "aborted by
        # navigation" (a WebDriverException): asked again until the new page is there
        return WebDriverWait(driver, 15, ignored_exceptions=(WebDriverException,)).until(
            expected_conditions.presence_of_element_located((by, value)))

    driver.get(f"{process.url}/console")
    find(By.ID, "key").send_keys("s7k_not-a-key")
    find(By.ID, "submit").click()
    assert "not valid" in find(By.ID, "error").text

    find(By.ID, "key").send_keys(KEYS["shop1"])
    find(By.ID, "submit").click()
    assert "tenant shop1" in find(By.ID, "who").text
    find(By.ID, "q").send_keys("+86 138 0000 0077")
    find(By.ID, "lookup").click()
    find(By.ID, "results")
    rows = driver.find_elements(By.CSS_SELECTOR, "#results tr.binding")
    assert len(rows) == 1
    row = rows[0]
    assert row.find_element(By.CLASS_NAME, "a").text == "138****0077"
    assert row.find_element(By.CLASS_NAME, "b").text == "139****0077"
    assert row.find_element(By.CLASS_NAME, "x").text == binding["x"]
    assert A not in driver.page_source and B not in driver.page_source
    driver.save_screenshot(str(tmp_path / "console-lookup.png"))

    row.find_element(By.CLASS_NAME, "reveal").click()
    assert find(By.CSS_SELECTOR, "#revealed td.a").text == A
    find(By.LINK_TEXT, "back").click()
    find(By.ID, "history")
    actions = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#history td.action")]
    assert actions == ["create", "reveal"]
    assert A not in driver.page_source  # the history shows the numbers masked too
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        reveals = [f for _, f in client.xrange(f"{prefix}audit") if f["action"] == "reveal"]
    finally:
        client.close()
    assert len(reveals) == 1 and reveals[0]["id"] == binding["id"]
    assert reveals[0]["key"] and KEYS["shop1"] not in json.dumps(reveals)

    # another tenant's session finds nothing; the operator finds it
    find(By.ID, "logout").click()
    find(By.ID, "key").send_keys(KEYS["shop2"])
    find(By.ID, "submit").click()
    assert "tenant shop2" in find(By.ID, "who").text
    driver.get(f"{process.url}/console/search?kind=order_id&q=ord-77")
    assert find(By.ID, "count").text == "No live binding."
    driver.get(f"{process.url}/console/bindings/{binding['id']}")
    assert "No such binding" in driver.page_source
    find(By.ID, "logout").click()
    find(By.ID, "key").send_keys(OPERATOR_KEY)
    find(By.ID, "submit").click()
    assert "operator" in find(By.ID, "who").text
    driver.get(f"{process.url}/console/search?kind=x&q={binding['x']}")
    assert len(driver.find_elements(By.CSS_SELECTOR, "#results tr.binding")) == 1
