"""The Profile API (SPEC §7, SEGMENT_API.md §A) in process: httpx against the ASGI app over a SQLite store
built from the SPEC examples. Full response bodies are compared, not just fields.
"""

from __future__ import annotations

import base64
import multiprocessing
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

import idstitch.engine as engine_module
from helpers import Space, World, at, config_from_toml, counted_steps, open_world
from idstitch.core.errors import ConfigError
from idstitch.core.identifiers import Identifier
from idstitch.core.messages import format_timestamp
from idstitch.engine import Engine
from idstitch.http.profiles import ProfileAPI, _encode_cursor
from idstitch.http.rate_limits import RateLimiter, SharedBuckets
from idstitch.storage.base import StoreUnavailable
from idstitch.storage.urls import open_store

pytestmark = pytest.mark.anyio

CONFIG = """
[spaces.app]
profile_tokens = ["pt_app"]
admin_tokens = ["at_app"]

[spaces.app.sources.web]
write_key = "wk_web"

[spaces.app.sources.crm]
write_key = "wk_crm"

[spaces.other]
profile_tokens = ["pt_other"]
admin_tokens = ["at_other"]
rate_limit = 3

[spaces.other.sources.web]
write_key = "wk_other"
"""
USERS = "/v1/spaces/app/collections/users/profiles"
ACCOUNTS = "/v1/spaces/app/collections/accounts/profiles"
NOT_FOUND = {"error": {"code": "not_found", "message": "Profile was not found."}}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def basic(token: str) -> str:
    return "Basic " + base64.b64encode(f"{token}:".encode()).decode()


class Clock:
    """A hand-turned monotonic clock for the rate limiter."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Api:
    world: World
    web: Space
    crm: Space
    client: httpx.AsyncClient
    clock: Clock

    async def get(self, path: str, token: str | None = "pt_app", **params: Any) -> tuple[int, Any]:
        headers = {} if token is None else {"Authorization": basic(token)}
        response = await self.client.get(path, params=params or None, headers=headers)
        assert response.headers["content-type"] == "application/json"
        assert response.headers["request-id"]
        return response.status_code, response.json()

    def root(self, ref: str) -> str:
        found = self.web.profile_of(ref)
        assert found is not None
        return found


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async for made in _api(open_world(tmp_path, CONFIG)):
        yield made


@pytest.fixture(params=["sqlite", "postgres"])
async def api_on(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Api]:
    """The same over each store whose reads run beside another process's writes."""
    if request.param == "postgres":
        world = World(open_store(request.getfixturevalue("postgres_url")), config_from_toml(CONFIG))
    else:
        world = open_world(tmp_path, CONFIG)
    async for made in _api(world):
        yield made


async def _api(world: World) -> AsyncIterator[Api]:
    clock = Clock()
    app = ProfileAPI(world.engine, rate_limiter=RateLimiter(clock))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://idstitch.test") as client:
        yield Api(world, world.space("app", "web"), world.space("app", "crm"), client, clock)
    world.close()


def e2(space: Space) -> None:
    """SPEC E2: anonymous a1 browses three pages, then identifies as u1 with an email."""
    for number in range(3):
        space.send(
            "page",
            anonymousId="a1",
            name=f"Page {number}",
            properties={"path": f"/p{number}"},
            context={"ip": "10.0.0.1"},
            at=at(minutes=number),
        )
    space.send(
        "identify",
        userId="u1",
        anonymousId="a1",
        traits={"email": "J@X.io", "plan": "pro", "age": 41},
        context={"library": {"name": "analytics.js", "version": "3.2.5"}},
        at=at(minutes=10),
    )


# -- traits -------------------------------------------------------------------------------------------


async def test_a_store_whose_server_is_down_is_503_with_retry_after_not_a_500(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL restarting. Before: 500 internal_error, a traceback in the log, after the pool's 30 s."""
    e2(api.web)
    caplog.set_level("INFO", logger="idstitch.http")
    down = "store postgresql://app@db:5432/idstitch is unavailable: cannot connect to PostgreSQL: refused"

    def unreachable(*_args: Any) -> Any:
        raise StoreUnavailable(down)

    monkeypatch.setattr(api.world.store, "find_profile", unreachable)
    status, body = await api.get(f"{USERS}/user_id:u1/traits")
    assert status == 503
    assert body == {
        "error": {"code": "store_unavailable", "message": "the store cannot be reached; retry later"}
    }
    response = await api.client.get(f"{USERS}/user_id:u1/traits", headers={"Authorization": basic("pt_app")})
    assert response.headers["retry-after"] == "1"
    assert not [record for record in caplog.records if record.exc_info]  # no traceback: nothing to debug
    monkeypatch.undo()
    assert (await api.get(f"{USERS}/user_id:u1/traits"))[0] == 200
    document = (await api.client.get("/openapi.json")).json()
    route = document["paths"]["/v1/spaces/{space}/collections/{collection}/profiles/{id}/traits"]
    assert "Retry-After" in route["get"]["responses"]["503"]["headers"]  # documented for clients


async def test_a_postgresql_connection_lost_under_a_read_is_read_again_not_a_500(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The read's backend ends mid-request while the server answers (pg_terminate_backend, a pooler, a
    restart already over). Before: 500 internal_error and psycopg's AdminShutdown traceback in the log."""
    world = World(open_store(postgres_url), config_from_toml(CONFIG))
    try:
        e2(world.space("app", "web"))
        store = world.store
        identifiers = store.identifiers
        kills = [1]

        def end_the_backend_then_read(*args: Any) -> Any:
            if kills[0]:
                kills[0] -= 1
                with psycopg.connect(postgres_url, autocommit=True) as admin:
                    # the backend of this request's snapshot: the one other than the admin's, mid-transaction
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
                    )
            return identifiers(*args)

        monkeypatch.setattr(store, "identifiers", end_the_backend_then_read)
        app = ProfileAPI(world.engine)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://idstitch.test") as client:
            path = f"{USERS}/user_id:u1/external_ids"
            headers = {"Authorization": basic("pt_app")}
            response = await client.get(path, headers=headers)  # lost once, read again
            assert response.status_code == 200
            assert {item["id"] for item in response.json()["data"]} == {"a1", "u1", "j@x.io"}
            kills[0] = 2
            response = await client.get(path, headers=headers)  # lost twice: retry later
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "store_unavailable"
            assert (await client.get(path, headers=headers)).status_code == 200
        assert not [record for record in caplog.records if record.exc_info]
    finally:
        world.close()


