"""prep serve: a real uvicorn server on a free localhost port, real HTTP, and a real headless
chromium that types a query and sees thumbnails and the alignment overlay."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from search_fixtures import planted_run, split_captions  # noqa: F401 (fixture)

SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(port: int, path: str):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)  # the path goes out exactly as written (no normalisation)
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("content-type") or ""
    finally:
        conn.close()


def _start_server(index: Path, images: Path, tokenizer: Path):
    """`prep serve` in a subprocess on a free port, once it answers /api/info: (port, process)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "teranprep", "serve", str(index), "--port", str(port),
                             "--images", str(images), "--tokenizer", str(tokenizer)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if _get(port, "/api/info")[0] == 200:
                return port, proc
        except OSError:
            time.sleep(0.2)
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read())
    proc.kill()
    raise AssertionError("server did not start")


def _stop_server(proc) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


@pytest.fixture(scope="module")
def server(planted_run, tmp_path_factory):
    from PIL import Image
    from teranprep.pipeline.index import build_index
    p = planted_run
    root = tmp_path_factory.mktemp("serve")
    index = root / "index"
    build_index(p["run"], p["features"], index, splits=p["splits"], split="test", echo=lambda *_: None)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for key in sorted({k for k, _ in split_captions(p["splits"])}):
        Image.fromarray(rng.integers(0, 255, (100, 100, 3), dtype=np.uint8)).save(images / key)
    secret = root / "secret.jpg"
    secret.write_bytes(b"outside the image root")
    (images / "escape.jpg").symlink_to(secret)           # a symlink leaving the root
    (images / "up").symlink_to(root, target_is_directory=True)
    port, proc = _start_server(index, images, p["tokenizer"])
    yield {"port": port, "index": index, "images": images, "proc": proc, "secret": secret, **p}
    out = _stop_server(proc)
    assert f"http://127.0.0.1:{port}/" in out  # localhost unless told otherwise


@pytest.fixture(scope="module")
def captioned_server(planted_run, tmp_path_factory):
    """The planted run served over features of 1000 x 1000 images (the planted boxes x 10, so the
    same embeddings) and an index holding every split's captions (image -> text)."""
    import dataclasses
    from PIL import Image
    from teranprep.manifests.build import write_features
    from teranprep.manifests.shards import ShardReader
    from teranprep.pipeline.index import build_index
    p = planted_run
    root = tmp_path_factory.mktemp("serve-captions")
    regions = []
    for shard in sorted((p["features"] / "shards").glob("*.h5")):
        with ShardReader(shard) as reader:
            for i in range(len(reader.image_keys)):
                r = reader.read(i)
                regions.append(dataclasses.replace(r, width=r.width * 10, height=r.height * 10, boxes=r.boxes * 10))
    features = root / "features"
    write_features(features, regions, feature_dim=regions[0].features.shape[1], dtype="float32",
                   shard_size=64, columns=(), stage="test-planted")
    index = root / "index"
    build_index(p["run"], features, index, captions=p["splits"], echo=lambda *_: None)
    images = root / "images"
    images.mkdir()
    for key in sorted({k for k, _ in split_captions(p["splits"])}):
        Image.new("RGB", (1000, 1000), (90, 120, 150)).save(images / key)
    port, proc = _start_server(index, images, p["tokenizer"])
    yield {"port": port, "index": index, **p}
    _stop_server(proc)


def test_api_json_schema_and_answers(server):
    from teranprep.pipeline.search import Searcher
    port = server["port"]
    key, ids = split_captions(server["splits"])[0]
    # these planted splits carry no caption rule (as-given): the query types the final "." its
    # training captions had, or the reference rule would not score its last word
    words = " ".join(f"w{i}" for i in ids[1:-2])
    query = words + "."
    status, body, ctype = _get(port, f"/api/search?q={query.replace(' ', '+')}&k=5")
    assert status == 200 and ctype.startswith("application/json")
    data = json.loads(body)
    assert set(data) == {"query", "mode", "shortlist", "results", "timings_ms", "warning"}
    assert data["mode"] == "two-stage" and data["shortlist"] == 30 and data["warning"] is None
    assert set(data["timings_ms"]) == {"encode", "shortlist", "rerank", "total"}
    assert [r["rank"] for r in data["results"]] == [1, 2, 3, 4, 5]
    for r in data["results"]:
        assert set(r) == {"rank", "key", "score", "width", "height", "image_url"}
        assert isinstance(r["score"], float) and r["image_url"] == f"/images/{r['key']}"
        assert (r["width"], r["height"]) == (100, 100)
    with Searcher(server["index"], tokenizer=str(server["tokenizer"])) as s:
        direct = s.search(query, k=5)
    assert [r["key"] for r in data["results"]] == [h.key for h in direct.hits]
    assert key in [r["key"] for r in data["results"]][:3]  # planted signal: its own image ranks high

    status, body, _ = _get(port, f"/api/alignment?key={key}&q={query.replace(' ', '+')}")
    assert status == 200
    align = json.loads(body)
    assert set(align) == {"key", "width", "height", "query", "words", "image_url"}
    assert [w["word"] for w in align["words"]] == words.split()
    concepts = server["concepts_of"][key]
    for w in align["words"]:
        assert set(w) == {"position", "word", "region", "score", "box"}
        assert 0 <= w["region"] < len(concepts) and len(w["box"]) == 4
    # each word's region is the one showing the concept it names, for most words
    hits = sum(concepts[w["region"]] == int(w["word"][1:]) - 5 for w in align["words"])
    assert hits >= 2


