"""Screenshots of the page of `cartridges serve` (docs/img/registry.png, docs/img/compare.png): the real
server on a registry, on 127.0.0.1 and a free port, driven by Debian's Chromium headless (Playwright).

    python docs/screenshots.py --registry /tmp/page-shots/registry --show sky@1 \
        --compare sky@1 --compare sky-select@1 --compare default --message "Who owns Sky?"

Needs `make browser` (Chromium) and `make setup` (Playwright comes with the test extra).
"""

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import expect, sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(registry: str, port: int, max_tokens: int) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "cartridges"), "serve", "--registry", registry, "--port", str(port)]
    server = subprocess.Popen([*command, "--max-tokens", str(max_tokens)])
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", required=True)
    parser.add_argument("--show", required=True, help="the version whose card the registry shot shows")
    parser.add_argument("--compare", action="append", required=True, help="a choice (2-4), e.g. legal@2 or default")
    parser.add_argument("--message", required=True)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "img")
    parser.add_argument("--chromium", default=os.environ.get("CARTRIDGES_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()
    if not 2 <= len(args.compare) <= 4:
        parser.error("--compare takes two to four choices")
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_server(args.registry, port, args.max_tokens)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.set_default_timeout(600_000)
            expect.set_options(timeout=600_000)
            page.goto(f"http://127.0.0.1:{port}/#registry/{args.show}")
            expect(page.locator("#registry-detail h2")).to_have_text(args.show)
            page.get_by_role("button", name="Verify").click()
            expect(page.locator(".verify-status")).not_to_have_text("checking…")
            page.screenshot(path=str(args.out / "registry.png"), full_page=True)

            page.get_by_role("link", name="Compare").click()
            while page.locator("#compare-columns .column").count() < len(args.compare):
                page.get_by_role("button", name="Add a choice").click()
            columns = page.locator("#compare-columns .column")
            for index, choice in enumerate(args.compare):
                columns.nth(index).locator(".compare-model").fill(choice)
            page.locator("#compare-max-tokens").fill(str(args.max_tokens))
            page.locator("#compare-message").fill(args.message)
            page.get_by_role("button", name="Send to all").click()
            for index in range(len(args.compare)):
                expect(columns.nth(index)).to_have_attribute("data-done", "true")
            page.screenshot(path=str(args.out / "compare.png"), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"wrote {args.out / 'registry.png'} and {args.out / 'compare.png'}")


if __name__ == "__main__":
    main()
