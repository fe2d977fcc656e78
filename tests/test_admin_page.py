"""examples/html/admin.html in a real headless Chromium, served from another origin than gogpt:
minting a token with a policy, what the budgets of the tokens minted there have left (from
/me), usage per identity as a chart and a table, revoking.

The whole page, after minting and charting, is saved to tests/artifacts/admin-page.png for a
person to look at.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import aiohttp
import jwt
from browser_pages import OpenPage
from conftest import SECRET_KEY, FakeUpstream
from fake_chat import CHAT, OpenAIChat, today
from playwright.async_api import Page, expect

from gogpt import mint_token

ARTIFACTS = Path(__file__).parent / "artifacts"


def save_screenshot_path(name: str) -> Path:
    """A stable path a person can open after the run (tmp_path is gone by then)."""
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    print(f"screenshot: {path}")
    return path


async def mint_in_page(page: Page, identity: str, **fields: str) -> str:
    """Fill the mint form (`hours`, `models`, `budget`, `period`, `rpm`), mint, and read the token shown."""
    await page.fill("#mint-id", identity)
    for name in ("hours", "models", "budget", "rpm"):
        await page.fill(f"#mint-{name}", fields.get(name, "1" if name == "hours" else ""))
    await page.select_option("#mint-period", fields.get("period", ""))
    await page.click("#mint")
    await expect(page.locator("#mint-status")).to_contain_text(f"Minted a token for {identity}")
    return await page.input_value("#minted-token")


async def chat(gateway: str, token: str) -> tuple[int, dict]:
    """One /chat call with a token, as any client of gogpt makes it."""
    async with aiohttp.ClientSession() as session:
        headers = {"Authorization": f"Bearer {token}"}
        async with session.post(f"{gateway}/chat", json=CHAT, headers=headers) as response:
            return response.status, await response.json()


async def me(gateway: str, token: str) -> tuple[int, dict]:
    """What GET /me answers the token's holder."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session, session.get(f"{gateway}/me", headers=headers) as response:
        return response.status, await response.json()


def tid_of(token: str) -> str:
    tid: str = jwt.decode(token, SECRET_KEY, algorithms=["HS256"])["tid"]
    return tid


async def open_admin_page(open_page: OpenPage) -> Page:
    page = await open_page("admin.html")
    await page.fill("#admin-key", SECRET_KEY)
    return page


