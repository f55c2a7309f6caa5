"""Every sentence the agent shows a person — terminal and loopback pages — in Japanese and English.

One catalogue keyed by stable ids (DESIGN.md §6): Japanese first and by default, English with
`--lang en` or an English locale. The texts for the gateway's *reasons* are not here: the gateway
sends them with each report answer, so the agent holds no copy of the policies.
Standard library only.
"""

from __future__ import annotations

import locale
import os
from typing import Final

LANGUAGES: Final = ("ja", "en")

MESSAGES: Final[dict[str, dict[str, str]]] = {
    # -- the command line --
    "description": {
        "ja": "Tabiji 端末エージェント: この端末を庁内システムの利用に登録し、状態を報告します。",
        "en": "Tabiji device agent: enrols this laptop for the town's systems, reports its state.",
    },
    "help-enroll": {
        "ja": "この端末をゲートウェイに登録する",
        "en": "enrol this device with a gateway",
    },
    "help-status": {
        "ja": "登録と最後の報告の状態を表示する",
        "en": "show enrolment and the last report",
    },
    "help-report": {"ja": "今すぐ状態を 1 回報告する", "en": "send one posture report now"},
    "help-run": {
        "ja": "定期報告とブラウザー確認用サーバーを動かし続ける",
        "en": "keep reporting and answer browser device checks",
    },
    "help-proof": {
        "ja": "1 回のリクエスト用の DPoP ヘッダー値を表示する",
        "en": "print a DPoP header value for one request",
    },
    "help-curl": {
        "ja": "DPoP ヘッダー付きで curl を実行する",
        "en": "run curl with a DPoP header",
    },
    "help-renew": {"ja": "端末証明書を今すぐ更新する", "en": "renew the device certificate now"},
    "help-lang": {"ja": "表示言語（既定: ロケール）", "en": "language (default: locale)"},
    "help-json": {"ja": "機械向けの JSON で出力する", "en": "machine-readable output"},
    "help-ca-file": {
        "ja": "ゲートウェイの TLS を検証する庁内 CA 証明書（PEM）",
        "en": "private CA bundle (PEM) that verifies the gateway's TLS",
    },
    "help-no-browser": {
        "ja": "ブラウザーを開かずにリンクを表示するだけにする",
        "en": "print the link instead of opening a browser",
    },
    "help-ports": {
        "ja": "ブラウザー確認用の 127.0.0.1 のポート範囲（例: 47801-47805）",
        "en": "127.0.0.1 port range for browser checks (e.g. 47801-47805)",
    },
    "help-interval": {
        "ja": "定期報告の間隔（分、ゲートウェイの指定が優先）",
        "en": "report interval in minutes (the gateway's answer wins)",
    },
    "help-check-every": {
        "ja": "端末の状態を調べる間隔（秒、既定 30）。変化があればすぐ報告します",
        "en": "how often to look at the device's state, in seconds (default 30); "
        "a change is reported at once",
    },
    "help-gateway": {
        "ja": "ゲートウェイの URL（https://…）",
        "en": "the gateway's URL (https://…)",
    },
    "help-method": {"ja": "HTTP メソッド（GET、POST など）", "en": "HTTP method (GET, POST, …)"},
    "help-url": {"ja": "リクエストする URL", "en": "the URL of the request"},
    "help-curl-args": {
        "ja": "curl の引数（最後が URL）",
        "en": "curl's arguments (the URL last)",
    },
    "usage-ports": {
        "ja": "ポート範囲は 1024–65535 の「開始-終了」で指定してください（例: 47801-47805）。",
        "en": "Give the port range as start-end within 1024–65535 (e.g. 47801-47805).",
    },
    "usage-interval": {
        "ja": "報告の間隔は 1〜1440 分で指定してください。",
        "en": "Give the report interval in minutes, from 1 to 1440.",
    },
    "usage-check-every": {
        "ja": "状態を調べる間隔は 1〜3600 秒で指定してください。",
        "en": "Give the check interval in seconds, from 1 to 3600.",
    },
    # -- status --
    "not-enrolled": {
        "ja": "この端末はまだ登録されていません。",
        "en": "This device is not enrolled yet.",
    },
    "enrol-hint": {
        "ja": "登録するには: tabiji-agent enroll https://（ゲートウェイのアドレス）",
        "en": "To enrol: tabiji-agent enroll https://(the gateway's address)",
    },
    "enrolled": {
        "ja": "この端末は登録済みです（端末 ID: {device_id}）。",
        "en": "This device is enrolled (device id: {device_id}).",
    },
    "status-waiting": {
        "ja": "登録の確認待ちです。ブラウザーで確認を済ませるか、"
        "もう一度 tabiji-agent enroll {gateway} を実行してください。",
        "en": "The enrolment waits for your confirmation. Confirm it in the browser, "
        "or run tabiji-agent enroll {gateway} again.",
    },
    "status-pending": {
        "ja": "この端末は登録済みで、情報政策担当の承認待ちです（端末 ID: {device_id}）。",
        "en": "This device is enrolled and waits for IT's approval (device id: {device_id}).",
    },
    "status-revoked": {
        "ja": "この端末の登録は取り消されています（端末 ID: {device_id}）。"
        "情報政策担当へご連絡ください。",
        "en": "This device's enrolment has been revoked (device id: {device_id}). "
        "Please contact IT.",
    },
    "status-gateway": {"ja": "ゲートウェイ: {gateway}", "en": "Gateway: {gateway}"},
    "key-tpm": {
        "ja": "鍵の保管場所: TPM（この端末のセキュリティチップ。鍵はチップの外に出ません）",
        "en": "Key storage: TPM (this computer's security chip; the key never leaves it)",
    },
    "key-software": {
        "ja": "鍵の保管場所: ファイル（本人だけが読めるファイル。TPM より保護は弱くなります）",
        "en": "Key storage: a file only you can read (weaker protection than a TPM)",
    },
    "certificate-until": {
        "ja": "端末証明書の有効期限: {when}",
        "en": "Device certificate valid until: {when}",
    },
    "state-dir": {"ja": "状態の保存先: {path}", "en": "State directory: {path}"},
    "unreadable": {
        "ja": "登録情報を読み取れません（{path}）。情報政策担当へご連絡ください。",
        "en": "The enrolment record cannot be read ({path}). Please contact IT.",
    },
    "no-report": {
        "ja": "まだ状態を報告していません。",
        "en": "No posture report has been sent yet.",
    },
    "report-accepted": {
        "ja": "最後の報告（{when}）: 受理されました。",
        "en": "Last report ({when}): accepted.",
    },
    "report-refused": {
        "ja": "最後の報告（{when}）: 受理されませんでした — {message}（{code}）",
        "en": "Last report ({when}): not accepted — {message} ({code})",
    },
    "report-all-good": {
        "ja": "この端末はゲートウェイの基準を満たしています。",
        "en": "This device meets the gateway's requirements.",
    },
    "report-fixes": {
        "ja": "次の点を直すまで、一部のシステムは利用できません:",
        "en": "Some systems stay closed until you fix the following:",
    },
    "refusal-unexplained": {
        "ja": "ゲートウェイが報告を受け付けませんでした",
        "en": "The gateway did not accept the report",
    },
    # -- enrol --
    "enrol-already": {
        "ja": "この端末はすでに {gateway} に登録されています（端末 ID: {device_id}）。"
        "新しい鍵で登録し直す場合は tabiji-agent enroll --replace {gateway} を実行してください"
        "（今の登録は使えなくなり、情報政策担当の承認が改めて必要になることがあります）。",
        "en": "This device is already enrolled with {gateway} (device id: {device_id}). "
        "To enrol it again with a new key, run tabiji-agent enroll --replace {gateway} "
        "(the current enrolment stops working; IT may have to approve the device again).",
    },
    "enrol-replacing": {
        "ja": "以前の登録（端末 ID: {device_id}）とその鍵を削除し、新しい鍵で登録し直します。",
        "en": "Removing the previous enrolment (device id: {device_id}) and its key; "
        "enrolling again with a new key.",
    },
    "help-replace": {
        "ja": "登録済みでも、鍵を作り直して登録し直す",
        "en": "enrol again with a new key even if this device is enrolled",
    },
    "enrol-key-tpm": {
        "ja": "端末の鍵を TPM（セキュリティチップ）に用意しました。",
        "en": "The device key is ready in the TPM (security chip).",
    },
    "enrol-key-software": {
        "ja": "この端末では TPM を使えないため、端末の鍵を本人だけが読めるファイルに用意しました。",
        "en": "No usable TPM here: the device key is ready in a file only you can read.",
    },
    "enrol-attestation-missing": {
        "ja": "TPM の証明を作れませんでした（{code}）。"
        "ゲートウェイは鍵が TPM 内にあることを確認できません。",
        "en": "The TPM could not attest the key ({code}); "
        "the gateway cannot confirm it is in the TPM.",
    },
    "enrol-open-link": {
        "ja": "ブラウザーで次のリンクを開き、庁内アカウントでログインして"
        "「これは私のパソコンです」を押してください:",
        "en": "Open this link in your browser, sign in with your work account and press "
        '"This is my computer":',
    },
    "enrol-user-code": {
        "ja": "確認コード: {code}（画面のコードと同じか確かめてください）",
        "en": "Confirmation code: {code} (check that the page shows the same code)",
    },
    "enrol-browser-failed": {
        "ja": "ブラウザーを開けませんでした。上のリンクを手で開いてください。",
        "en": "The browser could not be opened; please open the link above yourself.",
    },
    "enrol-waiting": {
        "ja": "確認を待っています…（{minutes} 分以内に確認してください。中断は Ctrl+C）",
        "en": "Waiting for your confirmation… (within {minutes} minutes; Ctrl+C to stop)",
    },
    "enrol-approved": {
        "ja": "登録が完了しました（端末 ID: {device_id}）。",
        "en": "Enrolment complete (device id: {device_id}).",
    },
    "enrol-pending": {
        "ja": "確認できました。情報政策担当の承認を待っています（端末 ID: {device_id}）。"
        "承認されると自動的に使えるようになります。",
        "en": "Confirmed. The device now waits for IT's approval (device id: {device_id}); "
        "it starts working by itself once approved.",
    },
    "enrol-next": {
        "ja": "次に: エージェントを常に動かしてください（tabiji-agent run。"
        "ログイン時に自動で起動する設定は情報政策担当の案内を参照）。",
        "en": "Next: keep the agent running (tabiji-agent run; "
        "IT's guide sets it to start at login).",
    },
    "enrol-refused": {
        "ja": "登録は拒否されました。情報政策担当へご連絡ください。",
        "en": "The enrolment was refused. Please contact IT.",
    },
    "enrol-expired": {
        "ja": "確認の期限が切れました。もう一度 tabiji-agent enroll {gateway} を実行してください。",
        "en": "The confirmation expired. Run tabiji-agent enroll {gateway} again.",
    },
    "enrol-interrupted": {
        "ja": "中断しました。もう一度 tabiji-agent enroll {gateway} を実行すると続けられます。",
        "en": "Stopped. Run tabiji-agent enroll {gateway} again to continue.",
    },
    # -- errors --
    "not-enrolled-error": {
        "ja": "この端末はまだ登録されていません。"
        "先に tabiji-agent enroll https://… を実行してください。",
        "en": "This device is not enrolled yet. Run tabiji-agent enroll https://… first.",
    },
    "unconfirmed-error": {
        "ja": "登録がまだ確認されていません。"
        "tabiji-agent enroll {gateway} をもう一度実行してください。",
        "en": "The enrolment is not confirmed yet. Run tabiji-agent enroll {gateway} again.",
    },
    "gateway-refused": {
        "ja": "ゲートウェイが要求を受け付けませんでした: {message}（{code}）",
        "en": "The gateway refused the request: {message} ({code})",
    },
    "gateway-unreachable": {
        "ja": "ゲートウェイ {gateway} に接続できません（{code}）。ネットワークを確認してください。",
        "en": "Cannot reach the gateway {gateway} ({code}). Please check the network.",
    },
    "gateway-tls-untrusted": {
        "ja": "ゲートウェイの証明書を確認できません。"
        "庁内の CA を使う場合は --ca-file で指定してください。",
        "en": "The gateway's certificate cannot be verified. For a private CA, pass --ca-file.",
    },
    "gateway-ca-file-unreadable": {
        "ja": "CA 証明書のファイルを読めません: {detail}",
        "en": "The CA file cannot be read: {detail}",
    },
    "gateway-url-invalid": {
        "ja": "ゲートウェイの URL が正しくありません（{detail}）。例: https://gateway.example",
        "en": "The gateway URL is not valid ({detail}). Example: https://gateway.example",
    },
    "gateway-url-insecure": {
        "ja": "http:// は使えません。https:// で始まる URL を指定してください。",
        "en": "http:// is not allowed; give a URL starting with https://.",
    },
    "gateway-answer-bad": {
        "ja": "ゲートウェイの応答を理解できません（{code}）。情報政策担当へご連絡ください。",
        "en": "The gateway's answer cannot be understood ({code}). Please contact IT.",
    },
    "key-error": {
        "ja": "端末の鍵を使えません（{code}）: {detail}",
        "en": "The device key cannot be used ({code}): {detail}",
    },
    "key-missing": {
        "ja": "端末の鍵が見つかりません（{path}）。情報政策担当へご連絡ください。",
        "en": "The device key is missing ({path}). Please contact IT.",
    },
    # -- report, run, renew --
    "run-started": {
        "ja": "エージェントを開始しました"
        "（ゲートウェイ: {gateway}、ブラウザー確認: 127.0.0.1:{port}）。",
        "en": "Agent started (gateway: {gateway}, browser checks on 127.0.0.1:{port}).",
    },
    "run-no-loopback": {
        "ja": "127.0.0.1 のポート {ports} がすべて使用中のため、"
        "ブラウザーでの端末確認は使えません。",
        "en": "Ports {ports} on 127.0.0.1 are all in use: browser device checks are unavailable.",
    },
    "run-stopped": {"ja": "エージェントを停止しました。", "en": "Agent stopped."},
    "run-refused": {
        "ja": "ゲートウェイがこの端末を受け付けないため停止します（{code}）。"
        "情報政策担当へご連絡ください。",
        "en": "The gateway refuses this device ({code}); stopping. Please contact IT.",
    },
    "renew-done": {
        "ja": "端末証明書を更新しました（有効期限: {when}）。",
        "en": "Device certificate renewed (valid until {when}).",
    },
    "renew-not-approved": {
        "ja": "承認済みの端末だけが証明書を更新できます。",
        "en": "Only an approved device can renew its certificate.",
    },
    "curl-missing": {
        "ja": "curl コマンドが見つかりません。",
        "en": "The curl command was not found.",
    },
    "curl-no-url": {
        "ja": "最後の引数に URL（http:// または https://）を指定してください。",
        "en": "Give the URL (http:// or https://) as the last argument.",
    },
    # -- the loopback attestation pages --
    "loopback-title": {
        "ja": "Tabiji 端末エージェント",
        "en": "Tabiji device agent",
    },
    "loopback-hint": {
        "ja": "このページはブラウザーでの端末確認のためのものです。"
        "問題が続く場合は情報政策担当へご連絡ください。",
        "en": "This address answers the browser's device check only. "
        "If the problem persists, please contact IT.",
    },
    "loopback-wrong-gateway": {
        "ja": "この端末が登録されたゲートウェイ以外からの確認要求なので、応答しません。",
        "en": "The check did not come from the gateway this device is enrolled with; not answered.",
    },
    "loopback-bad-challenge": {
        "ja": "確認要求の形式が正しくありません。",
        "en": "The check request is malformed.",
    },
    "loopback-bad-query": {
        "ja": "確認要求の形式が正しくありません。",
        "en": "The check request is malformed.",
    },
    "loopback-bad-request": {
        "ja": "要求の形式が正しくありません。",
        "en": "The request is malformed.",
    },
    "loopback-request-too-long": {
        "ja": "要求が長すぎます。",
        "en": "The request is too long.",
    },
    "loopback-not-found": {
        "ja": "このアドレスには何もありません。",
        "en": "Nothing is served at this address.",
    },
    "loopback-wrong-host": {
        "ja": "127.0.0.1 以外の名前で届いた要求には応答しません。",
        "en": "Requests addressed to any name other than 127.0.0.1 are not answered.",
    },
    "loopback-method-not-allowed": {
        "ja": "この方法の要求には応答しません。",
        "en": "This kind of request is not answered.",
    },
    "loopback-sign-failed": {
        "ja": "端末の鍵で署名できませんでした。",
        "en": "The device key could not sign the check.",
    },
}


def say(key: str, language: str, **values: object) -> str:
    """The catalogue's sentence in `language`, with the values filled in."""
    return MESSAGES[key][language if language in LANGUAGES else "ja"].format(**values)


def default_language() -> str:
    """Japanese unless the user's locale is English."""
    for variable in ("LC_ALL", "LC_MESSAGES", "LANG"):
        value = os.environ.get(variable)
        if value:
            return "en" if value.lower().startswith("en") else "ja"
    found = locale.getlocale()[0] or ""
    return "en" if found.lower().startswith("en") else "ja"


def localised(texts: dict[str, str], language: str) -> str:
    """The gateway's text in `language`, else in the other language, else empty."""
    return texts.get(language) or next((texts[other] for other in LANGUAGES if other in texts), "")