async def test_traits_by_email_any_case_and_url_encoded_have_segments_shape(api: Api) -> None:
    e2(api.web)
    root = api.root("user_id:u1")
    status, body = await api.get(f"{USERS}/EMAIL:j%40x.io/traits")
    assert status == 200
    assert body == {
        "traits": {"age": 41, "email": "J@X.io", "plan": "pro"},
        "cursor": {"url": f"{USERS}/EMAIL:j%40x.io/traits", "has_more": False, "next": "", "limit": 10},
    }
    # the segment id and a merged-in anonymous id name the same profile
    assert (await api.get(f"{USERS}/{root}/traits"))[1]["traits"] == body["traits"]
    assert (await api.get(f"{USERS}/anonymous_id:a1/traits"))[1]["traits"] == body["traits"]


async def test_traits_verbose_include_class_and_paging_by_key(api: Api) -> None:
    e2(api.web)
    status, body = await api.get(f"{USERS}/user_id:u1/traits", verbose="true", include="plan,age")
    assert status == 200
    assert body["traits"] == {
        "age": {"value": 41, "source_id": "web", "updated_at": "2026-01-05T09:10:00.000Z"},
        "plan": {"value": "pro", "source_id": "web", "updated_at": "2026-01-05T09:10:00.000Z"},
    }
    status, first = await api.get(f"{USERS}/user_id:u1/traits", limit="2")
    assert first == {
        "traits": {"age": 41, "email": "J@X.io"},
        "cursor": {
            "url": f"{USERS}/user_id:u1/traits?limit=2&next=plan",
            "has_more": True,
            "next": "plan",
            "limit": 2,
        },
    }
    status, second = await api.get(f"{USERS}/user_id:u1/traits", limit="2", next="plan")
    assert second["traits"] == {"plan": "pro"} and second["cursor"]["has_more"] is False
    # following cursor.url, as Segment's own clients do, gives the same page
    following = await api.client.get(first["cursor"]["url"], headers={"Authorization": basic("pt_app")})
    assert following.json() == second
    assert (await api.get(f"{USERS}/user_id:u1/traits", **{"class": "audience"}))[1]["traits"] == {}


async def test_a_newer_trait_from_another_source_shows_that_source(api: Api) -> None:
    e2(api.web)
    api.crm.send("identify", userId="u1", traits={"plan": "enterprise"}, at=at(minutes=20))
    _, body = await api.get(f"{USERS}/user_id:u1/traits", verbose="true", include="plan")
    assert body["traits"] == {
        "plan": {"value": "enterprise", "source_id": "crm", "updated_at": "2026-01-05T09:20:00.000Z"}
    }


# -- external ids -----------------------------------------------------------------------------------


async def test_external_ids_full_body_and_include(api: Api) -> None:
    e2(api.web)
    status, body = await api.get(f"{USERS}/user_id:u1/external_ids")
    assert status == 200
    assert body == {
        "data": [
            {
                "source_id": "web",
                "collection": "users",
                "id": "a1",
                "type": "anonymous_id",
                "created_at": "2026-01-05T09:00:00.000Z",
                "encoding": "none",
                "first_message_id": "m1",
            },
            {
                "source_id": "web",
                "collection": "users",
                "id": "j@x.io",
                "type": "email",
                "created_at": "2026-01-05T09:10:00.000Z",
                "encoding": "none",
                "first_message_id": "m4",
            },
            {
                "source_id": "web",
                "collection": "users",
                "id": "u1",
                "type": "user_id",
                "created_at": "2026-01-05T09:10:00.000Z",
                "encoding": "none",
                "first_message_id": "m4",
            },
        ],
        "cursor": {"url": f"{USERS}/user_id:u1/external_ids", "has_more": False, "next": "", "limit": 10},
    }
    _, only = await api.get(f"{USERS}/user_id:u1/external_ids", include="USER_ID,Email", verbose="true")
    assert [(item["type"], item["id"]) for item in only["data"]] == [("email", "j@x.io"), ("user_id", "u1")]
    assert only["data"][1]["last_seen"] == "2026-01-05T09:10:00.000Z"
    assert only["data"][1]["suspect"] is False and only["data"][1]["retired"] is False


async def test_external_ids_page_with_next_without_gaps_or_repeats(api: Api) -> None:
    api.web.send("identify", userId="u1", anonymousId="a0", at=at(minutes=0))
    for number in range(1, 5):
        api.web.send("track", userId="u1", anonymousId=f"a{number}", at=at(minutes=number))
    seen: list[str] = []
    params: dict[str, str] = {"limit": "2"}
    while True:
        status, body = await api.get(f"{USERS}/user_id:u1/external_ids", **params)
        assert status == 200
        seen += [f"{item['type']}:{item['id']}" for item in body["data"]]
        if not body["cursor"]["has_more"]:
            break
        params["next"] = body["cursor"]["next"]
    assert seen == ["anonymous_id:a0", "user_id:u1", *(f"anonymous_id:a{n}" for n in range(1, 5))]


# -- events -------------------------------------------------------------------------------------------


async def test_events_newest_first_with_segments_event_shape(api: Api) -> None:
    e2(api.web)
    root = api.root("user_id:u1")
    status, body = await api.get(f"{USERS}/user_id:u1/events")
    assert status == 200
    assert [item["message_id"] for item in body["data"]] == ["m4", "m3", "m2", "m1"]
    assert body["data"][0] == {
        "external_ids": [
            {"collection": "users", "type": "user_id", "id": "u1", "encoding": "none"},
            {"collection": "users", "type": "anonymous_id", "id": "a1", "encoding": "none"},
            {"collection": "users", "type": "email", "id": "j@x.io", "encoding": "none"},
        ],
        "context": {"library": {"name": "analytics.js", "version": "3.2.5"}},
        "type": "identify",
        "message_id": "m4",
        "source_id": "web",
        "timestamp": "2026-01-05T09:10:00.000Z",
        "related": {"users": root},
        "event": None,  # every row has event and properties, as Segment's do
        "properties": {},
        "traits": {"email": "J@X.io", "plan": "pro", "age": 41},
    }
    assert body["data"][3] == {
        "external_ids": [{"collection": "users", "type": "anonymous_id", "id": "a1", "encoding": "none"}],
        "context": {"ip": "10.0.0.1"},
        "type": "page",
        "message_id": "m1",
        "source_id": "web",
        "timestamp": "2026-01-05T09:00:00.000Z",
        "related": {"users": root},
        "event": None,
        "properties": {"path": "/p0"},
        "name": "Page 0",
    }
    assert body["cursor"] == {"url": f"{USERS}/user_id:u1/events", "has_more": False, "next": "", "limit": 10}