def test_image_files_only_from_under_the_root(server):
    port, images = server["port"], server["images"]
    key = sorted(p.name for p in images.glob("img*.jpg"))[0]
    status, body, ctype = _get(port, f"/images/{key}")
    assert status == 200 and body == (images / key).read_bytes() and ctype == "image/jpeg"
    for path in ("/images/../../etc/passwd", "/images/../secret.jpg", "/images/%2e%2e/secret.jpg",
                 "/images/..%2fsecret.jpg", "/images//etc/passwd", "/images/%2fetc%2fpasswd",
                 "/images/escape.jpg", "/images/up/secret.jpg", "/images/up/images/" + key.replace(".jpg", ".nope"),
                 "/images/no-such.jpg", "/images/%00.jpg", "/../../etc/passwd"):
        status, body, _ = _get(port, path)
        assert status == 404, path
        assert b"outside the image root" not in body and b"root:" not in body


def test_bad_requests_are_refused_and_the_server_keeps_serving(server):
    port = server["port"]
    for path, want in ((f"/api/search?q={'w5+' * 300}", 422), ("/api/search?q=w5&k=0", 422),
                       ("/api/search?q=w5&k=abc", 422), ("/api/search", 422),
                       ("/api/alignment?key=no-such.jpg&q=w5", 400), ("/api/search?q=+", 400),
                       ("/api/search?q=w5&shortlist=3&exhaustive=true", 400)):
        status, body, ctype = _get(port, path)
        assert status == want, (path, status, body[:200])
        assert ctype.startswith("application/json")
    status, body, _ = _get(port, "/api/search?q=w5+w6&k=3")
    assert status == 200 and len(json.loads(body)["results"]) == 3
    assert server["proc"].poll() is None