async def test_admin_page_mints_a_token_with_the_policy_it_shows_and_the_token_works(
    open_page: OpenPage,
    gateway_url: str,
    upstream: FakeUpstream,
) -> None:
    upstream.respond = OpenAIChat()
    page = await open_admin_page(open_page)
    token = await mint_in_page(
        page, "alice", hours="24", models="gpt-4o-mini, gpt-4o*", budget="50000", period="day", rpm="60"
    )
    claims = jwt.decode(token, SECRET_KEY, algorithms=["HS256"])
    assert (claims["models"], claims["budget"], claims["period"], claims["rpm"]) == (
        ["gpt-4o-mini", "gpt-4o*"],
        50_000,
        "day",
        60,
    )
    assert 24 * 3600 - 1 <= claims["exp"] - claims["iat"] <= 24 * 3600
    expires = datetime.datetime.fromtimestamp(claims["exp"], datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    await expect(page.locator("#minted-policy dd")).to_have_text(
        ["alice", claims["tid"], expires, "gpt-4o-mini, gpt-4o*", "50,000 tokens per day", "60"]
    )
    status, answer = await chat(gateway_url, token)
    assert status == 200, answer
    assert upstream.requests  # the token got the call through to the upstream


async def test_admin_page_mints_a_token_without_a_policy_when_the_policy_fields_are_empty(
    open_page: OpenPage,
) -> None:
    page = await open_admin_page(open_page)
    token = await mint_in_page(page, "kiosk")
    await expect(page.locator("#minted-policy dd").nth(3)).to_have_text("any")
    await expect(page.locator("#minted-policy dd").nth(4)).to_have_text("unlimited")
    claims = jwt.decode(token, SECRET_KEY, algorithms=["HS256"])
    assert not {"models", "budget", "period", "rpm"} & claims.keys()


async def test_admin_page_shows_what_a_minted_tokens_budget_has_left_as_me_reports_it_and_its_revocation(
    open_page: OpenPage,
    gateway_url: str,
    upstream: FakeUpstream,
) -> None:
    upstream.respond = OpenAIChat()  # 9 prompt + 3 completion tokens per call
    page = await open_admin_page(open_page)
    carol = await mint_in_page(page, "carol", hours="24", models="gpt-4o-mini", budget="50000")
    kiosk = await mint_in_page(page, "kiosk")
    rows = page.locator("#budgets tbody tr")
    await expect(rows).to_have_text(
        [
            f"carol {tid_of(carol)[:8]}… gpt-4o-mini 50,000 tokens per month 0 50,000",
            f"kiosk {tid_of(kiosk)[:8]}… any unlimited \u2013 unlimited",  # no budget: nothing counted,
        ],
        use_inner_text=True,
    )
    carol_row = rows.filter(has_text="carol")

    assert (await chat(gateway_url, carol))[0] == 200
    await page.click("#refresh-budgets")
    assert await me(gateway_url, carol) == (
        200,
        {
            "id": "carol",
            "expires_at": jwt.decode(carol, SECRET_KEY, algorithms=["HS256"])["exp"],
            "models": ["gpt-4o-mini"],
            "budget": 50_000,
            "period": "month",
            "used": 12,
            "remaining": 49_988,
            "rpm": None,
        },
    )
    await expect(carol_row.locator(".used")).to_have_text("12")
    await expect(carol_row.locator(".remaining")).to_have_text("49,988")
    assert await carol_row.locator("meter").evaluate("bar => [bar.max, bar.value]") == [50_000, 49_988]

    assert (await chat(gateway_url, carol))[0] == 200
    await page.click("#show-usage")  # refreshes the budgets too
    await expect(carol_row.locator(".used")).to_have_text("24")
    await expect(carol_row.locator(".remaining")).to_have_text("49,976")
    await expect(page.locator("#budgets-status")).to_have_text("Asked GET /me with 2 tokens.")

    await page.get_by_role("button", name="Revoke carol").click()
    await expect(page.locator("#usage-status")).to_contain_text("Revoked carol")
    status, answer = await me(gateway_url, carol)
    assert (status, answer["error"]["message"]) == (401, "The token has been revoked.")
    await expect(carol_row.locator("td.refused")).to_have_text("The token has been revoked.")
    await page.click("#refresh-budgets")
    await expect(page.locator("#budgets-status")).to_have_text("Asked GET /me with 2 tokens: 1 refused.")
    await expect(carol_row.locator("td.refused")).to_have_text("The token has been revoked.")
    await expect(rows.filter(has_text="kiosk").locator(".remaining")).to_have_text("unlimited")

    # The tokens are kept in the page's memory only: not in storage, nor shown in the table.
    assert await page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]") == [0, 0, ""]
    table = await page.locator("#budgets").inner_html()
    assert carol not in table and kiosk not in table


async def token_refusal(gateway: str, **fields: object) -> str:
    """The message /token itself answers a body with."""
    async with aiohttp.ClientSession() as session:
        body = {"id": "alice", "hour": 1, "key": SECRET_KEY, **fields}
        async with session.post(f"{gateway}/token", json=body) as response:
            assert response.status == 400
            message: str = (await response.json())["error"]["message"]
            return message


async def test_admin_page_shows_why_a_policy_field_is_wrong(open_page: OpenPage, gateway_url: str) -> None:
    page = await open_admin_page(open_page)
    await page.fill("#mint-id", "alice")
    await page.fill("#mint-models", "*")
    await page.click("#mint")
    await expect(page.locator("#mint-status")).to_have_text(await token_refusal(gateway_url, models="*"))
    await expect(page.locator("#mint-status")).to_have_class("status error")
    await page.fill("#mint-models", "")
    await page.fill("#mint-budget", "0")
    await page.click("#mint")
    await expect(page.locator("#mint-status")).to_have_text(await token_refusal(gateway_url, budget=0))
    await expect(page.locator("#mint-status")).to_contain_text("budget")
    await expect(page.locator("#minted")).to_be_hidden()


async def test_admin_page_says_the_admin_key_was_refused_and_keeps_it_nowhere(
    open_page: OpenPage,
) -> None:
    page = await open_page("admin.html")
    wrong_key = SECRET_KEY[::-1]
    await page.fill("#admin-key", wrong_key)
    await page.click("#show-usage")
    await expect(page.locator("#usage-status")).to_have_text("The admin key was refused: Invalid token.")
    await page.fill("#admin-key", SECRET_KEY)
    await page.click("#show-usage")
    await expect(page.locator("#usage-status")).to_have_text("No usage in this period.")
    stored = await page.evaluate("[localStorage.length, sessionStorage.length, document.cookie]")
    assert stored == [0, 0, ""]
    assert await page.context.cookies() == []
    assert SECRET_KEY not in page.url and wrong_key not in page.url
    html = await page.content()
    assert SECRET_KEY not in html and wrong_key not in html