async def test_events_sort_start_end_include_exclude(api: Api) -> None:
    e2(api.web)
    api.web.send("track", userId="u1", event="Order Completed", properties={"total": 9}, at=at(minutes=30))

    async def ids(**params: str) -> list[str]:
        status, body = await api.get(f"{USERS}/user_id:u1/events", **params)
        assert status == 200, body
        return [item["message_id"] for item in body["data"]]

    assert await ids(sort="asc") == ["m1", "m2", "m3", "m4", "m5"]
    assert await ids(start="2026-01-05T09:01:00Z", end="2026-01-05T09:10:00Z") == ["m3", "m2"]
    assert await ids(start="2026-01-05", end="2026-01-06", sort="asc", limit="2") == ["m1", "m2"]
    assert await ids(include="Order Completed") == ["m5"]
    assert await ids(include="Page 1,Page 2") == ["m3", "m2"]
    assert await ids(exclude="Page 0,Page 1,Page 2") == ["m5", "m4"]
    _, body = await api.get(f"{USERS}/user_id:u1/events", include="Order Completed")
    assert body["data"][0]["event"] == "Order Completed"
    assert body["data"][0]["properties"] == {"total": 9}


async def test_event_external_ids_are_only_the_identifiers_the_profile_holds(api: Api) -> None:
    """SPEC E6: the later anonymous page on the library computer lands on Bob, but `lib1` stays Alice's
    (suspect): Bob's events must not list it as one of his identifiers."""
    api.web.send("identify", userId="alice", anonymousId="lib1", at=at(minutes=1))
    api.web.send("identify", userId="bob", anonymousId="lib1", at=at(minutes=2))
    api.web.send("page", anonymousId="lib1", name="Later", at=at(minutes=3))
    status, bob = await api.get(f"{USERS}/user_id:bob/events")
    assert status == 200
    assert [(item["message_id"], item["external_ids"]) for item in bob["data"]] == [
        ("m3", []),
        ("m2", [{"collection": "users", "type": "user_id", "id": "bob", "encoding": "none"}]),
    ]
    _, alice = await api.get(f"{USERS}/user_id:alice/events")
    assert [(item["message_id"], [i["id"] for i in item["external_ids"]]) for item in alice["data"]] == [
        ("m1", ["alice", "lib1"])
    ]
    # Nor an id a refused merge left on another profile (push tokens never merge, DEFAULTS.md).
    device = {"device": {"type": "android", "token": "tok1"}}
    api.web.send("identify", userId="carol", at=at(minutes=4))
    api.web.send("track", anonymousId="x1", event="Opened", context=device, at=at(minutes=5))
    api.web.send("track", userId="carol", event="Opened", context=device, at=at(minutes=6))
    assert api.root("user_id:carol") != api.root("android.push_token:tok1")
    _, carol = await api.get(f"{USERS}/user_id:carol/events")
    assert [i["id"] for i in carol["data"][0]["external_ids"]] == ["carol"]


async def test_an_accounts_events_leave_out_an_identifier_dropped_from_the_message(api: Api) -> None:
    """A group call with a blocked anonymousId: the drop is recorded on the user's profile, and the
    account's events listed `anonymous_id:null` among the message's identifiers (the users' side did not)."""
    api.web.send("group", userId="u1", groupId="acme", anonymousId="null", at=at(minutes=1))
    for path in (f"{ACCOUNTS}/group_id:acme/events", f"{USERS}/user_id:u1/events"):
        _, page = await api.get(path)
        assert [(i["type"], i["id"]) for i in page["data"][0]["external_ids"]] == [
            ("user_id", "u1"),
            ("group_id", "acme"),
        ], path


async def test_a_page_of_a_huge_profile_reads_as_much_as_one_of_a_small_one(api: Api) -> None:
    """Counted in SQLite VM steps, not timed. Before: an events page read every drop of the profile (a
    bot sending a blocked anonymousId: 0.4 s per page at 100,000 messages, on the event loop), a links
    page every link of the account (0.16 s with 100,000 users), merges every suspect of the space
    (0.16 s with 50,000), a traits page every trait (37 ms, 89 ms verbose, at 50,000 keys): each grew
    with the profile or the space."""
    store = api.world.store
    reader = store._reader()  # type: ignore[attr-defined]  # these reads run on the event loop's thread
    batch = 0

    def grow(count: int) -> None:
        nonlocal batch
        batch += 1
        raws = []
        for number in range(count):
            tag = f"{batch}_{number}"
            raws.append(api.web.message("track", userId="bot", anonymousId="undefined"))
            raws.append(
                api.web.message("identify", userId="bot", traits={f"k{tag}_{n}": n for n in range(5)})
            )
            raws.append(api.web.message("group", userId=f"u{tag}", groupId="acme"))
            for side in (0, 1):  # a suspect anonymous id elsewhere in the space
                raws.append(api.web.message("identify", userId=f"s{tag}_{side}", anonymousId=f"sa{tag}"))
        api.web.ingest(raws)

    async def steps() -> dict[str, int]:
        _, first = await api.get(f"{ACCOUNTS}/group_id:acme/links", limit=3)
        paths = {
            "events": (f"{USERS}/user_id:bot/events", {"limit": 3}),
            "links": (f"{ACCOUNTS}/group_id:acme/links", {"limit": 3}),
            "links, next page": (
                f"{ACCOUNTS}/group_id:acme/links",
                {"limit": 3, "next": first["cursor"]["next"]},
            ),
            "merges": (f"{USERS}/user_id:s1_0_0/merges", {}),
            "traits": (f"{USERS}/user_id:bot/traits", {"limit": 3}),
            "traits, verbose, next page": (
                f"{USERS}/user_id:bot/traits",
                {"limit": 3, "verbose": "true", "next": "k1_2"},
            ),
        }
        counted = {}
        for name, (path, params) in paths.items():
            with counted_steps(reader) as count:
                status, _ = await api.get(path, **params)
            assert status == 200, name
            counted[name] = count[0]
        return counted

    grow(5)
    small = await steps()
    grow(300)
    big = await steps()
    assert {name: big[name] < 2 * small[name] for name in small} == dict.fromkeys(small, True), (small, big)


