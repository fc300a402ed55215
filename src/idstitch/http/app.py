"""One ASGI app for `idstitch serve`: the Tracking API and the Profile API on one port, or each on its own."""

from __future__ import annotations

from idstitch.http.profiles import ProfileAPI, is_profile_api_path
from idstitch.http.tracking import Receive, Scope, Send, TrackingAPI

__all__ = ["ServeApp"]


class ServeApp:
    """Routes Profile API paths to the Profile API and everything else to the Tracking API.

    With `profile_port` set, the Profile API answers only on that port and the Tracking API only on the
    others, so that each can sit behind its own firewall rule or load balancer.
    """

    def __init__(
        self, tracking: TrackingAPI, profiles: ProfileAPI, *, profile_port: int | None = None
    ) -> None:
        self.tracking = tracking
        self.profiles = profiles
        self.profile_port = profile_port

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.tracking(scope, receive, send)
            return
        if self.profile_port is None:
            to_profiles = is_profile_api_path(scope["path"])
        else:
            server = scope.get("server")
            to_profiles = server is not None and server[1] == self.profile_port
        await (self.profiles if to_profiles else self.tracking)(scope, receive, send)
