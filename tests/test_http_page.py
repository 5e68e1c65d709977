"""The search page at ``/`` in a real headless Chromium (Debian's /usr/bin/chromium, driven by
Playwright's Python package; Playwright downloads nothing). Document text is untrusted: a
document that is an HTML/JS payload must show as its literal text and run nothing."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from daemon import ServerThread
from httpd import TOKEN, start_http_daemon

from edge_agent.models import ModelStore

CHROMIUM = Path("/usr/bin/chromium")
SCRIPT = "<script>window.__pwned = 'script'</script>"
IMAGE = "<img src=x onerror=\"window.__pwned = 'img'\">"
DOCS = [
    {"id": "xss-script", "text": SCRIPT, "metadata": {"note": "<b>bold?</b>"}},
    {"id": "xss-img", "text": IMAGE + " about bread", "metadata": {"lang": "en"}},
    {"id": "bread", "text": "Bake bread at 220 degrees for one hour.", "metadata": {"lang": "en"}},
    {"id": "router", "text": "Hold the router's power button for ten seconds to restart it."},
]
ARGS = [
    "--headless",
    "--no-sandbox",  # the suite runs as root in CI; Chromium refuses its sandbox there
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="/usr/bin/chromium is missing: .ci/system-deps installs it (Debian package chromium)",
)


@pytest.fixture(scope="module")
def served(
    model_store: ModelStore, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerThread, str]]:
    thread, base = start_http_daemon(
        model_store, tmp_path_factory.mktemp("page"), auth_token=TOKEN
    )
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        added = http.post("/v1/collections/untrusted/documents", json={"documents": DOCS})
        assert added.status_code == 200, added.text
        assert http.post("/v1/collections/plain/documents", json={"documents": DOCS[2:]}).is_success
    yield thread, base
    thread.stop()


@pytest.fixture
def page(tmp_path: Path) -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    profile = tmp_path / "chromium-profile"  # a fresh --user-data-dir
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=ARGS,
            chromium_sandbox=False,
        )
        try:
            yield context.new_page()
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)


def _search(page: object, collection: str, query: str) -> list[dict[str, str]]:
    page.select_option("#collection", collection)  # type: ignore[attr-defined]
    page.fill("#query", query)  # type: ignore[attr-defined]
    done = int(page.get_attribute("body", "data-searches") or 0)  # type: ignore[attr-defined]
    page.click("#go")  # type: ignore[attr-defined]
    # Wait for this search to finish: the previous one's hits are still on the page until then.
    page.wait_for_selector(f"body[data-searches='{done + 1}']")  # type: ignore[attr-defined]
    page.wait_for_selector("#hits li")  # type: ignore[attr-defined]
    return page.eval_on_selector_all(  # type: ignore[attr-defined]
        "#hits li",
        """items => items.map(li => ({
            id: li.querySelector('.hit-id').textContent,
            text: li.querySelector('.hit-text').textContent,
            score: li.querySelector('.hit-score').textContent,
            meta: (li.querySelector('.hit-meta') || {textContent: ''}).textContent,
        }))""",
    )


def test_search_page_shows_hostile_text_as_text(
    served: tuple[ServerThread, str], page: object
) -> None:
    base = served[1]
    dialogs: list[str] = []
    errors: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))  # type: ignore[attr-defined]
    page.on("pageerror", lambda e: errors.append(str(e)))  # type: ignore[attr-defined]
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))  # type: ignore[attr-defined]
    page.goto(base + "/")  # type: ignore[attr-defined]
    page.wait_for_selector("body[data-ready='1']")  # type: ignore[attr-defined]
    # The listener has a token: the page says so and asks for it.
    assert page.is_visible("#token-form")  # type: ignore[attr-defined]
    assert "token" in page.text_content("#error")  # type: ignore[attr-defined]
    page.fill("#token", TOKEN)  # type: ignore[attr-defined]
    page.click("#token-form button")  # type: ignore[attr-defined]
    # (wait_for_selector, not wait_for_function: the page's CSP forbids the eval the latter
    # needs whenever its condition is not already true at the first poll)
    page.wait_for_selector(  # type: ignore[attr-defined]
        "#collection option:nth-of-type(2)", state="attached"
    )
    options = page.eval_on_selector_all(  # type: ignore[attr-defined]
        "#collection option", "os => os.map(o => o.value)"
    )
    assert sorted(options) == ["plain", "untrusted"]

    hits = _search(page, "untrusted", "script img bread")
    by_id = {hit["id"]: hit for hit in hits}
    assert by_id["xss-script"]["text"] == SCRIPT
    assert by_id["xss-img"]["text"] == IMAGE + " about bread"
    assert "<b>bold?</b>" in by_id["xss-script"]["meta"]
    assert all(hit["score"].startswith("score ") for hit in hits)
    # Nothing from the documents became markup, and nothing ran.
    injected = page.evaluate(  # type: ignore[attr-defined]
        "document.querySelectorAll('#hits script, #hits img, #hits b').length"
    )
    assert injected == 0
    page.wait_for_timeout(300)  # type: ignore[attr-defined]  # an onerror would fire by now
    assert page.evaluate("window.__pwned === undefined")  # type: ignore[attr-defined]
    assert dialogs == [] and errors == []

    # Ranked: a question about the router finds the router first.
    hits = _search(page, "plain", "how do I restart my router?")
    assert hits[0]["id"] == "router"
    # No request left the daemon: no external assets.
    assert requests and all(url.startswith(base) for url in requests), requests


def test_page_assets_are_self_contained(served: tuple[ServerThread, str]) -> None:
    base = served[1]
    page = httpx.get(base + "/")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'none'" in csp
    assert "http://" not in page.text.replace(base, "") and "https://" not in page.text
    for asset in ("/ui/page.js", "/ui/page.css"):
        body = httpx.get(base + asset).text
        assert "http://" not in body and "https://" not in body
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"):
            assert sink not in body  # document data reaches the page through textContent only