async def test_a_config_change_leaves_stored_identifiers_found_and_in_their_collection(
    tmp_path: Path,
) -> None:
    # company_id is an accounts type that the config later drops, crm_id is later lower-cased: what is
    # stored keeps its collection and spelling, and the API must still find it and label it so.
    before = CONFIG + "[spaces.app.identifiers.company_id]\ncollection = 'accounts'\n"
    world = open_world(tmp_path, before)
    external = [
        {"id": "CO-1", "type": "company_id", "collection": "accounts", "encoding": "none"},
        {"id": "AbC", "type": "crm_id", "collection": "users", "encoding": "none"},
    ]
    world.space("app", "web").send("track", userId="u1", context={"externalIds": external}, at=at(minutes=1))
    world.close()
    world = World(
        open_store(f"sqlite:///{tmp_path}/idstitch.db"),
        config_from_toml(CONFIG + "[spaces.app.identifiers.crm_id]\nnormalise = 'lower'\n"),
    )
    transport = httpx.ASGITransport(app=ProfileAPI(world.engine, rate_limiter=RateLimiter(Clock())))
    headers = {"Authorization": basic("pt_app")}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://idstitch.test") as client:
            users = await client.get(f"{USERS}/crm_id:AbC/events", headers=headers)
            accounts = await client.get(f"{ACCOUNTS}/company_id:CO-1/events", headers=headers)
    finally:
        world.close()
    assert users.status_code == 200 and accounts.status_code == 200
    listed = {(item["type"], item["collection"]) for item in accounts.json()["data"][0]["external_ids"]}
    assert listed == {("user_id", "users"), ("crm_id", "users"), ("company_id", "accounts")}


async def test_event_pages_are_stable_while_new_events_arrive(api: Api) -> None:
    for minute in range(25):
        api.web.send("track", userId="u1", event="Viewed", at=at(minutes=minute))
    seen: list[str] = []
    params: dict[str, str] = {"limit": "10"}
    while True:
        status, body = await api.get(f"{USERS}/user_id:u1/events", **params)
        assert status == 200
        seen += [item["message_id"] for item in body["data"]]
        # new events arrive between pages, newer than everything paged so far
        api.web.send("track", userId="u1", event="Viewed", at=at(days=1, minutes=len(seen)))
        if not body["cursor"]["has_more"]:
            break
        params["next"] = body["cursor"]["next"]
    assert seen == [f"m{n}" for n in range(25, 0, -1)]
    # Segment's cursor format: base64 of "<nanoseconds>::<message_id>"
    _, first = await api.get(f"{USERS}/user_id:u1/events", limit="1")
    cursor = first["cursor"]["next"]
    decoded = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    nanos, _, message_id = decoded.partition("::")
    assert message_id == first["data"][0]["message_id"] and int(nanos) > 0


# -- links, metadata --------------------------------------------------------------------------------


async def test_links_on_both_sides_of_an_account(api: Api) -> None:
    """SPEC E8: group calls link users and an account; links on either side list the other."""
    api.web.send("group", userId="u1", groupId="acme", traits={"name": "Acme"}, at=at(minutes=1))
    api.web.send("group", userId="u2", groupId="acme", at=at(minutes=2))
    status, body = await api.get(f"{USERS}/user_id:u1/links")
    assert status == 200
    assert body == {
        "data": [
            {
                "to_collection": "accounts",
                "external_ids": [
                    {
                        "source_id": "web",
                        "collection": "accounts",
                        "id": "acme",
                        "type": "group_id",
                        "created_at": "2026-01-05T09:01:00.000Z",
                        "encoding": "none",
                        "first_message_id": "m1",
                    }
                ],
            }
        ],
        "cursor": {"url": f"{USERS}/user_id:u1/links", "has_more": False, "next": "", "limit": 20},
    }
    status, account = await api.get(f"{ACCOUNTS}/group_id:acme/links", limit="1")
    assert status == 200
    assert [item["external_ids"][0]["id"] for item in account["data"]] == ["u1"]
    assert account["data"][0]["to_collection"] == "users" and account["cursor"]["has_more"] is True
    _, rest = await api.get(f"{ACCOUNTS}/group_id:acme/links", limit="1", next=account["cursor"]["next"])
    assert [item["external_ids"][0]["id"] for item in rest["data"]] == ["u2"]
    assert rest["cursor"]["has_more"] is False
    _, traits = await api.get(f"{ACCOUNTS}/group_id:acme/traits")
    assert traits["traits"] == {"name": "Acme"}
    # a user id is not an account
    assert await api.get(f"{ACCOUNTS}/user_id:u1/traits") == (404, NOT_FOUND)


async def test_links_pages_keep_their_place_while_linked_profiles_merge(api: Api) -> None:
    """Paging an account's users while they merge. Before: the cursor named the next page's first user;
    once that profile merged into another, the next page was 400 `next` does not name a link."""
    for number in range(1, 6):
        api.web.send("group", anonymousId=f"a{number}", groupId="acme", at=at(minutes=number))
    first = await api.get(f"{ACCOUNTS}/group_id:acme/links", limit="2")
    assert first[0] == 200
    shown = [item["external_ids"][0]["id"] for item in first[1]["data"]]
    assert shown == ["a1", "a2"] and first[1]["cursor"]["has_more"]
    # a3's profile (the next page's first) merges into a2's (older)
    api.web.send("identify", anonymousId="a2", traits={"email": "j@x.io"}, at=at(minutes=6))
    api.web.send("identify", anonymousId="a3", traits={"email": "j@x.io"}, at=at(minutes=7))
    cursor = first[1]["cursor"]["next"]
    pages = []
    while cursor:
        status, body = await api.get(f"{ACCOUNTS}/group_id:acme/links", limit="2", next=cursor)
        assert status == 200, body
        pages.append([sorted(item["id"] for item in link["external_ids"]) for link in body["data"]])
        cursor = body["cursor"]["next"]
    assert pages == [[["a4"], ["a5"]]]  # a3 is a2's now, listed on the page before: nothing twice or lost
    # a cursor of the earlier release (the next link's id) is still followed
    a4 = api.root("anonymous_id:a4")
    legacy = base64.urlsafe_b64encode(f'["{a4}"]'.encode()).decode().rstrip("=")
    status, body = await api.get(f"{ACCOUNTS}/group_id:acme/links", limit="2", next=legacy)
    assert status == 200 and [item["external_ids"][0]["id"] for item in body["data"]] == ["a4", "a5"]


