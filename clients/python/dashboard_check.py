"""Drives the dashboard in a real browser (Debian's chromium, headless,
through playwright): the overview lists the cluster and a saga that just
ran; its page shows the timeline; a stuck branch is retried through the
page (confirm dialog accepted) and the page shows the saga finish. Writes
a screenshot of each page. Used by coordinator/tests/dashboard.rs:

  python3 clients/python/dashboard_check.py --url http://HOST:PORT \
      --done GID --stuck GID --branch BRANCH --shots DIR
"""

import argparse
import json
import os
import sys

from playwright.sync_api import expect, sync_playwright


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--done", required=True)
    ap.add_argument("--stuck", required=True)
    ap.add_argument("--branch", required=True)
    ap.add_argument("--heuristic", required=True)
    ap.add_argument("--shots", required=True)
    ap.add_argument("--chromium", default=os.environ.get("CHROMIUM", "/usr/bin/chromium"))
    args = ap.parse_args()
    os.makedirs(args.shots, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        # The overview: members, and the saga that ran.
        page.goto(f"{args.url}/ui")
        expect(page.locator("#members")).to_contain_text("leader")
        expect(page.locator("#transactions")).to_contain_text(args.done)
        page.screenshot(path=f"{args.shots}/dashboard-overview.png", full_page=True)
        # Its timeline.
        page.get_by_role("link", name=args.done, exact=True).click()
        expect(page.locator("#title")).to_contain_text("committed")
        expect(page.locator(".timeline")).to_contain_text("decided commit")
        page.screenshot(path=f"{args.shots}/dashboard-saga.png", full_page=True)
        # The stuck one, found by gid; retried through the page.
        page.goto(f"{args.url}/ui")
        page.fill("input[name=gid]", args.stuck)
        page.get_by_role("button", name="open").click()
        expect(page.locator("#title")).to_contain_text("active")
        page.screenshot(path=f"{args.shots}/dashboard-stuck.png", full_page=True)
        page.on("dialog", lambda dialog: dialog.accept())
        page.locator(f"button.retry[data-branch='{args.branch}']").click()
        expect(page.locator("#result")).to_contain_text("retry: done")
        expect(page.locator("#title")).to_contain_text("committed", timeout=15000)
        expect(page.locator(".timeline")).to_contain_text("repair retry")
        page.screenshot(path=f"{args.shots}/dashboard-retried.png", full_page=True)
        # A transaction resolved by hand: the heuristic is shown, never silent.
        page.goto(f"{args.url}/ui?state=aborted")
        row = page.locator("#transactions tr", has_text=args.heuristic)
        expect(row).to_contain_text("heuristic")
        row.get_by_role("link").click()
        expect(page.locator("#title")).to_contain_text("heuristic")
        expect(page.locator("#branches")).to_contain_text("resolved")
        expect(page.locator(".timeline")).to_contain_text("stock db dropped")
        page.screenshot(path=f"{args.shots}/dashboard-heuristic.png", full_page=True)
        # A gid that does not exist: a page that says so.
        page.goto(f"{args.url}/ui/tx/no-such-gid")
        expect(page.locator("main")).to_contain_text("not found")
        browser.close()
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
