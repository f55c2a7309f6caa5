"""`tabiji demo`: the demo provider, the demo upstream and the gateway start on loopback, a demo
user signs in through the whole chain (httpx and Chromium), and SIGTERM stops every process.

The demo runs as `python -m gateway.cli demo` in a subprocess on free ports, as a person runs it.
Device trust in the demo: 「住民記録」 (/jumin/) needs the user's own approved device with an
encrypted disk; a real `tabiji-agent` (a file key in a temporary TABIJI_AGENT_HOME, no TPM) enrols
through the gateway's endpoints, answers the browser's device check on loopback and reports its
posture. Also here: the demo policies' own cases, the generated config, and the demo upstream's
check of X-Tabiji-Assertion and of its device claims (gateway/demo/upstream.py).
"""

from __future__ import annotations

import contextlib
import html
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway.cli import main as tabiji
from gateway.demo.run import DEMO_POLICIES, FACTS_OVERRIDE, banner, prepare
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


def test_the_demo_config_turns_device_trust_on_in_its_own_directory(tmp_path: Path) -> None:
    """Device trust is on, with its registry and CA in the demo's directory, staff enrolments
    approved by policy, the IT page guarded by policy, and 住民記録 on its own device route."""
    settings = load_settings(prepare(tmp_path, 18080, 19001, 19000))
    devices = settings.devices
    assert devices.enabled
    assert devices.store == f"sqlite:///{tmp_path}/devices.db"
    assert devices.ca_dir == tmp_path / "device-ca"
    assert devices.auto_approve_policy == "device-enrolment"
    assert devices.admin_policy == "device-admin"
    routes = {route.name: route for route in settings.routes}
    assert routes["jumin-kiroku"].from_ == "http://127.0.0.1:18080/jumin"
    assert routes["jumin-kiroku"].policy == "jumin-kiroku"
    assert routes["groupware"].policy == "groupware"  # the existing pages need no device
    override = json.loads((tmp_path / FACTS_OVERRIDE).read_text("utf-8"))
    assert override == {"disk_encrypted": True}


def test_the_banner_says_how_to_try_device_trust(tmp_path: Path) -> None:
    """The banner lists joho (IT) with the other users, the agent's enrol and run commands with
    the demo's own agent home, the device route, the IT page and the facts-file test hook."""
    text = banner(18080, 19000, tmp_path)
    assert re.search(r"joho\s+joho-demo\s+情報 太郎（staff, it-admins）", text)
    assert f"export TABIJI_AGENT_HOME={tmp_path / 'agent'}" in text
    assert re.search(r"\S*tabiji-agent enroll http://127\.0\.0\.1:18080\n", text)
    assert re.search(r"\S*tabiji-agent run\n", text)
    assert "http://127.0.0.1:18080/jumin/" in text
    assert "http://127.0.0.1:18080/.tabiji/devices" in text
    assert f"TABIJI_AGENT_FACTS_FILE={tmp_path / FACTS_OVERRIDE}" in text


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
        elif tag in ("input", "button") and self.forms and fields.get("name"):
            # A form's one named submit button is sent too, as a click on it would.
            self.forms[-1][str(fields["name"])] = fields.get("value") or ""


def last_form(page: httpx.Response) -> dict[str, str]:
    parser = _Forms()
    parser.feed(page.text)
    return parser.forms[-1]


def sign_in(
    browser: httpx.Client,
    demo: Demo,
    username: str,
    password: str,
    otp: str = "",
    *,
    path: str = "/",
) -> httpx.Response:
    """Open `path`, get sent to the demo provider, sign in, follow the way back."""
    login = browser.get(demo.origin + path, headers={"accept": "text/html"})
    assert login.url.path == "/authorize", login.text[:2000]
    assert str(login.url).startswith(demo.idp)
    form = last_form(login)
    form.update(username=username, password=password, otp=otp)
    return browser.post(demo.idp + "/authorize", data=form)


def sign_in_through_the_gateway(
    demo: Demo, username: str, password: str, otp: str = ""
) -> httpx.Response:
    """Open the groupware, get sent to the demo provider, sign in, follow the way back."""
    with httpx.Client(timeout=10, follow_redirects=True) as browser:
        return sign_in(browser, demo, username, password, otp)


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