async def test_metadata_names_first_and_last_message_and_source(api: Api) -> None:
    e2(api.web)
    api.crm.send("identify", userId="u1", traits={"plan": "enterprise"}, at=at(minutes=20))
    root = api.root("user_id:u1")
    status, body = await api.get(f"{USERS}/email:j@x.io/metadata")
    assert status == 200
    created = api.world.store.profile("app", root)
    assert created is not None
    assert body == {
        "segment_id": root,
        "metadata": {
            "created_at": "2026-01-05T09:00:00.000Z",
            "updated_at": "2027-06-01T00:00:00.000Z",  # when the last message was received
            "expires_at": None,
            "first_message_id": "m1",
            "first_source_id": "web",
            "last_message_id": "m5",
            "last_source_id": "crm",
        },
    }


# -- merges, graph ------------------------------------------------------------------------------------


async def test_merges_and_graph_explain_a_merge(api: Api) -> None:
    """SPEC E4: B {email} merges into the older A {anonymous_id}; B's id resolves to A."""
    older = api.web.send("page", anonymousId="a1", at=at(minutes=1)).profile_id
    newer = api.web.send("identify", traits={"email": "j@x.io"}, at=at(minutes=2)).profile_id
    api.web.send("identify", anonymousId="a1", traits={"email": "j@x.io"}, at=at(minutes=3))
    assert older is not None and newer is not None and older != newer
    status, body = await api.get(f"{USERS}/{newer}/merges")
    assert status == 200
    assert body == {
        "segment_id": older,
        "collection": "users",
        "merged_segment_ids": [newer],
        "merges": [
            {
                "parent": older,
                "child": newer,
                "message_id": "m3",
                "via": "email:j@x.io",
                "at": "2026-01-05T09:03:00.000Z",
            }
        ],
        "dropped": [],
        "retired": [],
        "suspects": [],
    }
    status, graph = await api.get(f"{USERS}/anonymous_id:a1/graph")
    assert status == 200
    assert graph["segment_id"] == older
    assert {node["id"]: node["kind"] for node in graph["nodes"]} == {
        older: "profile",
        newer: "profile",
        "anonymous_id:a1": "identifier",
        "email:j@x.io": "identifier",
    }
    assert sorted(
        (edge["kind"], edge["from"], edge["to"], edge["message_id"]) for edge in graph["edges"]
    ) == [
        ("merged_into", newer, older, "m3"),
        ("owns", older, "anonymous_id:a1", "m1"),
        ("owns", older, "email:j@x.io", "m2"),
    ]
    # every read of the child's id answers for the parent
    _, events = await api.get(f"{USERS}/{newer}/events", sort="asc")
    assert [item["message_id"] for item in events["data"]] == ["m1", "m2", "m3"]
    assert {item["related"]["users"] for item in events["data"]} == {older}


@pytest.mark.parametrize(
    "resource", ["metadata", "merges", "graph", "traits", "external_ids", "links", "events"]
)
@pytest.mark.parametrize("by", ["email", "segment_id"])
async def test_a_merge_committed_while_a_response_is_read_is_not_half_in_it(
    api_on: Api, monkeypatch: pytest.MonkeyPatch, resource: str, by: str
) -> None:
    """Ingest merges a profile into an older one between the read that finds the root and the reads of
    its parts. Before: metadata, merges and graph 404 for a profile that exists before and after, and
    traits, external_ids and links came back empty (moved to the new root meanwhile)."""
    api = api_on
    newer = api.web.send("identify", traits={"email": "j@x.io", "name": "Jane"}, at=at(minutes=10)).profile_id
    api.web.send("group", context={"traits": {"email": "j@x.io"}}, groupId="acme", at=at(minutes=11))
    older = api.web.send("page", anonymousId="o1", at=at(minutes=1)).profile_id
    assert newer is not None and older is not None
    path = f"{USERS}/{'email:j@x.io' if by == 'email' else newer}/{resource}"
    before = await api.get(path)
    assert before[0] == 200
    store = api.world.store
    find = store.find_profile if by == "email" else store.resolve_segment_id

    def find_then_merge(*args: Any) -> Any:
        found = find(*args)
        monkeypatch.undo()  # once
        # the older profile takes the newer one in: its identifiers, traits, events and links move
        api.web.send("identify", anonymousId="o1", traits={"email": "j@x.io"}, at=at(minutes=20))
        return found

    monkeypatch.setattr(store, "find_profile" if by == "email" else "resolve_segment_id", find_then_merge)
    assert await api.get(path) == before  # the moment before the merge, whole
    status, after = await api.get(path)
    assert status == 200 and after != before  # the next request sees the merge
    if resource in ("metadata", "merges", "graph"):
        assert after["segment_id"] == older


async def test_merges_show_identifiers_dropped_and_suspects(api: Api) -> None:
    """SPEC E6: the library computer's anonymous id is dropped from Bob's message and becomes suspect."""
    api.web.send("identify", userId="alice", anonymousId="lib1", at=at(minutes=1))
    api.web.send("identify", userId="bob", anonymousId="lib1", at=at(minutes=2))
    status, body = await api.get(f"{USERS}/user_id:bob/merges")
    assert status == 200
    assert body["merges"] == []
    assert [(item["identifier"], item["message_id"]) for item in body["dropped"]] == [
        ("anonymous_id:lib1", "m2")
    ]
    assert body["dropped"][0]["rule"]
    status, suspects = await api.get("/v1/spaces/app/identifiers/suspect", token="at_app")
    assert status == 200
    assert [(item["identifier"], item["collection"]) for item in suspects["data"]] == [
        ("anonymous_id:lib1", "users")
    ]
    assert suspects["data"][0]["evidence_type"] == "user_id"
    assert sorted(suspects["data"][0]["evidence_values"]) == ["alice", "bob"]


