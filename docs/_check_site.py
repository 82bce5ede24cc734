"""Check the built documentation site as a reader would, in headless Chromium.

Serves the built site (``mkdocs build --strict`` writes it to ``site/``) on localhost, opens
the home page, a tutorial page and an API page in Debian's Chromium through its chromedriver
(Selenium), and checks that each loads without console errors and shows its title and code
blocks; then searches for a public name as a reader would. Saves a screenshot of each page in
the output folder (``site-check/``, a build artefact). Also checks, in the site's files, that
every public name (each module's ``__all__``) is in the API reference's inventory and in the
search index.

Usage: ``python docs/_check_site.py [SITE] [OUT]`` (defaults ``site`` and ``site-check``).
Exits non-zero, naming each failed check, if any fails. ``python docs/_check_site.py
--self-test [SITE] [OUT]`` checks the checks: it plants faults in a copy of the site (console
errors during and after load, a name's entry gone from the search index) and fails unless each
is reported.
"""

from __future__ import annotations

import functools
import http.server
import importlib
import json
import pathlib
import pkgutil
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mkdocstrings import Inventory
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import diffprog

# (screenshot name, path in the site, words the page's title must contain)
PAGES = [
    ("home", "", "diffprog"),
    ("tutorial", "tutorial/01-tensors/", "diffprog"),
    ("api", "api/nn/", "diffprog.nn"),
]
# How long a loaded page is left to log late errors (timers, fetches) before its log is read.
SETTLE_S = 1.0
# What Material's search box says until its index is loaded.
SEARCH_LOADING = "Initializing search"
# A name a reader looks up, and the page its entry is on.
SEARCH = ("flatten_parameters", "api/diffprog/")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve(site: pathlib.Path) -> Iterator[str]:
    """Serve ``site`` on a free localhost port for the duration; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _executable(*names: str) -> str:
    for name in names:
        found = shutil.which(name)
        if found is not None:
            return found
    raise SystemExit(
        f"none of {', '.join(names)} found: install Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver)"
    )


def browser() -> webdriver.Chrome:
    """Headless Debian Chromium through its own chromedriver, browser console logs kept."""
    options = webdriver.ChromeOptions()
    options.binary_location = _executable("chromium", "chromium-browser")
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: Selenium does not look for (or download) a driver itself.
    service = Service(executable_path=_executable("chromedriver"))
    return webdriver.Chrome(options=options, service=service)


def check_page(
    driver: webdriver.Chrome, url: str, title: str, screenshot: pathlib.Path
) -> list[str]:
    """Open ``url``; the problems found (console errors, no title, no code block)."""
    driver.get(url)
    problems = settle(driver)
    if title not in driver.title:
        problems.append(f"{url}: the title is {driver.title!r}, expected it to contain {title!r}")
    headings = [h.text.strip() for h in driver.find_elements(By.CSS_SELECTOR, "article h1")]
    if not any(headings):
        problems.append(f"{url}: no visible h1 heading in the article")
    elif headings[0].rstrip("¶") not in driver.title:
        problems.append(f"{url}: the title {driver.title!r} does not name the page {headings[0]!r}")
    blocks = driver.find_elements(By.CSS_SELECTOR, "article .highlight pre code")
    if not any(block.is_displayed() for block in blocks):
        problems.append(f"{url}: no visible code block")
    copy_buttons = driver.find_elements(By.CSS_SELECTOR, ".md-code__button, .md-clipboard")
    if blocks and not copy_buttons:
        problems.append(f"{url}: code blocks without a copy button")
    driver.save_screenshot(str(screenshot))
    settle(driver)  # what the page logs late (a timer, a fetch) is still this page's
    return problems + [f"{url}: console error: {error}" for error in console_errors(driver)]


def check_search(driver: webdriver.Chrome, base: str) -> list[str]:
    """Type a public name in the search box; its API entry must be among the results."""
    name, page = SEARCH
    driver.get(base)
    settle(driver)  # the home page's problems and console errors are check_page's
    console_errors(driver)
    driver.execute_script("document.getElementById('__search').checked = true")  # open search
    box = driver.find_element(By.CSS_SELECTOR, "input.md-search__input")
    box.send_keys(name)
    try:
        WebDriverWait(driver, 20).until(lambda d: any(page in href for href in result_links(d)))
    except TimeoutException:
        found = result_links(driver)
        problems = [f"search for {name!r}: no result on {page}; results: {found[:5]}"]
    else:
        problems = []
    settle(driver)
    return problems + [f"search page: console error: {error}" for error in console_errors(driver)]


def result_links(driver: webdriver.Chrome) -> list[str]:
    """The search results' links, read in one script: the results are re-rendered as the
    query is typed, so elements found first and read after can be gone (stale)."""
    links = driver.execute_script(
        "return Array.from(document.querySelectorAll('.md-search-result__link'), a => a.href)"
    )
    return [str(link) for link in links or []]


def settle(driver: webdriver.Chrome) -> list[str]:
    """Wait until the page has settled: loaded, its search ready (Material's last step on a
    page: its worker fetched the index, and the search box's "Initializing search" gave way),
    then ``SETTLE_S`` more for late timers and fetches, so that the console log read next holds
    what the page logs after its load event. The problem found: the search never got ready."""
    try:
        WebDriverWait(driver, 20).until(
            lambda d: d.execute_script(
                "const meta = document.querySelector('.md-search-result__meta');"
                "return document.readyState === 'complete' && meta !== null"
                f" && meta.textContent.trim() !== {SEARCH_LOADING!r}"
            )
        )
        problems = []
    except TimeoutException:
        problems = [f"{driver.current_url}: the search was not ready after 20 s"]
    time.sleep(SETTLE_S)
    return problems


def console_errors(driver: webdriver.Chrome) -> list[str]:
    """The errors logged to the browser's console since the last call (it empties the log)."""
    entries = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [str(entry["message"]) for entry in entries if entry["level"] == "SEVERE"]


def public_names() -> dict[str, object]:
    """Every public name, ``module.name``, of diffprog and its public modules (subpackages and
    plain modules alike)."""
    modules = ["diffprog"] + [
        f"diffprog.{m.name}"
        for m in pkgutil.iter_modules(diffprog.__path__)
        if not m.name.startswith("_") and m.name != "examples"
    ]
    names = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            names[f"{module_name}.{name}"] = getattr(module, name)
    return names


def check_reference(site: pathlib.Path) -> list[str]:
    """Every public name has an entry in the inventory, and that entry (its anchor, not only its
    page) is in the search index."""
    with (site / "objects.inv").open("rb") as f:
        inventory = Inventory.parse_sphinx(f)
    index = json.loads((site / "search" / "search_index.json").read_text())
    api_locations = {doc["location"] for doc in index["docs"] if doc["location"].startswith("api/")}
    problems = []
    for path, obj in public_names().items():
        item = inventory.get(path)
        if item is None:
            # A re-export (dp.save_params) may be entered only where it is documented.
            short = path.rsplit(".", 1)[-1]
            item = next(
                (
                    it
                    for name, it in inventory.items()
                    if name.rsplit(".", 1)[-1] == short and _lookup(name) is obj
                ),
                None,
            )
        if item is None:
            problems.append(f"{path}: not in the API reference's inventory (objects.inv)")
            continue
        anchor = item.uri.replace("#$", f"#{item.name}")
        if anchor not in api_locations:
            problems.append(f"{path}: its entry {anchor} is not in the search index")
    return problems


def _lookup(path: str) -> object:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


def check_site(site: pathlib.Path, out: pathlib.Path) -> list[str]:
    """Every check on the built ``site``; the problems found (screenshots go to ``out``)."""
    problems = check_reference(site)
    with serve(site) as base:
        driver = browser()
        try:
            for shot, path, title in PAGES:
                problems += check_page(driver, base + path, title, out / f"{shot}.png")
            problems += check_search(driver, base)
        finally:
            driver.quit()
    return problems


# The faults ``--self-test`` plants in a copy of the site, and a word each one's report has.
PLANTED = {
    "an error thrown while the home page loads": "SYNC-ERROR",
    "an error thrown 300 ms after a tutorial page loaded": "LATE-ERROR",
    f"{SEARCH[0]}'s entry gone from the search index (its page's entry kept)": (
        f"diffprog.{SEARCH[0]}: its entry"
    ),
}


def self_test(site: pathlib.Path, out: pathlib.Path) -> list[str]:
    """Plant ``PLANTED``'s faults in a copy of ``site`` and check it: the faults the checks
    miss (each check must be able to fail)."""
    copy = out / "self-test-site"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(site, copy)
    _append_script(copy / "index.html", "throw new Error('SYNC-ERROR during load')")
    _append_script(
        copy / PAGES[1][1] / "index.html",
        "setTimeout(() => { throw new Error('LATE-ERROR after load') }, 300)",
    )
    index_path = copy / "search" / "search_index.json"
    index = json.loads(index_path.read_text())
    index["docs"] = [d for d in index["docs"] if not d["location"].endswith(f".{SEARCH[0]}")]
    index_path.write_text(json.dumps(index))
    problems = check_site(copy, out / "self-test")
    shutil.rmtree(copy)
    return [
        f"self-test: {fault} was not reported"
        for fault, word in PLANTED.items()
        if not any(word in problem for problem in problems)
    ]


def _append_script(page: pathlib.Path, script: str) -> None:
    html = page.read_text()
    assert "</body>" in html, f"{page}: no </body>"
    page.write_text(html.replace("</body>", f"<script>{script}</script></body>", 1))


def main(argv: list[str]) -> int:
    """Run every check; print each problem; 0 when there is none. With ``--self-test`` first,
    check instead that the checks catch faults planted in a copy of the site."""
    planted = argv[:1] == ["--self-test"]
    argv = argv[1:] if planted else argv
    site = pathlib.Path(argv[0] if argv else "site")
    out = pathlib.Path(argv[1] if len(argv) > 1 else "site-check")
    if not (site / "index.html").exists():
        print(f"{site}/index.html not found: build the site first (mkdocs build --strict)")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    if planted:
        problems = self_test(site, out)
        for problem in problems:
            print("FAILED:", problem)
        print(
            f"site check self-test: {len(PLANTED) - len(problems)} of {len(PLANTED)} faults caught"
        )
        return 1 if problems else 0
    problems = check_site(site, out)
    for problem in problems:
        print("FAILED:", problem)
    shots = ", ".join(f"{out / shot}.png" for shot, _, _ in PAGES)
    print(f"site check: {len(problems)} problem(s); screenshots: {shots}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
