"""The page at ``/`` of ``newslora serve`` and the HTML comparison report, checked in a real browser: Debian's
headless Chromium driven by selenium against a live ``newslora serve`` subprocess on 127.0.0.1."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

TOKEN = "page-s3cret"
HEADLINES = ["Stocks rally as the central bank holds interest rates", "Striker scores twice as United win the derby"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("chromium and chromedriver are needed: apt-get install -y chromium chromium-driver "
                    "(.ci/run does this)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1100,900"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=Service(driver))
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """``newslora serve`` on the tiny run folder, with a token and at most 2 texts per request."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "NEWSLORA_API_TOKEN": TOKEN,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"),
                                          os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "newslora", "serve", str(tiny_run.run_dir), "--port", str(port),
                                 "--max-texts", "2"], stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"newslora serve did not start: {log.read_text()[-2000:]}")
        time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=60)


def wait_for(drv, condition, what: str, timeout: float = 60):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(lambda d: condition(d), message=what)


def message(drv) -> str:
    from selenium.webdriver.common.by import By

    el = drv.find_element(By.ID, "message")
    return el.text if el.is_displayed() else ""


def test_page_classifies_headlines_like_classify(browser, server, tiny_run, tmp_path):
    from selenium.webdriver.common.by import By

    drv = browser
    drv.get(server + "/")  # no token sent: the page opens, then asks for one (the server answered 401)
    box = wait_for(drv, lambda d: d.find_element(By.ID, "token-box").is_displayed() and d.find_element(
        By.ID, "token-box"), "the page did not ask for the token")
    assert "needs a token" in message(drv)
    box.find_element(By.ID, "token").send_keys("wrong")
    drv.find_element(By.ID, "token-save").click()
    wait_for(drv, lambda d: "token was refused" in message(d), "a wrong token was not shown as refused")
    field = drv.find_element(By.ID, "token")
    field.clear()
    field.send_keys(TOKEN)
    drv.find_element(By.ID, "token-save").click()
    wait_for(drv, lambda d: d.find_element(By.ID, "model-name").text != "…", "the model facts never loaded")
    # what the page shows of the model is what its run folder records
    info = json.loads((tiny_run.run_dir / "run.json").read_text())
    ev = json.loads((tiny_run.run_dir / "eval.json").read_text())
    assert drv.find_element(By.ID, "model-name").text == info["name"]
    assert drv.find_element(By.ID, "model-labels").text == ", ".join(info["label_names"])
    assert drv.find_element(By.ID, "model-budget").text == (f"{info['trainable']['total']:,} / "
                                                            f"{info['trainable']['budget']:,}")
    assert drv.find_element(By.ID, "model-accuracy").text == f"{100 * ev['test']['accuracy']:.2f} %"
    assert not drv.find_element(By.ID, "token-box").is_displayed() and message(drv) == ""

    drv.find_element(By.ID, "texts").send_keys("\n".join(HEADLINES))
    drv.find_element(By.ID, "classify").click()
    wait_for(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .result")) == 2, "no results shown")
    want = httpx.post(f"{server}/classify", json={"texts": HEADLINES}, headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=60).json()["results"]
    results = drv.find_elements(By.CSS_SELECTOR, "#results .result")
    assert [r.find_element(By.CSS_SELECTOR, ".label").text for r in results] == [w["label"] for w in want]
    for r, w in zip(results, want):  # one bar per label, as wide as its probability
        rows = r.find_elements(By.CSS_SELECTOR, ".row")
        assert sorted(x.find_element(By.CSS_SELECTOR, ".name").text for x in rows) == sorted(w["scores"])
        for x in rows:
            p = w["scores"][x.find_element(By.CSS_SELECTOR, ".name").text]
            assert x.find_element(By.CSS_SELECTOR, ".value").text == f"{100 * p:.1f}%"
            track = x.find_element(By.CSS_SELECTOR, ".track").size["width"]
            assert x.find_element(By.CSS_SELECTOR, ".bar").size["width"] == pytest.approx(track * p, abs=2)
    shot = tmp_path / "page.png"
    assert drv.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
    if os.environ.get("NEWSLORA_SCREENSHOT"):  # refresh the README's picture: NEWSLORA_SCREENSHOT=docs/page.png
        shutil.copyfile(shot, os.environ["NEWSLORA_SCREENSHOT"])

    # the server's limits and refusals show as a message; the page stays usable
    texts = drv.find_element(By.ID, "texts")
    texts.clear()
    texts.send_keys("one\ntwo\nthree")  # --max-texts 2
    drv.find_element(By.ID, "classify").click()
    wait_for(drv, lambda d: message(d).startswith("413: 3 texts in one request; the limit is 2"), "no 413 message")
    texts.clear()
    texts.send_keys("   ")  # blank text: refused by /classify
    drv.find_element(By.ID, "classify").click()
    wait_for(drv, lambda d: message(d).startswith("422: "), "no 422 message")
    assert len(drv.find_elements(By.CSS_SELECTOR, "#results .result")) == 2  # the last results stay


def test_comparison_report_renders(browser, tiny_run, tmp_path):
    from selenium.webdriver.common.by import By

    from newslora.report import compare_runs

    html = compare_runs([tiny_run.run_dir], tmp_path / "report")["html"]
    browser.get(Path(html).resolve().as_uri())
    wait_for(browser, lambda d: d.execute_script("return document.readyState") == "complete", "report not loaded")
    header = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "table thead th")]
    rows = browser.find_elements(By.CSS_SELECTOR, "table tbody tr")
    assert header[:2] == ["name", "method"] and len(rows) == 1
    assert rows[0].find_elements(By.TAG_NAME, "td")[0].text == json.loads(
        (tiny_run.run_dir / "run.json").read_text())["name"]
    assert browser.find_element(By.CSS_SELECTOR, "table").size["height"] > 20
    widths = browser.execute_script("return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
    assert len(widths) >= 2 and all(w > 0 for w in widths), widths


def test_page_and_model_routes(tiny_model_dir, tiny_run):
    """``/`` opens without a token; ``/model`` is guarded like ``/classify`` and reads the model folder."""
    from fastapi.testclient import TestClient

    from newslora.predict import load_classifier
    from newslora.serve import ServeOptions, create_app

    clf = load_classifier(tiny_model_dir)
    with TestClient(create_app(tiny_model_dir, classifier=clf, options=ServeOptions(token=TOKEN))) as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'id="texts"' in page.text and "/classify" in page.text
        assert c.get("/model").status_code == 401
        facts = c.get("/model", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    # a standalone folder that records no run: its own name and labels, nothing invented
    assert facts == {"name": tiny_model_dir.name, "labels": clf.label_names, "method": None, "backbone": None,
                     "trainable": None, "budget": None, "test_accuracy": None}
    with TestClient(create_app(tiny_run.run_dir)) as c:
        facts = c.get("/model").json()
    info = json.loads((tiny_run.run_dir / "run.json").read_text())
    assert facts["trainable"] == info["trainable"]["total"] and facts["budget"] == info["trainable"]["budget"]
    assert facts["test_accuracy"] == json.loads((tiny_run.run_dir / "eval.json").read_text())["test"]["accuracy"]
    assert facts["name"] == info["name"] and facts["method"] == info["method"]
