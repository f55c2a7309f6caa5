"""Refusal and error pages: the reader's language, both languages present, JSON for programs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.pages import Pages, wants_json
from gateway.web.catalogue import load_catalogue, preferred_language
from policies.yaml_source import SourceErrors


@pytest.fixture(scope="module")
def pages() -> Pages:
    return Pages(load_catalogue())


def test_html_page_is_japanese_first_with_english_below(pages: Pages) -> None:
    """Without Accept-Language the page is Japanese, and the English text is on it too."""
    headers, body = pages.render_error(
        status=502, code="upstream-unavailable", request_id="req-12345678", request_headers=[]
    )
    text = body.decode()
    assert '<html lang="ja">' in text
    assert text.index("システムに接続できません") < text.index("The system cannot be reached")
    assert "req-12345678" in text
    assert (b"content-language", b"ja") in headers


def test_english_reader_gets_english_first(pages: Pages) -> None:
    """Accept-Language preferring English puts English first."""
    _, body = pages.render_error(
        status=404,
        code="route-not-found",
        request_id="r",
        request_headers=[(b"accept-language", b"en-GB,en;q=0.9,ja;q=0.5")],
    )
    text = body.decode()
    assert text.index("No system is published") < text.index("このアドレスに対応する")


def test_reasons_are_explained_with_their_fix(pages: Pages) -> None:
    """Each reason code appears with its explanation and what the reader can do."""
    _, body = pages.render_error(
        status=403,
        code="access-denied",
        request_id="r",
        request_headers=[],
        reasons=("route-not-public",),
    )
    text = body.decode()
    assert 'data-code="route-not-public"' in text
    assert "アクセス方針の設定をご依頼ください" in text
    assert "Ask IT to set an access policy" in text


def test_json_for_programs(pages: Pages) -> None:
    """A client asking for JSON gets the codes, both languages and the request id as JSON."""
    headers, body = pages.render_error(
        status=403,
        code="access-denied",
        request_id="req-1",
        request_headers=[(b"accept", b"application/json")],
        reasons=("route-not-public",),
    )
    data = json.loads(body)
    assert data["error"] == "access-denied"
    assert data["reasons"] == ["route-not-public"]
    assert data["request_id"] == "req-1"
    assert data["message"]["en"] == "Access is not permitted"
    assert (b"content-type", b"application/json; charset=utf-8") in headers


def test_security_headers_and_hsts_only_over_https(pages: Pages) -> None:
    """Pages carry a strict CSP that forbids framing; HSTS only when served over HTTPS."""
    plain = dict(pages.security_headers(https=False))
    secure = dict(pages.security_headers(https=True))
    assert b"frame-ancestors 'none'" in plain[b"content-security-policy"]
    assert b"default-src 'none'" in plain[b"content-security-policy"]
    assert plain[b"x-content-type-options"] == b"nosniff"
    assert b"strict-transport-security" not in plain
    assert secure[b"strict-transport-security"].startswith(b"max-age=")


def test_request_values_are_escaped(pages: Pages) -> None:
    """Nothing from the request reaches the page unescaped (the request id is ours, but still)."""
    _, body = pages.render_error(
        status=400, code="target-invalid", request_id="<script>x</script>", request_headers=[]
    )
    assert b"<script>x</script>" not in body
    assert b"&lt;script&gt;" in body


def test_unknown_code_falls_back_to_the_generic_message(pages: Pages) -> None:
    """A code without catalogue text still renders a page (never a crash)."""
    _, body = pages.render_error(
        status=500, code="no-such-code", request_id="r", request_headers=[]
    )
    assert "ゲートウェイで問題が発生しました" in body.decode()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "ja"),
        (b"en", "en"),
        (b"en-US,en;q=0.9", "en"),
        (b"ja-JP,ja;q=0.9,en;q=0.8", "ja"),
        (b"fr-FR,en;q=0.5,ja;q=0.8", "ja"),
        (b"fr, de", "ja"),
        (b"en;q=0", "ja"),
        (b"en;q=abc, ja", "ja"),
    ],
)
def test_preferred_language(header: bytes | None, expected: str) -> None:
    """Accept-Language picks the best of ja/en by quality; Japanese is the default."""
    assert preferred_language(header) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"accept", b"application/json")], True),
        ([(b"accept", b"text/html,application/json")], False),
        ([(b"x-requested-with", b"XMLHttpRequest")], True),
        ([], False),
    ],
)
def test_wants_json(headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    """Programs asking for JSON get JSON; navigations get HTML."""
    assert wants_json(headers) is expected


def test_catalogue_entries_need_both_languages(tmp_path: Path) -> None:
    """A catalogue entry missing a language is refused with its place named."""
    path = tmp_path / "messages.yaml"
    path.write_text(
        "gateway-error:\n  ja: {title: エラー}\n  en: {title: Error}\nx:\n  ja: {title: だけ}\n",
        encoding="utf-8",
    )
    with pytest.raises(SourceErrors) as caught:
        load_catalogue(path)
    assert str(caught.value) == f"{path}:4:1: 'x' needs exactly: ja, en"