# -- device trust in the running demo, with a real tabiji-agent ----------------------------------

NAVIGATE = {"accept": "text/html", "sec-fetch-mode": "navigate"}
FETCH = {"accept": "text/html", "sec-fetch-mode": "cors"}  # a page's own request: no redirect
AGENT_SCRIPT = Path(sys.executable).with_name("tabiji-agent")
AGENT_TIMEOUT = 60.0


@dataclass
class Agent:
    """One `tabiji-agent` command in a subprocess; its output is read as it comes."""

    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @classmethod
    def start(cls, home: Path, facts: Path, *args: str) -> Agent:
        if AGENT_SCRIPT.exists():
            command = [str(AGENT_SCRIPT)]
        else:
            command = [sys.executable, "-m", "device_agent.cli"]
        # A file key (no TCTI, no TPM), state in `home`, posture facts overridden from `facts`.
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith("TABIJI_") and key not in ("DISPLAY", "WAYLAND_DISPLAY")
        }
        env.update(TABIJI_AGENT_HOME=str(home), TABIJI_AGENT_FACTS_FILE=str(facts))
        process = subprocess.Popen(
            [*command, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        agent = cls(process)
        assert process.stdout is not None
        agent.reader = threading.Thread(target=agent._read, args=(process.stdout,), daemon=True)
        agent.reader.start()
        return agent

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first match of `pattern` in the output, once it is printed."""
        deadline = time.monotonic() + AGENT_TIMEOUT
        while time.monotonic() < deadline:
            ended = self.process.poll() is not None
            if ended:
                self._drain()
            found = re.search(pattern, self.output())
            if found:
                return found
            if ended:
                pytest.fail(f"tabiji-agent exited {self.process.returncode}:\n{self.output()}")
            time.sleep(0.05)
        pytest.fail(f"tabiji-agent never printed {pattern!r}:\n{self.output()}")

    def _drain(self) -> None:
        """Every line printed, once the process has ended (the reader sees the pipe close)."""
        if self.reader is not None:
            self.reader.join(STOP_TIMEOUT)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def finish(self) -> int:
        """Its exit code, once it ends by itself, with all of its output read."""
        code = self.process.wait(AGENT_TIMEOUT)
        self._drain()
        return code

    def stop(self) -> None:
        """SIGTERM by its PID (SIGKILL if it does not stop); its output is then all read."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self._drain()


@contextlib.contextmanager
def agent_command(home: Path, facts: Path, *args: str) -> Iterator[Agent]:
    agent = Agent.start(home, facts, *args)
    try:
        yield agent
    finally:
        agent.stop()


def pass_the_device_check(browser: httpx.Client, page: httpx.Response) -> httpx.Response:
    """What Chromium does on /.tabiji/device/check: follow its refresh to the agent on loopback,
    which signs the challenge and sends the browser back to the gateway, then to the page."""
    assert page.url.path == "/.tabiji/device/check", page.text[:2000]
    found = re.search(r'http-equiv="refresh" content="0; url=([^"]+)"', page.text)
    assert found, page.text[:2000]
    agent_url = html.unescape(found.group(1))
    assert agent_url.startswith("http://127.0.0.1:")
    return browser.get(agent_url, headers=NAVIGATE)


def enrol_through_the_gateway(
    browser: httpx.Client, demo: Demo, home: Path, facts: Path
) -> tuple[str, str]:
    """`tabiji-agent enroll`: the signed-in person opens its link and confirms; the agent ends
    approved at once (staff). Returns the device id and the agent's output."""
    with agent_command(home, facts, "enroll", demo.origin, "--no-browser", "--lang", "en") as agent:
        link = agent.wait_for(r"(http://127\.0\.0\.1:\d+/\.tabiji/devices/confirm\?code=\S+)")
        confirm = browser.get(link.group(1), headers=NAVIGATE)
        assert confirm.status_code == 200, confirm.text[:2000]
        form = last_form(confirm)
        assert form.get("confirm") == "yes"
        # A browser's form post carries its page's Origin (the gateway's CSRF check wants it).
        done = browser.post(
            demo.origin + "/.tabiji/devices/confirm", data=form, headers={"origin": demo.origin}
        )
        assert done.status_code == 200, done.text[:2000]
        assert agent.finish() == 0, agent.output()
        device_id = agent.wait_for(r"Enrolment complete \(device id: (dev-[0-9a-f]+)\)").group(1)
        return device_id, agent.output()


@pytest.mark.integration
def test_the_device_route_refuses_a_request_without_a_device(tmp_path: Path) -> None:
    """Signed in but with no device: a navigation to 住民記録 goes to the device check (which
    sends the browser on to the agent's loopback port), a page's own request gets the
    device-unenrolled page, and the groupware itself still opens without any device."""
    with (
        running_demo(tmp_path) as demo,
        httpx.Client(timeout=10, follow_redirects=True) as browser,
    ):
        home = sign_in(browser, demo, "hanako", "hanako-demo", "123456")
        assert "山田 花子" in home.text
        assert 'href="/jumin/"' in home.text  # the groupware links to the records
        navigation = browser.get(demo.origin + "/jumin/", headers=NAVIGATE, follow_redirects=False)
        assert navigation.status_code in {302, 303}
        assert navigation.headers["location"] == "/.tabiji/device/check?rd=%2Fjumin%2F"
        check = browser.get(demo.origin + navigation.headers["location"], headers=NAVIGATE)
        assert check.status_code == 200
        assert re.search(r"url=http://127\.0\.0\.1:4780[1-5]/tabiji/attest\?challenge=", check.text)
        fetched = browser.get(demo.origin + "/jumin/", headers=FETCH)
        assert fetched.status_code == 403
        assert "この端末は登録されていません" in fetched.text  # device-unenrolled, ja first
        assert "This device is not registered" in fetched.text
        assert "旅路 一郎" not in fetched.text
        groupware = browser.get(demo.origin + "/", headers=NAVIGATE)
        assert groupware.status_code == 200
        assert "ようこそ、山田 花子 さん" in groupware.text
        # The public localhost route reaches the app, which shows no records without a device.
        public = httpx.get(demo.origin + "/jumin/", headers={"host": f"localhost:{demo.port}"})
        assert public.status_code == 403
        assert "旅路 一郎" not in public.text


@pytest.mark.integration
def test_an_enrolled_agent_opens_the_device_route_and_it_shows_to_it(tmp_path: Path) -> None:
    """hanako enrols this computer with the real tabiji-agent (approved at once: staff); with an
    unencrypted disk the agent's browser check binds the device and the deny page explains the
    fix; after a report with an encrypted disk 住民記録 opens and shows the device from the
    signed assertion; joho (IT) sees the device at /.tabiji/devices, hanako may not."""
    home, facts = tmp_path / "agent", tmp_path / "facts.json"
    facts.write_text('{"disk_encrypted": false}', "utf-8")
    with (
        running_demo(tmp_path) as demo,
        httpx.Client(timeout=10, follow_redirects=True) as browser,
    ):
        sign_in(browser, demo, "hanako", "hanako-demo", "123456")
        device_id, enrolled = enrol_through_the_gateway(browser, demo, home, facts)
        assert "file only you can read" in enrolled  # a file key: no TPM here
        with agent_command(home, facts, "run", "--lang", "en") as runner:
            runner.wait_for(r"Last report \(.*\): accepted\.")
            check = browser.get(demo.origin + "/jumin/", headers=NAVIGATE)
            refused = pass_the_device_check(browser, check)
            assert "This device's disk is not encrypted" in runner.wait_for(
                r"(?s)Some systems stay closed.*?\n.*?\n"
            ).group(0)
        # Bound to the session now: the refusal is about the disk, with what to do.
        assert refused.status_code == 403, refused.text[:2000]
        assert refused.url.path == "/jumin/"
        assert "この端末のディスクが暗号化されていません" in refused.text
        assert "FileVault" in refused.text  # the fix, from the gateway's catalogue
        assert "旅路 一郎" not in refused.text

        facts.write_text('{"disk_encrypted": true}', "utf-8")
        with agent_command(home, facts, "report", "--lang", "en") as report:
            assert report.finish() == 0, report.output()
            assert "meets the gateway's requirements" in report.output()
        records = browser.get(demo.origin + "/jumin/", headers=NAVIGATE)
        assert records.status_code == 200, records.text[:2000]
        assert "住民記録（デモ）" in records.text
        assert "旅路 一郎" in records.text
        assert f"<td>{device_id}</td>" in records.text  # from the verified assertion
        assert "ファイル（本人だけが読める鍵ファイル）" in records.text  # device_trust: software
        assert "device_posture_at" in records.text
        # The pages without device trust are unchanged.
        assert browser.get(demo.origin + "/", headers=NAVIGATE).status_code == 200

        with httpx.Client(timeout=10, follow_redirects=True) as it:
            admin = sign_in(it, demo, "joho", "joho-demo", path="/.tabiji/devices")
            assert admin.status_code == 200, admin.text[:2000]
            assert admin.url.path == "/.tabiji/devices"
            assert f'data-device="{device_id}"' in admin.text
            assert "hanako@town.example" in admin.text
        assert browser.get(demo.origin + "/.tabiji/devices", headers=NAVIGATE).status_code == 403


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
async def test_the_demo_records_page_shows_the_device_the_assertion_names(
    signer: tuple[ec.EllipticCurvePrivateKey, AssertionVerifier],
) -> None:
    """住民記録 shows the records and the verified device claims (id, key storage, report time)
    only when the assertion names a device; without one, or without an assertion, it is 403."""
    key, verifier = signer
    reported = int(time.time()) - 120
    with_device = _claims(device_id="dev-0123abcd", device_trust="tpm", device_posture_at=reported)
    app = build_upstream(verifier)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://up"
    ) as client:
        shown = await client.get("/jumin/", headers={"x-tabiji-assertion": _sign(key, with_device)})
        no_device = await client.get(
            "/jumin/", headers={"x-tabiji-assertion": _sign(key, _claims())}
        )
        anonymous = await client.get("/jumin")
    assert shown.status_code == 200
    assert "<td>dev-0123abcd</td>" in shown.text
    assert "TPM（セキュリティチップ、証明を確認済み）" in shown.text
    assert "2 分前" in shown.text
    assert "旅路 一郎" in shown.text
    for refused in (no_device, anonymous):
        assert refused.status_code == 403
        assert "旅路 一郎" not in refused.text
    assert "端末の確認がない要求には住民記録を表示しません" in no_device.text
    assert "本人情報は届いていません" in anonymous.text


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


@pytest.mark.integration
def test_the_device_check_in_chromium_ends_on_the_disk_fix_then_the_records(
    tmp_path: Path,
) -> None:
    """In Chromium: 住民記録 sends hanako through the device check to the running agent and back
    (the meta refresh, silently); the unencrypted disk is refused with its fix, and after a
    report with an encrypted disk the same page shows the records."""
    ARTIFACTS.mkdir(exist_ok=True)
    home, facts = tmp_path / "agent", tmp_path / "facts.json"
    facts.write_text('{"disk_encrypted": false}', "utf-8")
    with (
        running_demo(tmp_path) as demo,
        httpx.Client(timeout=10, follow_redirects=True) as enroller,
        chromium_page() as (page, errors),
    ):
        sign_in(enroller, demo, "hanako", "hanako-demo", "123456")
        device_id, _ = enrol_through_the_gateway(enroller, demo, home, facts)
        sign_in_with_chromium(page, demo)
        with agent_command(home, facts, "run", "--lang", "en") as runner:
            runner.wait_for(r"Last report \(.*\): accepted\.")
            page.goto(demo.origin + "/jumin/")
            page.wait_for_url(demo.origin + "/jumin/")
            assert "この端末のディスクが暗号化されていません" in page.content()
            page.screenshot(path=str(ARTIFACTS / "demo-device-disk-unencrypted.png"))
        facts.write_text('{"disk_encrypted": true}', "utf-8")
        with agent_command(home, facts, "report") as report:
            assert report.finish() == 0, report.output()
        page.reload()
        assert "旅路 一郎" in page.content()
        assert device_id in page.content()
        page.screenshot(path=str(ARTIFACTS / "demo-jumin-records.png"))
        assert not [text for text in errors if "Content Security Policy" in text]