def test_every_refusal_has_one_json_shape_and_a_taken_port_is_one_line(server):
    port = server["port"]
    for path in ("/api/search?q=w5&k=0", "/api/search", "/api/alignment?key=no-such.jpg&q=w5",
                 "/no/such/route", "/images/no-such.jpg", "/api/search?q=w5&k=abc",
                 "/api/captions?key=x.jpg"):
        status, body, ctype = _get(port, path)
        assert 400 <= status < 500 and ctype.startswith("application/json"), (path, status)
        data = json.loads(body)
        assert set(data) == {"error"} and isinstance(data["error"], str) and data["error"], (path, data)
    assert "k" in json.loads(_get(port, "/api/search?q=w5&k=0")[1])["error"]
    # No caption set in this index: the page learns it from /api/info, the API says so.
    assert json.loads(_get(port, "/api/info")[1])["captions"] is False
    assert "no caption set indexed" in json.loads(_get(port, "/api/captions?key=x.jpg")[1])["error"]
    # A second server on the running one's port: one line, before the index is loaded.
    taken = subprocess.run([sys.executable, "-m", "teranprep", "serve", str(server["index"]),
                            "--port", str(port)], capture_output=True, text=True, timeout=120)
    assert taken.returncode == 2 and "Traceback" not in taken.stderr, taken.stderr
    errors = [line for line in taken.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--port {port}" in errors[0] and "pass another --port" in errors[0]
    assert "serving" not in taken.stdout


def test_image_urls_are_percent_encoded_and_decode_back_to_the_key():
    from urllib.parse import unquote
    from teranprep.web.app import image_href
    key = "dir with space/a#b?c%d é.jpg"
    href = image_href(key)
    assert href == "/images/dir%20with%20space/a%23b%3Fc%25d%20%C3%A9.jpg"
    assert unquote(href[len("/images/"):]) == key


def _chrome():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("chromium / chromium-driver not installed (apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium not installed (pip install selenium: the test extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1200,900"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def browser():
    """One headless chromium for the module's page tests (each loads its own page)."""
    chrome = _chrome()
    yield chrome
    chrome.quit()


def test_browser_types_a_query_and_sees_thumbnails_and_the_overlay(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(f"http://127.0.0.1:{server['port']}/")
    key, ids = split_captions(server["splits"])[0]
    words = " ".join(f"w{i}" for i in ids[1:-2])
    query = words + "."  # as in test_api_json_schema_and_answers
    box = browser.find_element(By.ID, "q")
    box.send_keys(query)
    browser.find_element(By.ID, "go").click()
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#results .result img")) == 10)
    # thumbnails really loaded from /images/
    wait.until(lambda b: all(b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im) == 100
                             for im in b.find_elements(By.CSS_SELECTOR, "#results .result img")))
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .result .label")]
    assert labels[0].startswith("1. ") and any(key in label for label in labels[:3])
    first = browser.find_elements(By.CSS_SELECTOR, "#results .result")[0]
    first_key = first.get_attribute("data-key")
    first.click()
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#stage svg rect.word-box")) == len(words.split()))
    rects = browser.find_elements(By.CSS_SELECTOR, "#stage svg rect.word-box")
    assert [r.get_attribute("data-word") for r in rects] == words.split()
    # the boxes are drawn where the API says, scaled to the shown image (100 px shown 480 px wide)
    status, body, _ = _get(server["port"], f"/api/alignment?key={first_key}&q={query.replace(' ', '+')}")
    boxes = [w["box"] for w in json.loads(body)["words"]]
    shown = browser.execute_script("return document.querySelector('#stage img').getBoundingClientRect().width")
    for rect, b in zip(rects, boxes):
        assert abs(float(rect.get_attribute("x")) - b[0] * shown / 100) < 0.5
        assert abs(float(rect.get_attribute("width")) - (b[2] - b[0]) * shown / 100) < 0.5
    assert browser.find_element(By.ID, "detail-title").text == first_key


def _api(port: int, path: str):
    status, body, _ = _get(port, path)
    return status, json.loads(body)


def _results(browser):
    """The result keys shown, read in one script (the page may replace the grid between calls)."""
    return browser.execute_script(
        "return [...document.querySelectorAll('#results .result')].map((e) => e.dataset.key)")


def test_browser_the_query_is_in_the_page_address(server, browser):
    """Loading an address with ?q= runs that search; a search typed in the page puts its query in
    the address, so a reload (or a shared link) shows the same results."""
    from urllib.parse import parse_qs, quote, urlsplit
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    port = server["port"]
    captions = split_captions(server["splits"])
    first = " ".join(f"w{i}" for i in captions[0][1][1:-2]) + "."
    other = " ".join(f"w{i}" for i in captions[7][1][1:-2]) + "."
    assert first != other
    wait = WebDriverWait(browser, 30)

    def want(query, k):
        status, data = _api(port, f"/api/search?q={quote(query)}&k={k}")
        assert status == 200, data
        return [r["key"] for r in data["results"]]
    browser.get(f"http://127.0.0.1:{port}/?q={quote(first)}&k=5")
    wait.until(lambda b: len(_results(b)) == 5)
    assert _results(browser) == want(first, 5)
    assert browser.find_element(By.ID, "q").get_attribute("value") == first
    assert browser.find_element(By.ID, "k").get_attribute("value") == "5"
    box, k = browser.find_element(By.ID, "q"), browser.find_element(By.ID, "k")
    box.clear()
    box.send_keys(other)
    k.clear()
    k.send_keys("3")
    browser.find_element(By.ID, "go").click()
    wait.until(lambda b: len(_results(b)) == 3)
    assert parse_qs(urlsplit(browser.current_url).query) == {"q": [other], "k": ["3"]}
    browser.refresh()  # the reloaded page runs the search in its address
    wait.until(lambda b: len(_results(b)) == 3)
    assert _results(browser) == want(other, 3)
    assert browser.find_element(By.ID, "q").get_attribute("value") == other


def test_browser_shows_the_api_errors_text(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    port = server["port"]
    for query in ("q=w5&k=0", "q=" + "w5+" * 300):  # k below 1; a query over the length limit
        status, data = _api(port, f"/api/search?{query}")
        assert status == 422 and data["error"], data
        browser.get(f"http://127.0.0.1:{port}/?{query}")
        WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "status").text.startswith("error"))
        assert browser.find_element(By.ID, "status").text == f"error: {data['error']}"
        assert _results(browser) == []


def _search_and_open_alignment(browser, port, query):
    """Loads the page with `query` in its address (k=5), waits for the 5 results and opens the
    first one's alignment view; returns (the WebDriverWait, the view's measured boxes)."""
    from urllib.parse import quote
    from selenium.webdriver.support.ui import WebDriverWait
    wait = WebDriverWait(browser, 30)
    browser.get(f"http://127.0.0.1:{port}/?q={quote(query)}&k=5")
    wait.until(lambda b: len(_results(b)) == 5)
    return wait, _alignment_view(browser, wait)


def _alignment_view(browser, wait):
    """The shown image's width, the word boxes and the word labels, as laid out by the browser:
    [left, top, right, bottom] in page pixels."""
    from selenium.webdriver.common.by import By
    first = browser.find_elements(By.CSS_SELECTOR, "#results .result")[0]
    first.click()
    wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#stage svg g.word-label"))
    return browser.execute_script("""
        const box = (e) => { const r = e.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
        const svg = document.querySelector('#stage svg');
        return {key: document.getElementById('detail-title').textContent,
                image: box(document.querySelector('#stage img')), svg: box(svg),
                boxes: [...svg.querySelectorAll('rect.word-box')].map(box),
                labels: [...svg.querySelectorAll('g.word-label')].map((g) => [g.dataset.word, box(g)])};""")


def test_browser_alignment_view_is_readable_and_its_labels_never_overlap(server, browser):
    """A 100 px image is shown 480 px wide; a query whose words outnumber the image's 3 regions
    puts several labels on one box, and the browser's own layout of them must not intersect."""
    from urllib.parse import quote
    port = server["port"]
    key, ids = split_captions(server["splits"])[0]
    words = [f"w{i}" for i in ids[1:-2]] * 3  # 9 words over 3 regions
    query = " ".join(words) + "."
    wait, view = _search_and_open_alignment(browser, port, query)
    left, top, right, bottom = view["image"]
    assert abs((right - left) - 480) < 0.5 and abs((bottom - top) - 480) < 0.5  # 100 x 100 scaled up
    status, align = _api(port, f"/api/alignment?key={quote(view['key'])}&q={quote(query)}")
    assert [w["word"] for w in align["words"]] == words == [w for w, _ in view["labels"]]
    boxes = [tuple(w["box"]) for w in align["words"]]
    assert len(set(boxes)) < len(boxes)  # labels that start at one corner: the layout must move them
    labels = [b for _, b in view["labels"]]
    for i, a in enumerate(labels):
        for j, b in enumerate(labels[:i]):
            overlap_x = min(a[2], b[2]) - max(a[0], b[0])
            overlap_y = min(a[3], b[3]) - max(a[1], b[1])
            assert overlap_x <= 0.01 or overlap_y <= 0.01, (words[i], a, words[j], b)
    svg = view["svg"]
    for label, word_box in zip(labels, view["boxes"]):
        assert svg[0] - 0.01 <= label[0] and label[2] <= svg[2] + 0.01  # inside the view's width
        assert label[1] >= word_box[1] - 1 and label[3] <= svg[3] + 0.01  # at or below its box's top, shown


def test_browser_large_image_is_shown_640_wide_with_its_indexed_captions(captioned_server, browser):
    from urllib.parse import quote
    from selenium.webdriver.common.by import By
    port = captioned_server["port"]
    assert _api(port, "/api/info")[1]["captions"] is True
    key, ids = split_captions(captioned_server["splits"])[0]
    query = " ".join(f"w{i}" for i in ids[1:-2]) + "."
    wait, view = _search_and_open_alignment(browser, port, query)
    left, top, right, bottom = view["image"]
    assert abs((right - left) - 640) < 0.5 and abs((bottom - top) - 640) < 0.5  # 1000 x 1000 scaled down
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#captions li")) == 5)
    status, ranked = _api(port, f"/api/captions?key={quote(view['key'])}&k=5")
    assert status == 200 and len(ranked["results"]) == 5
    shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#captions li")]
    assert shown == [f"{c['caption']} ({c['score']:.3f}{', its own' if c['image_key'] == view['key'] else ''})"
                     for c in ranked["results"]]
    assert any(c["image_key"] == view["key"] for c in ranked["results"])  # planted: its own captions rank high


def test_a_rebuilt_index_is_reloaded_and_a_removed_one_is_named(server):
    """Last in this module: it moves the served index away and back."""
    port, index = server["port"], server["index"]
    manifest = index / "manifest.json"
    data = manifest.read_bytes()
    replacement = index / "manifest.json.new"
    replacement.write_bytes(data)
    os.replace(replacement, manifest)  # what a rebuild does: a new file (inode) in place
    status, body, _ = _get(port, "/api/search?q=w5+w6&k=3")
    assert status == 200 and len(json.loads(body)["results"]) == 3  # reopened, still answering
    moved = index.with_name("index-moved")
    index.rename(moved)
    try:
        status, body, ctype = _get(port, "/api/search?q=w5+w6&k=3")
        assert 400 <= status < 500 and ctype.startswith("application/json")
        assert "index folder was removed" in json.loads(body)["error"]
    finally:
        moved.rename(index)
    assert _get(port, "/api/info")[0] == 200
    assert server["proc"].poll() is None