async def test_suspect_pages_walk_the_whole_list_once_and_a_stale_cursor_is_400(api: Api) -> None:
    """Pages now start at the mark the cursor names (read by key), not by reading the space's list."""
    for number in range(7):
        for side in (0, 1):
            api.web.send("identify", userId=f"s{number}_{side}", anonymousId=f"shared{number}")
    status, whole = await api.get("/v1/spaces/app/identifiers/suspect", token="at_app")
    assert status == 200 and len(whole["data"]) == 7
    walked: list[Any] = []
    cursor: dict[str, Any] = {}
    while True:
        params = {"limit": "3"} | ({"next": cursor["next"]} if cursor else {})
        status, page = await api.get("/v1/spaces/app/identifiers/suspect", token="at_app", **params)
        assert status == 200
        walked += page["data"]
        cursor = page["cursor"]
        if not cursor["has_more"]:
            break
    assert walked == whole["data"]
    stale = _encode_cursor(("users", "anonymous_id:never"))
    status, body = await api.get("/v1/spaces/app/identifiers/suspect", token="at_app", next=stale)
    assert status == 400 and "does not name a suspect" in body["error"]["message"]


async def test_merges_show_a_user_id_an_alias_retired(api: Api) -> None:
    """SPEC E11: the old user id stays on the profile, retired; explain says so."""
    api.web.send("identify", userId="old_id", at=at(minutes=1))
    api.web.send("alias", previousId="old_id", userId="new_id", at=at(minutes=2))
    status, body = await api.get(f"{USERS}/user_id:new_id/merges")
    assert status == 200
    assert body["retired"] == [
        {
            "identifier": "user_id:old_id",
            "first_seen": "2026-01-05T09:01:00.000Z",
            "last_seen": "2026-01-05T09:02:00.000Z",
        }
    ]


# -- space views (admin) ------------------------------------------------------------------------------


async def test_unresolved_stats_rules_need_an_admin_token(api: Api) -> None:
    """SPEC E7: a message whose only identifier is blocked is kept as unresolved."""
    api.web.send("track", anonymousId="null", event="Clicked", at=at(minutes=1))
    api.web.send("track", anonymousId="-1", event="Clicked", at=at(minutes=2))
    api.web.send("track", userId="u1", event="Clicked", at=at(minutes=3))
    status, body = await api.get("/v1/spaces/app/unresolved", token="at_app", limit="1")
    assert status == 200
    assert [item["message_id"] for item in body["data"]] == ["m2"]
    assert body["data"][0]["payload"]["anonymousId"] == "-1"
    assert body["data"][0]["source_id"] == "web" and body["data"][0]["type"] == "track"
    _, rest = await api.get("/v1/spaces/app/unresolved", token="at_app", next=body["cursor"]["next"])
    assert [item["message_id"] for item in rest["data"]] == ["m1"] and rest["cursor"]["has_more"] is False
    status, stats = await api.get("/v1/spaces/app/stats", token="at_app")
    assert status == 200
    assert stats == {
        "space": "app",
        "profiles": 1,
        "accounts": 0,
        "identifiers": 1,
        "merges": 0,
        "events": 3,
        "unresolved": 2,
        "suspect": 0,
        "dropped": 2,
    }
    status, rules = await api.get("/v1/spaces/app/rules", token="at_app")
    assert status == 200 and rules["space"] == "app"
    assert rules["rules"] == api.world.engine.rules("app").as_dict()
    for path in ("unresolved", "stats", "rules", "identifiers/suspect"):
        status, body = await api.get(f"/v1/spaces/app/{path}", token="pt_app")
        assert status == 403 and body["error"]["code"] == "forbidden", path


# -- auth, rate limit -------------------------------------------------------------------------------


async def test_tokens_are_per_space_e9(api: Api) -> None:
    e2(api.web)
    assert (await api.get(f"{USERS}/user_id:u1/traits", token="at_app"))[0] == 200  # admin reads too
    status, body = await api.get(f"{USERS}/user_id:u1/traits", token="pt_other")
    assert status == 403 and body["error"]["code"] == "forbidden"
    status, body = await api.get(f"{USERS}/user_id:u1/traits", token="nope")
    assert status == 401 and body == {
        "error": {"code": "authentication_error", "message": "unknown Profile API token"}
    }
    response = await api.client.get(f"{USERS}/user_id:u1/traits")
    assert response.status_code == 401 and response.headers["www-authenticate"].startswith("Basic")
    assert response.json()["error"]["code"] == "authentication_error"
    # the other space's token reads its own space, where u1 does not exist
    other = "/v1/spaces/other/collections/users/profiles/user_id:u1/traits"
    assert await api.get(other, token="pt_other") == (404, NOT_FOUND)


async def test_rate_limit_per_token_is_429_with_retry_after(api: Api) -> None:
    path = "/v1/spaces/other/collections/users/profiles/user_id:u1/traits"
    for _ in range(3):
        assert (await api.get(path, token="pt_other"))[0] == 404
    response = await api.client.get(path, headers={"Authorization": basic("pt_other")})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "rate_limit_error"
    # another token of the same space has its own budget
    assert (await api.get(path, token="at_other"))[0] == 404
    api.clock.now += 1.0
    assert (await api.get(path, token="pt_other"))[0] == 404


def _frozen_clock() -> float:
    return 100.0  # no refill: what was spent stays spent, whichever process spent it


def _spend_in_another_process(buckets: SharedBuckets, token: str, count: int) -> None:
    limiter = RateLimiter(_frozen_clock, buckets)
    for _ in range(count):
        if limiter.retry_after(token, 5) != 0:
            raise SystemExit(1)


