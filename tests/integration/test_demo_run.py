"""`tabiji demo`: the demo provider, the demo upstream and the gateway start on loopback, a demo
user signs in through the whole chain (httpx and Chromium), and SIGTERM stops every process.

The demo runs as `python -m gateway.cli demo` in a subprocess on free ports, as a person runs it.
Also here: the demo policies' own cases, the generated config, and the demo upstream's check of
X-Tabiji-Assertion (gateway/demo/upstream.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.cli import main as tabiji
from gateway.demo.run import DEMO_POLICIES, prepare
from gateway.demo.upstream import AssertionVerifier
from gateway.demo.upstream import build_app as build_upstream
from gateway.settings import load_settings
from policies.cli import main as tabiji_policy

from .conftest import REPO, START_TIMEOUT, free_port

STOP_TIMEOUT = 20.0


def test_the_demo_policies_pass_their_own_cases() -> None:
    """`tabiji-policy test gateway/demo/policies` passes (staff all, auditors read, others none)."""
    out = io.StringIO()
    assert tabiji_policy(["test", str(DEMO_POLICIES)], out=out) == 0, out.getvalue()
    assert "0 failed" in out.getvalue()


def test_the_generated_demo_config_is_valid(tmp_path: Path) -> None:
    """The config `tabiji demo` writes passes check-config, with its client secret kept 0600."""
    config = prepare(tmp_path, 18080, 19001, 19000)
    assert stat.S_IMODE((tmp_path / "demo-client.secret").stat().st_mode) == 0o600
    settings = load_settings(config)
    provider = settings.identity.providers[0]
    assert provider.issuer == "http://127.0.0.1:19000"
    assert provider.client_secret_file == tmp_path / "demo-client.secret"
    assert settings.identity.session.store == f"sqlite:///{tmp_path}/state.db"
    assert settings.audit.store == f"sqlite:///{tmp_path}/audit.db"
    assert settings.policies is not None
    assert settings.policies.dir == tmp_path / "policies"
    assert tabiji(["check-config", str(config)]) == 0


# -- the running demo --------------------------------------------------------------------------


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    port: int
    idp: str
    out: Path

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.out.read_text("utf-8", errors="replace")


def children_of(pid: int) -> set[int]:
    """The direct children of `pid` (Linux /proc)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            found.update(int(child) for child in (task / "children").read_text().split())
    return found


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def left_behind(children: set[int]) -> list[int]:
    """The children still running; each is killed by its PID so a failure leaves no orphan."""
    left = [pid for pid in children if alive(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return left


@contextlib.contextmanager
def running_demo(tmp_path: Path) -> Iterator[Demo]:
    """`tabiji demo` on free ports; yields once the gateway is healthy; always stopped by PID."""
    port, upstream_port = free_port(), free_port()
    out = tmp_path / "demo.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABIJI_")}
    with out.open("wb") as sink:
        command = [sys.executable, "-m", "gateway.cli", "demo", "--port", str(port)]
        process = subprocess.Popen(
            [*command, "--upstream-port", str(upstream_port)],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    demo = Demo(process, port, "", out)
    children: set[int] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(f"`tabiji demo` exited with {process.returncode}:\n{demo.output()}")
            found = re.search(r"demo identity provider: (http://127\.0\.0\.1:\d+)/", demo.output())
            with contextlib.suppress(httpx.TransportError):
                health = httpx.get(demo.origin + "/.tabiji/healthz", timeout=2)
                if found and health.status_code == 200:
                    demo.idp = found.group(1)
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"`tabiji demo` did not become healthy:\n{demo.output()}")
        children = children_of(process.pid)
        yield demo
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        left_behind(children)


@pytest.mark.integration
def test_demo_starts_everything_on_loopback_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    """The demo prints users and links, serves all three parts, and SIGTERM leaves no process."""
    with running_demo(tmp_path) as demo:
        output = demo.output()
        for expected in ("hanako", "hanako-demo", "123456", "auditor-demo", "Ctrl-C"):
            assert expected in output
        meta = httpx.get(demo.idp + "/.well-known/openid-configuration", timeout=5).json()
        assert meta["issuer"] == demo.idp
        # The public localhost route reaches the groupware without signing in …
        public = httpx.get(demo.origin + "/", headers={"host": f"localhost:{demo.port}"})
        assert public.status_code == 200
        assert "庁内グループウェア" in public.text
        # … the 127.0.0.1 route does not.
        protected = httpx.get(demo.origin + "/", headers={"accept": "text/html"})
        assert protected.status_code in {302, 303}
        children = children_of(demo.process.pid)
        assert len(children) == 2  # the provider and the upstream; the gateway is the parent
        demo.process.send_signal(signal.SIGTERM)
        code = demo.process.wait(STOP_TIMEOUT)
        stray = [pid for pid in children if alive(pid)]  # checked before the fixture cleans up
        assert code == 0
        assert not stray
    with pytest.raises(httpx.TransportError):
        httpx.get(demo.idp + "/jwks", timeout=2)


