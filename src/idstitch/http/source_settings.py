"""The settings document Segment's CDN serves for a source, served by idstitch and pointing back at itself.

analytics.js fetches `{cdnURL}/v1/projects/{writeKey}/settings` before it sends anything, and Segment's
mobile libraries fetch `https://{cdnHost}/projects/{writeKey}/settings` (their cdnHost ends in `/v1`).
Answering that route is what lets a site or an app move to idstitch by changing only the host it talks
to: the document names idstitch, as the client reached it, as the Segment.io destination's `apiHost`.
Nothing else in it is needed: no other destination, no tracking plan, no middleware, so the libraries
load no further code.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import msgspec

from idstitch.core.errors import ConfigError

__all__ = ["SETTINGS_ROUTE", "PublicAddress", "parse_public_url", "settings_document", "settings_write_key"]

SETTINGS_ROUTE = "/v1/projects/{writeKey}/settings"  # the route's name in logs and metrics
_PREFIX = "/v1/projects/"
_SUFFIX = "/settings"
_encoder = msgspec.json.Encoder()


def settings_write_key(path: str) -> str | None:
    """The write key a `/v1/projects/{writeKey}/settings` path names, None for any other path."""
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    key = unquote(path[len(_PREFIX) : -len(_SUFFIX)])
    return key if key and "/" not in key else None


class PublicAddress(msgspec.Struct, frozen=True):
    """Where clients reach this server, when that is not what requests say (behind a reverse proxy)."""

    host: str  # host[:port] and any path prefix, without a trailing slash
    scheme: str


def parse_public_url(url: str) -> PublicAddress:
    """`https://events.example.com[/prefix]` as a PublicAddress, or a ConfigError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"public URL {url!r}: expected http(s)://host[:port][/path]")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(f"public URL {url!r}: only a scheme, a host, a port and a path are allowed")
    return PublicAddress(host=parts.netloc + parts.path.rstrip("/"), scheme=parts.scheme)


def settings_document(write_key: str, *, host: str, scheme: str) -> bytes:
    """The JSON settings of a source: the Segment.io destination only, sending to `scheme://host/v1`."""
    segment_io: dict[str, object] = {
        "apiKey": write_key,
        "apiHost": f"{host}/v1",
        "protocol": "https" if scheme in ("https", "wss") else "http",
        "addBundledMetadata": False,
        "unbundledIntegrations": [],
    }
    return _encoder.encode(
        {
            "integrations": {"Segment.io": segment_io},
            "plan": {},
            "edgeFunction": {},
            "analyticsNextEnabled": True,
            "middlewareSettings": {},
            "enabledMiddleware": {},
            "remotePlugins": [],
        }
    )