def test_profile_worker_processes_share_one_budget_per_token() -> None:
    """`serve --profile-workers N` gives each token the space's rate, not N times it."""
    context = multiprocessing.get_context("spawn")  # as ProfileWorkers starts them
    buckets = SharedBuckets(context, slots=8)
    process = context.Process(target=_spend_in_another_process, args=(buckets, "pt_app", 4))
    process.start()
    process.join(60)
    assert process.exitcode == 0
    here = RateLimiter(_frozen_clock, buckets)
    assert here.retry_after("pt_app", 5) == 0  # the fifth of the second's five
    assert here.retry_after("pt_app", 5) == 1  # spent, across both processes
    assert here.retry_after("pt_other", 5) == 0  # each token has its own
    for number in range(20):  # more tokens than slots: the table starts over instead of failing
        assert here.retry_after(f"t{number}", 5) == 0
    assert here.retry_after("t19", 5) == 0


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params", "status", "code"),
    [
        (f"{USERS}/u1/traits", {}, 400, "validation_error"),
        (f"{USERS}/user_id:/traits", {}, 400, "validation_error"),
        (f"{USERS}/:u1/traits", {}, 400, "validation_error"),
        (f"{USERS}/user_id:%ZZ/traits", {}, 400, "validation_error"),  # a broken escape is no profile id
        (f"{USERS}/user_id:%C3/traits", {}, 400, "validation_error"),  # half a UTF-8 character
        ("/v1/spaces/%FF/collections/users/profiles/user_id:u1/traits", {}, 400, "validation_error"),
        ("/v1/spaces/app/collections/people/profiles/user_id:u1/traits", {}, 400, "validation_error"),
        (f"{USERS}/user_id:u1/traits", {"limit": "0"}, 400, "validation_error"),
        (f"{USERS}/user_id:u1/traits", {"limit": "201"}, 400, "validation_error"),
        (f"{USERS}/user_id:u1/events", {"limit": "101"}, 400, "validation_error"),
        (f"{USERS}/user_id:u1/links", {"limit": "x"}, 400, "validation_error"),
        (f"{USERS}/user_id:u1/traits", {"verbose": "maybe"}, 400, "validation_error"),
        (f"{USERS}/user_id:u1/traits", {"class": "segment"}, 400, "validation_error"),
        (f"{USERS}/user_id:u1/events", {"sort": "up"}, 400, "validation_error"),
        (f"{USERS}/user_id:u1/events", {"start": "yesterday"}, 400, "validation_error"),
        (f"{USERS}/user_id:u1/events", {"next": "%%%"}, 400, "invalid_request_error"),
        (f"{USERS}/user_id:u1/events", {"next": "bm90IGEgY3Vyc29y"}, 400, "invalid_request_error"),
        (f"{USERS}/user_id:u1/external_ids", {"next": "garbage!"}, 400, "invalid_request_error"),
        # A links cursor, and a list of three that is no identifier's place: was an empty or wrong page.
        (f"{USERS}/user_id:u1/external_ids", {"next": "WyJ1c2VfeCJd"}, 400, "invalid_request_error"),
        (
            f"{USERS}/user_id:u1/external_ids",
            {"next": "WyIyMDI2IiwgImEiLCAiYiJd"},
            400,
            "invalid_request_error",
        ),
        (f"{USERS}/user_id:u1/links", {"next": "WyJ1c2VfeCJd"}, 400, "invalid_request_error"),
        (f"{USERS}/user_id:u1/friends", {}, 404, "not_found"),
        (f"{USERS}/user_id:nobody/traits", {}, 404, "not_found"),
        (f"{USERS}/use_000000000000000000000000000/traits", {}, 404, "not_found"),
        ("/v1/spaces/app/nothing", {}, 404, "not_found"),
    ],
)
async def test_bad_input_gets_the_documented_4xx(
    api: Api, path: str, params: dict[str, str], status: int, code: str
) -> None:
    api.web.send("identify", userId="u1", at=at(minutes=1))
    got, body = await api.get(path, **params)
    assert (got, body["error"]["code"]) == (status, code), body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"} and body["error"]["message"]