@pytest.mark.integration
def test_sigterm_during_start_up_also_stops_the_children(tmp_path: Path) -> None:
    """A SIGTERM while the provider and upstream are still starting leaves no process behind."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TABIJI_")}
    command = [sys.executable, "-m", "gateway.cli", "demo", "--port", str(free_port())]
    with (tmp_path / "demo.out").open("wb") as sink:
        process = subprocess.Popen(
            [*command, "--upstream-port", str(free_port())],
            cwd=REPO,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    children: set[int] = set()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while len(children) < 2 and time.monotonic() < deadline and process.poll() is None:
            children = children_of(process.pid)
            time.sleep(0.01)
        assert len(children) == 2, (tmp_path / "demo.out").read_text()
        process.send_signal(signal.SIGTERM)
        code = process.wait(STOP_TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        stray = left_behind(children)
    assert code == 0
    assert not stray


class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        fields = dict(attrs)
        if tag == "form":
            self.forms.append({})
        elif tag == "input" and self.forms and fields.get("name"):
            self.forms[-1][str(fields["name"])] = fields.get("value") or ""


def sign_in_through_the_gateway(
    demo: Demo, username: str, password: str, otp: str = ""
) -> httpx.Response:
    """Open the groupware, get sent to the demo provider, sign in, follow the way back."""
    with httpx.Client(timeout=10, follow_redirects=True) as browser:
        login = browser.get(demo.origin + "/", headers={"accept": "text/html"})
        assert login.url.path == "/authorize", login.text[:2000]
        assert str(login.url).startswith(demo.idp)
        parser = _Forms()
        parser.feed(login.text)
        form = parser.forms[-1]
        form.update(username=username, password=password, otp=otp)
        return browser.post(demo.idp + "/authorize", data=form)


@pytest.mark.integration
def test_a_demo_user_signs_in_and_the_groupware_shows_who_they_are(tmp_path: Path) -> None:
    """hanako signs in with her one-time code; the groupware shows her verified name and groups;
    the contractor (no groups) is refused by the demo policy."""
    with running_demo(tmp_path) as demo:
        page = sign_in_through_the_gateway(demo, "hanako", "hanako-demo", "123456")
        assert page.status_code == 200, page.text[:2000]
        assert str(page.url).startswith(demo.origin)
        assert "山田 花子" in page.text
        assert "soumu, staff" in page.text  # the assertion lists groups sorted
        assert "/.tabiji/jwks.json で検証しました" in page.text  # the assertion was verified
        refused = sign_in_through_the_gateway(demo, "contractor", "contractor-demo")
        assert refused.status_code == 403
        assert "庁内グループウェア（デモ）" not in refused.text


# -- the demo upstream shows the identity it received -------------------------------------------

GATEWAY = "http://127.0.0.1:8080"


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio."""
    return "asyncio"


def _claims(**overrides: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {
        "iss": GATEWAY,
        "aud": GATEWAY,
        "sub": "demo-0001",
        "name": "山田 花子",
        "email": "hanako@town.example",
        "groups": ["soumu", "staff"],
        "amr": ["mfa", "otp", "pwd"],
        "iat": now,
        "exp": now + 120,
    }
    claims.update(overrides)
    return claims


@pytest.fixture
def signer() -> tuple[ec.EllipticCurvePrivateKey, AssertionVerifier]:
    """A gateway key and a verifier that already holds its public half (no JWKS fetch)."""
    key = ec.generate_private_key(ec.SECP256R1())
    verifier = AssertionVerifier(GATEWAY, (GATEWAY,))
    verifier.keys = {"k1": key.public_key()}
    verifier.fetched_at = time.monotonic()  # a fetch just happened: unknown kids are not fetched
    return key, verifier


def _sign(key: ec.EllipticCurvePrivateKey, claims: dict[str, object], kid: str = "k1") -> str:
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": kid})


@pytest.mark.anyio
async def test_the_demo_upstream_shows_the_verified_user(
    signer: tuple[ec.EllipticCurvePrivateKey, AssertionVerifier],
) -> None:
    """The groupware page shows the name and groups from a valid X-Tabiji-Assertion."""
    key, verifier = signer
    app = build_upstream(verifier)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://up"
    ) as client:
        page = await client.get("/", headers={"x-tabiji-assertion": _sign(key, _claims())})
        forged = await client.get(
            "/", headers={"x-tabiji-assertion": _sign(key, _claims(name="偽者"), kid="other")}
        )
    assert "ようこそ、山田 花子 さん" in page.text
    assert "soumu, staff" in page.text
    assert "偽者" not in forged.text
    assert "rejected" in forged.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"aud": "http://other.example"}, "aud"),
        ({"iss": "http://evil.example"}, "someone other"),
        ({"exp": int(time.time()) - 1}, "expired"),
    ],
)
async def test_the_demo_upstream_refuses_a_wrong_assertion(
    signer: tuple[ec.EllipticCurvePrivateKey, AssertionVerifier],
    change: dict[str, object],
    problem: str,
) -> None:
    """Wrong audience, issuer or an expired assertion is refused with the reason."""
    key, verifier = signer
    with pytest.raises(ValueError, match=problem):
        await verifier.verify(_sign(key, _claims(**change)))