async def test_admin_page_charts_and_lists_the_tokens_each_identity_used(
    open_page: OpenPage,
    gateway_url: str,
    upstream: FakeUpstream,
) -> None:
    upstream.respond = OpenAIChat()  # 9 prompt + 3 completion tokens per call
    page = await open_admin_page(open_page)
    alice = mint_token(SECRET_KEY, "alice", 1)
    bob = await mint_in_page(page, "bob", hours="24", models="gpt-4o-mini", budget="50000")
    for token in (bob, bob, alice):
        assert (await chat(gateway_url, token))[0] == 200

    await page.click("#show-usage")
    await expect(page.locator("#usage-status")).to_have_text(
        "2 identities, 2 rows (by identity, day and model)."
    )
    bars = page.locator("#chart .bar")
    await expect(bars).to_have_count(2)
    await expect(bars.locator(".label")).to_have_text(["bob", "alice"])  # most tokens first
    await expect(bars.locator(".value")).to_have_text(["24", "12"])
    widths = [float(await bar.get_attribute("width") or "0") for bar in await bars.locator(".prompt").all()]
    assert widths[0] == 2 * widths[1] > 0  # bob used twice alice's prompt tokens
    await expect(page.locator("#usage tbody tr")).to_have_text(
        [f"alice Revoke {today()} gpt-4o-mini 1 9 3 0", f"bob Revoke {today()} gpt-4o-mini 2 18 6 0"],
        use_inner_text=True,
    )
    await expect(page.locator("#budgets tbody tr .used")).to_have_text("24")  # bob's two calls
    await page.screenshot(path=save_screenshot_path("admin-page.png"), full_page=True)

    tomorrow = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=1)).strftime("%Y-%m-%d")
    await page.fill("#since", tomorrow)
    await page.click("#show-usage")
    await expect(page.locator("#usage-status")).to_have_text("No usage in this period.")
    await expect(bars).to_have_count(0)
    await expect(page.locator("#usage")).to_be_hidden()


async def test_admin_page_shows_ids_as_text_never_as_markup(
    open_page: OpenPage,
    gateway_url: str,
    upstream: FakeUpstream,
) -> None:
    upstream.respond = OpenAIChat()
    identity = '<img src=x onerror="document.title=1">eve'
    assert (await chat(gateway_url, mint_token(SECRET_KEY, identity, 1)))[0] == 200
    page = await open_admin_page(open_page)
    await page.click("#show-usage")
    await expect(page.locator("#chart .bar .label")).to_have_text(identity[:21] + "…")
    await expect(page.locator("#usage td.identity span")).to_have_text(identity)
    await mint_in_page(page, identity)
    await expect(page.locator("#budgets tbody td").first).to_have_text(identity)
    assert await page.locator("img").count() == 0
    assert await page.title() == "gogpt admin"


async def test_admin_page_revokes_an_identity_with_one_click_and_its_token_is_refused(
    open_page: OpenPage,
    gateway_url: str,
    upstream: FakeUpstream,
) -> None:
    upstream.respond = OpenAIChat()
    page = await open_admin_page(open_page)
    alice = mint_token(SECRET_KEY, "alice", 1)
    bob = await mint_in_page(page, "bob", hours="24", models="gpt-4o-mini", budget="50000")
    for token in (alice, bob):
        assert (await chat(gateway_url, token))[0] == 200
    await page.click("#show-usage")
    await expect(page.locator("#chart .bar")).to_have_count(2)

    await page.get_by_role("button", name="Revoke bob").click()
    await expect(page.locator("#usage-status")).to_have_text(
        "Revoked bob: its tokens minted before now are refused."
    )
    await expect(page.locator("#revoked li")).to_have_count(1)
    await expect(page.locator("#revoked li")).to_contain_text(re.compile(r"^bob: every token minted before "))
    await expect(page.locator("#budgets td.refused")).to_have_text("The token has been revoked.")
    await page.screenshot(path=save_screenshot_path("admin-page-revoked.png"), full_page=True)
    status, answer = await chat(gateway_url, bob)
    assert (status, answer["error"]["message"]) == (401, "The token has been revoked.")
    assert (await chat(gateway_url, alice))[0] == 200
    assert (await chat(gateway_url, mint_token(SECRET_KEY, "bob", 1)))[0] == 200  # minted afterwards

    await page.click("#show-revoked")
    await expect(page.locator("#revoke-status")).to_have_text("1 revocations in force.")