async def test_a_repeated_parameter_and_other_methods_are_refused(api: Api) -> None:
    api.web.send("identify", userId="u1", at=at(minutes=1))
    response = await api.client.get(
        f"{USERS}/user_id:u1/traits?limit=1&limit=2", headers={"Authorization": basic("pt_app")}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request_error"
    response = await api.client.post(f"{USERS}/user_id:u1/traits", headers={"Authorization": basic("pt_app")})
    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"
    # A route that does not exist is 404 whatever the method, not "use GET".
    response = await api.client.post(
        f"{USERS}/user_id:u1/external_ids/delete", headers={"Authorization": basic("pt_app")}
    )
    assert response.status_code == 404


async def test_the_caller_is_authenticated_before_the_request_is_validated(api: Api) -> None:
    for path in (
        f"{USERS}/user_id:u1/traits",
        "/v1/spaces/app/collections/user/profiles/u1/traits",
        "/v1/spaces//stats",
    ):
        status, body = await api.get(path, token=None)
        assert (status, body["error"]["code"]) == (401, "authentication_error"), path


async def test_a_links_cursor_survives_the_merge_of_the_user_it_names(api: Api) -> None:
    # Paging through an account's users while one of them merges into another (here an alias): the
    # cursor named the merged user, whose link moved to the user it merged into; paging goes on.
    for number in (1, 2, 3):
        api.web.send("group", userId=f"u{number}", groupId="acme", at=at(minutes=number))
    _, first = await api.get(f"{ACCOUNTS}/group_id:acme/links", limit="1")
    assert [item["external_ids"][0]["id"] for item in first["data"]] == ["u1"]
    api.web.send("alias", previousId="u2", userId="u1", at=at(minutes=4))  # u2 merges into u1
    status, rest = await api.get(f"{ACCOUNTS}/group_id:acme/links", limit="1", next=first["cursor"]["next"])
    assert status == 200, rest
    assert [item["external_ids"][0]["id"] for item in rest["data"]] == ["u3"]
    assert rest["cursor"]["has_more"] is False
    # Every user once over the whole walk, the merged one under the profile it joined.
    _, whole = await api.get(f"{ACCOUNTS}/group_id:acme/links")
    assert [sorted(i["id"] for i in item["external_ids"]) for item in whole["data"]] == [["u1", "u2"], ["u3"]]


async def test_a_links_cursor_that_is_not_one_is_400(api: Api) -> None:
    api.web.send("group", userId="u1", groupId="acme", at=at(minutes=1))
    for cursor in (b'["a","b"]', b'["use_nobody"]'):
        tampered = base64.urlsafe_b64encode(cursor).decode().rstrip("=")
        status, body = await api.get(f"{USERS}/user_id:u1/links", next=tampered)
        assert (status, body["error"]["code"]) == (400, "invalid_request_error"), body


async def test_an_id_shaped_like_a_segment_id_that_names_nothing_is_404(api: Api) -> None:
    assert await api.get(f"{USERS}/use_doesnotexist/metadata") == (404, NOT_FOUND)
    assert await api.get(f"{ACCOUNTS}/acc_nope/traits") == (404, NOT_FOUND)


async def test_an_identifier_as_long_as_a_segment_id_and_with_its_prefix_is_found(api: Api) -> None:
    # `use_ref:` plus 23 characters is 31 long and starts with `use_`, as a segment id does; a segment id
    # never holds a colon, so this is the identifier it reads as, stored and found like any other.
    ids = [("use_ref", "a" * 23), ("acc_no", "b" * 24)]
    externals = [
        {"id": value, "type": kind, "collection": "users", "encoding": "none"} for kind, value in ids
    ]
    api.web.send("identify", userId="u1", context={"externalIds": externals}, at=at(minutes=1))
    for kind, value in ids:
        assert len(f"{kind}:{value}") == 31
        status, body = await api.get(f"{USERS}/{kind}:{value}/metadata")
        assert status == 200, body
        assert body["segment_id"] == api.root("user_id:u1")


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_nul_in_an_id_a_filter_or_a_cursor_is_read_as_the_tracking_api_stores_it(
    tmp_path: Path, request: pytest.FixtureRequest, kind: str
) -> None:
    # No stored text holds a NUL: the Tracking API stores U+FFFD in its place. PostgreSQL refuses a NUL in
    # a query parameter, so `%00` in a profile id, an events filter or an events cursor was a 500 there
    # (SQLite answered); it is read as U+FFFD on every store, as it would have been stored.
    url = f"sqlite:///{tmp_path}/s.db" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    world = World(open_store(url), config_from_toml(CONFIG))
    web = world.space("app", "web")
    web.send("track", userId="u1", event="Ev\ufffdent", at=at(minutes=1))
    web.send("track", userId="u1", event="Other", at=at(minutes=2))
    transport = httpx.ASGITransport(app=ProfileAPI(world.engine, rate_limiter=RateLimiter(Clock())))
    headers = {"Authorization": basic("pt_app")}
    async with httpx.AsyncClient(transport=transport, base_url="http://idstitch.test") as client:

        async def get(path: str) -> tuple[int, Any]:
            response = await client.get(path, headers=headers)
            return response.status_code, response.json()

        assert await get(f"{USERS}/user_id:u%001/traits") == (404, NOT_FOUND)
        assert await get(f"{USERS}/us%00er_id:u1/traits") == (404, NOT_FOUND)
        status, body = await get(f"{USERS}/user_id:u1/events?include=Ev%00ent")
        assert status == 200 and [item["event"] for item in body["data"]] == ["Ev\ufffdent"], body
        status, body = await get(f"{USERS}/user_id:u1/events?exclude=Ev%00ent")
        assert status == 200 and [item["event"] for item in body["data"]] == ["Other"], body
        cursor = base64.urlsafe_b64encode(b"0::m\x00").decode().rstrip("=")
        status, body = await get(f"{USERS}/user_id:u1/events?next={cursor}&sort=asc")
        assert status == 200, body
    world.close()


async def test_metadata_is_never_updated_before_it_was_created(api: Api) -> None:
    # A client clock a year ahead: the profile is created at the message's time, after it was received.
    api.web.send("identify", userId="u9", at=at(days=900))
    status, body = await api.get(f"{USERS}/user_id:u9/metadata")
    assert status == 200
    metadata = body["metadata"]
    assert metadata["updated_at"] >= metadata["created_at"]
    assert metadata["updated_at"] == metadata["created_at"] == format_timestamp(at(days=900))


async def test_openapi_document_is_served(api: Api) -> None:
    response = await api.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"] == "3.1.0"
    assert "/v1/spaces/{space}/collections/{collection}/profiles/{id}/traits" in document["paths"]
    assert "/v1/spaces/{space}/stats" in document["paths"]


def test_generated_tokens_are_kept_and_only_configured_tokens_count_under_a_config(tmp_path: Path) -> None:
    world = open_world(tmp_path)  # no config: tokens are generated once and kept in the store
    created = {token.kind: token for token in world.engine.created_tokens}
    assert set(created) == {"read", "admin"}
    assert created["read"].token.startswith("pt_") and created["admin"].token.startswith("at_")
    world.restart()
    assert world.engine.created_tokens == []
    assert world.engine.token(created["read"].token) == created["read"]
    configured = World(world.store, config_from_toml("[spaces.default]\nprofile_tokens = ['pt_mine']\n"))
    assert configured.engine.token(created["read"].token) is None
    assert configured.engine.token(created["admin"].token) is None
    token = configured.engine.token("pt_mine")
    assert token is not None and (token.space, token.kind) == ("default", "read")
    world.close()


async def test_encoded_ids_legacy_namespaces_path_and_head(api: Api) -> None:
    api.web.send("identify", userId="+1 555/0123", traits={"plan": "pro"}, at=at(minutes=1))
    expected = {"plan": "pro"}
    # `:` may be encoded too; `+` and `/` in a value must be (%2B, %2F), as Segment's docs say
    for encoded in ("user_id%3A%2B1%20555%2F0123", "USER_ID:%2B1%20555%2F0123"):
        status, body = await api.get(f"{USERS}/{encoded}/traits")
        assert (status, body["traits"]) == (200, expected), encoded
    legacy = "/v1/namespaces/app/collections/users/profiles/user_id:%2B1%20555%2F0123/traits"
    assert (await api.get(legacy))[1]["traits"] == expected
    head = await api.client.head(
        f"{USERS}/user_id:%2B1%20555%2F0123/traits", headers={"Authorization": basic("pt_app")}
    )
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0


def test_a_read_only_engine_never_writes_and_sees_types_the_writer_learns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a `--profile-workers` process runs: a read-only store and engine beside the writing one."""
    world = open_world(tmp_path, CONFIG)
    store = open_store(world.store.url, read_only=True)
    reader = Engine(store, world.config, read_only=True)
    assert reader.token("pt_app") is not None and not reader.rules("app").knows("crm_id")
    external = {"id": "c1", "type": "crm_id", "collection": "users", "encoding": "none"}
    world.space("app", "web").send(
        "track", userId="u1", context={"externalIds": [external]}, at=at(minutes=1)
    )
    monkeypatch.setattr(engine_module, "_READER_RULES_SECONDS", 0.0)
    assert reader.rules("app").knows("crm_id")
    assert store.find_profile("app", Identifier("crm_id", "c1")) == world.space("app").profile_of(
        "user_id:u1"
    )
    with pytest.raises(ConfigError, match="read-only"), store.transaction():
        pass
    store.close()
    world.close()