@pytest.mark.anyio
async def test_the_demo_upstream_refuses_forged_signatures(
    signer: tuple[ec.EllipticCurvePrivateKey, AssertionVerifier],
) -> None:
    """A token signed by another key, alg none, HS256 or an edited payload is refused."""
    key, verifier = signer
    other = ec.generate_private_key(ec.SECP256R1())
    good = _sign(key, _claims())
    head, _, signature = good.split(".")
    edited = jwt.encode(_claims(groups=["admins"]), key, algorithm="ES256", headers={"kid": "k1"})
    tampered = f"{head}.{edited.split('.')[1]}.{signature}"
    attempts = [
        (_sign(other, _claims()), "bad signature"),
        (jwt.encode(_claims(), "", algorithm="none", headers={"kid": "k1"}), "ES256"),
        (jwt.encode(_claims(), "k" * 32, algorithm="HS256", headers={"kid": "k1"}), "ES256"),
        (tampered, "bad signature"),
    ]
    assert (await verifier.verify(good))["sub"] == "demo-0001"
    for token, problem in attempts:
        with pytest.raises(ValueError, match=problem):
            await verifier.verify(token)


# -- the README's click path, in real headless Chromium -------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium_or_skip() -> None:
    if Path(CHROMIUM).exists():
        return
    reason = "Debian chromium is not installed (apt-get install chromium)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)  # CI installs it: missing there is a broken setup, not a skip
    pytest.skip(reason)


@contextlib.contextmanager
def chromium_page(locale: str = "ja-JP") -> Iterator[tuple[Any, list[str]]]:
    """A fresh headless Chromium page and the console errors it logs."""
    _chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_context(locale=locale).new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            yield page, errors
        finally:
            browser.close()


def sign_in_with_chromium(page: Any, demo: Demo) -> None:
    """The README's click path: open the groupware, sign in as hanako with her one-time code."""
    page.goto(demo.origin + "/")
    assert page.url.startswith(demo.idp + "/authorize")
    assert "デモ職員ログイン" in page.content()
    page.screenshot(path=str(ARTIFACTS / "demo-idp-login.png"))
    page.fill("#username", "hanako")
    page.fill("#password", "hanako-demo")
    page.fill("#otp", "123456")
    page.click("form:last-of-type button[type=submit]")
    page.wait_for_url(demo.origin + "/**")


@pytest.mark.integration
def test_the_demo_login_works_in_chromium(tmp_path: Path) -> None:
    """In Chromium: the groupware sends hanako to the demo provider's page (ja/en, its strict CSP
    admitting the post and its redirect back), she signs in with her code and sees her name."""
    ARTIFACTS.mkdir(exist_ok=True)
    with running_demo(tmp_path) as demo, chromium_page() as (page, errors):
        sign_in_with_chromium(page, demo)
        assert "ようこそ、山田 花子 さん" in page.content()
        page.screenshot(path=str(ARTIFACTS / "demo-groupware.png"))
        assert not [text for text in errors if "Content Security Policy" in text]


@pytest.mark.integration
def test_signing_out_in_chromium_also_ends_the_provider_login(tmp_path: Path) -> None:
    """In Chromium: signing out at the gateway goes through the provider's end_session to the
    gateway's logged-out page, and the provider offers no one-click login afterwards."""
    with running_demo(tmp_path) as demo, chromium_page() as (page, errors):
        sign_in_with_chromium(page, demo)
        page.goto(demo.origin + "/.tabiji/logout")
        page.click("form button[type=submit]")
        page.wait_for_url(demo.origin + "/.tabiji/logged-out**", timeout=10_000)
        page.goto(demo.origin + "/")
        assert page.url.startswith(demo.idp + "/authorize")
        assert page.locator("input[name=continue]").count() == 0
        assert not [text for text in errors if "Content Security Policy" in text]
