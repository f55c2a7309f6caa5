"""The one catalogue of decision reason codes: stable kebab-case ids with a short English gloss.

The gateway's message catalogue (ja/en pages), the audit record and `tabiji-policy explain` all key
on these codes, so a code is never renamed. Imports only the standard library.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final


class Reason(StrEnum):
    """Why a criterion, a rule or a whole decision came out the way it did.

    Members are listed in priority order: when a decision carries several reasons the engine
    sorts them by this order, so the one the user should act on first (sign in, enrol the device)
    comes first.
    """

    # Decision-level outcomes.
    POLICY_ERROR = "policy-error"
    POLICY_UNKNOWN = "policy-unknown"
    REJECTED = "rejected"
    # Who the user is.
    USER_UNAUTHENTICATED = "user-unauthenticated"
    AUTHENTICATED_DENIED = "authenticated-denied"
    USER_NOT_ALLOWED = "user-not-allowed"
    USER_DENIED = "user-denied"
    EMAIL_UNVERIFIED = "email-unverified"
    EMAIL_NOT_ALLOWED = "email-not-allowed"
    EMAIL_DENIED = "email-denied"
    EMAIL_DOMAIN_NOT_ALLOWED = "email-domain-not-allowed"
    EMAIL_DOMAIN_DENIED = "email-domain-denied"
    GROUP_MISSING = "group-missing"
    GROUP_DENIED = "group-denied"
    CLAIM_MISSING = "claim-missing"
    CLAIM_MISMATCH = "claim-mismatch"
    CLAIM_DENIED = "claim-denied"
    MFA_REQUIRED = "mfa-required"
    MFA_DENIED = "mfa-denied"
    # The device.
    DEVICE_REVOKED = "device-revoked"
    DEVICE_UNENROLLED = "device-unenrolled"
    DEVICE_NOT_APPROVED = "device-not-approved"
    DEVICE_NOT_ALLOWED = "device-not-allowed"
    DEVICE_TAG_MISSING = "device-tag-missing"
    DEVICE_NOT_OWNED = "device-not-owned"
    DEVICE_KEY_STORAGE_WEAK = "device-key-storage-weak"
    DEVICE_POSTURE_UNKNOWN = "device-posture-unknown"
    DEVICE_POSTURE_STALE = "device-posture-stale"
    DEVICE_OS_NOT_ALLOWED = "device-os-not-allowed"
    DEVICE_OS_OUTDATED = "device-os-outdated"
    DEVICE_DISK_UNENCRYPTED = "device-disk-unencrypted"
    DEVICE_FIREWALL_OFF = "device-firewall-off"
    DEVICE_SCREEN_LOCK_TOO_LONG = "device-screen-lock-too-long"
    DEVICE_AUTO_UPDATE_OFF = "device-auto-update-off"
    DEVICE_PATCHES_OUTDATED = "device-patches-outdated"
    DEVICE_AGENT_OUTDATED = "device-agent-outdated"
    DEVICE_DENIED = "device-denied"
    # The client certificate.
    CLIENT_CERTIFICATE_MISSING = "client-certificate-missing"
    CLIENT_CERTIFICATE_NOT_ALLOWED = "client-certificate-not-allowed"
    CLIENT_CERTIFICATE_DENIED = "client-certificate-denied"
    # Where and when.
    SOURCE_IP_UNKNOWN = "source-ip-unknown"
    SOURCE_IP_NOT_ALLOWED = "source-ip-not-allowed"
    COUNTRY_UNKNOWN = "country-unknown"
    COUNTRY_NOT_ALLOWED = "country-not-allowed"
    TRAVEL_WINDOW_NONE = "travel-window-none"
    TRAVEL_WINDOW_WRONG_COUNTRY = "travel-window-wrong-country"
    TRAVEL_WINDOW_DENIED = "travel-window-denied"
    TIME_OUTSIDE_HOURS = "time-outside-hours"
    TIME_WEEKDAY_NOT_ALLOWED = "time-weekday-not-allowed"
    TIME_OUTSIDE_DATES = "time-outside-dates"
    TIME_HOLIDAY = "time-holiday"
    TIME_NOT_HOLIDAY = "time-not-holiday"
    TIME_NOT_ALLOWED = "time-not-allowed"
    # What is being asked for.
    METHOD_NOT_ALLOWED = "method-not-allowed"
    PATH_NOT_ALLOWED = "path-not-allowed"
    # Catch-alls, last.
    DENY_RULE_MATCHED = "deny-rule-matched"
    NO_RULE_MATCHED = "no-rule-matched"


_DESCRIPTIONS: Final[dict[Reason, str]] = {
    Reason.POLICY_ERROR: "the policy could not be evaluated, so access is denied",
    Reason.POLICY_UNKNOWN: "the route names a policy that does not exist",
    Reason.REJECTED: "the policy rejects every request",
    Reason.USER_UNAUTHENTICATED: "the user has not signed in",
    Reason.AUTHENTICATED_DENIED: "signed-in users are refused here",
    Reason.USER_NOT_ALLOWED: "this user is not on the list of allowed users",
    Reason.USER_DENIED: "this user is refused",
    Reason.EMAIL_UNVERIFIED: "the identity provider has not verified the user's email address",
    Reason.EMAIL_NOT_ALLOWED: "the user's email address is not on the allowed list",
    Reason.EMAIL_DENIED: "the user's email address is refused",
    Reason.EMAIL_DOMAIN_NOT_ALLOWED: "the user's email domain is not on the allowed list",
    Reason.EMAIL_DOMAIN_DENIED: "the user's email domain is refused",
    Reason.GROUP_MISSING: "the user is not in a required group",
    Reason.GROUP_DENIED: "the user is in a group that is refused",
    Reason.CLAIM_MISSING: "the identity provider did not send a required attribute (claim)",
    Reason.CLAIM_MISMATCH: "an attribute (claim) of the user does not have an allowed value",
    Reason.CLAIM_DENIED: "an attribute (claim) of the user has a refused value",
    Reason.MFA_REQUIRED: "the user must sign in with multi-factor authentication",
    Reason.MFA_DENIED: "multi-factor sign-ins are refused here",
    Reason.DEVICE_REVOKED: "the device's enrolment has been revoked",
    Reason.DEVICE_UNENROLLED: "the request does not come from an enrolled device",
    Reason.DEVICE_NOT_APPROVED: "the device is enrolled but IT has not approved it",
    Reason.DEVICE_NOT_ALLOWED: "this device is not on the list of allowed devices",
    Reason.DEVICE_TAG_MISSING: "the device does not carry a required tag",
    Reason.DEVICE_NOT_OWNED: "the device does not belong to the signed-in user",
    Reason.DEVICE_KEY_STORAGE_WEAK: "the device key is not kept in an accepted key store",
    Reason.DEVICE_POSTURE_UNKNOWN: "the device has not reported a needed security setting",
    Reason.DEVICE_POSTURE_STALE: "the device's last security report is too old",
    Reason.DEVICE_OS_NOT_ALLOWED: "the device's operating system is not allowed",
    Reason.DEVICE_OS_OUTDATED: "the device's operating system version is too old",
    Reason.DEVICE_DISK_UNENCRYPTED: "the device's disk is not encrypted",
    Reason.DEVICE_FIREWALL_OFF: "the device's firewall is off",
    Reason.DEVICE_SCREEN_LOCK_TOO_LONG: "the device's screen lock is off or waits too long",
    Reason.DEVICE_AUTO_UPDATE_OFF: "the device does not install updates automatically",
    Reason.DEVICE_PATCHES_OUTDATED: "the device has not installed updates recently enough",
    Reason.DEVICE_AGENT_OUTDATED: "the device agent is too old",
    Reason.DEVICE_DENIED: "this device is refused",
    Reason.CLIENT_CERTIFICATE_MISSING: "no client certificate was presented",
    Reason.CLIENT_CERTIFICATE_NOT_ALLOWED: "the client certificate is not an allowed one",
    Reason.CLIENT_CERTIFICATE_DENIED: "the client certificate is refused",
    Reason.SOURCE_IP_UNKNOWN: "the address the request comes from is not known",
    Reason.SOURCE_IP_NOT_ALLOWED: "the request comes from a network that is not allowed",
    Reason.COUNTRY_UNKNOWN: "the country the request comes from is not known",
    Reason.COUNTRY_NOT_ALLOWED: "the request comes from a country that is not allowed",
    Reason.TRAVEL_WINDOW_NONE: "IT has not approved a trip for this user for today",
    Reason.TRAVEL_WINDOW_WRONG_COUNTRY: "the approved trip does not cover this country",
    Reason.TRAVEL_WINDOW_DENIED: "users on an approved trip are refused here",
    Reason.TIME_OUTSIDE_HOURS: "it is outside the allowed hours",
    Reason.TIME_WEEKDAY_NOT_ALLOWED: "it is not an allowed day of the week",
    Reason.TIME_OUTSIDE_DATES: "it is outside the allowed dates",
    Reason.TIME_HOLIDAY: "it is a holiday",
    Reason.TIME_NOT_HOLIDAY: "it is not a holiday",
    Reason.TIME_NOT_ALLOWED: "access is refused at this time",
    Reason.METHOD_NOT_ALLOWED: "this kind of request (HTTP method) is not allowed",
    Reason.PATH_NOT_ALLOWED: "this page or address is not allowed",
    Reason.DENY_RULE_MATCHED: "a deny rule matched",
    Reason.NO_RULE_MATCHED: "no allow rule matched",
}

DESCRIPTIONS: Final[Mapping[Reason, str]] = MappingProxyType(_DESCRIPTIONS)
"""A short English description of every code, for `explain` and `who-can`."""

ALL_REASONS: Final[tuple[Reason, ...]] = tuple(Reason)
"""Every code, in priority order: the gateway checks its message catalogue covers all of them."""

UNKNOWN_FACT: Final[frozenset[Reason]] = frozenset(
    {
        Reason.USER_UNAUTHENTICATED,
        Reason.EMAIL_UNVERIFIED,
        Reason.CLAIM_MISSING,
        Reason.DEVICE_UNENROLLED,
        Reason.DEVICE_POSTURE_UNKNOWN,
        Reason.CLIENT_CERTIFICATE_MISSING,
        Reason.SOURCE_IP_UNKNOWN,
        Reason.COUNTRY_UNKNOWN,
        Reason.POLICY_ERROR,
    }
)
"""Reasons that mean "a fact is missing" rather than "a fact is wrong".

A criterion that fails only for these reasons is *unknown*, not false: an allow rule needs a
definite yes, while a deny rule fires on a yes or an unknown (fail closed).
"""

_PRIORITY: Final[dict[Reason, int]] = {reason: index for index, reason in enumerate(Reason)}


def describe(reason: Reason) -> str:
    """The short English description of `reason`."""
    return DESCRIPTIONS[reason]


def by_priority(reasons: Iterable[Reason]) -> tuple[Reason, ...]:
    """`reasons` without duplicates, in catalogue (priority) order."""
    return tuple(sorted(set(reasons), key=_PRIORITY.__getitem__))
