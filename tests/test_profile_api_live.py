"""The Profile API on a real `idstitch serve` process: what a support tool does with httpx while ingest
runs, schemathesis against the served `/openapi.json`, and the one-port / two-port set-ups.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from idstitch.http.server import _remove_orphaned_metrics_dirs
from live_server import ADMIN_TOKEN, PROFILE_TOKEN, WRITE_KEY, Server, free_port

USERS = "/v1/spaces/default/collections/users/profiles"


def basic(token: str) -> httpx.BasicAuth:
    return httpx.BasicAuth(token, "")


def batch(messages: list[dict[str, Any]]) -> dict[str, Any]:
    return {"batch": messages}


def send(client: httpx.Client, messages: list[dict[str, Any]]) -> None:
    response = client.post("/v1/batch", json=batch(messages), auth=basic(WRITE_KEY))
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True}


def event(number: int, **fields: Any) -> dict[str, Any]:
    """A track of user jane, one second apart from the previous number."""
    minute, second = divmod(number, 60)
    return {
        "type": "track",
        "userId": "jane",
        "event": "Viewed",
        "messageId": f"view-{number}",
        "timestamp": f"2026-03-01T10:{minute:02d}:{second:02d}.000Z",
        "properties": {"n": number},
        **fields,
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = Server(tmp_path_factory.mktemp("profile-api") / "server")
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_a_support_tool_looks_up_by_email_pages_events_while_ingest_runs_and_lists_links(
    server: Server,
) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        send(
            client,
            [
                {
                    "type": "identify",
                    "userId": "jane",
                    "anonymousId": "anon-jane",
                    "messageId": "jane-signup",
                    "traits": {"email": "jane@example.com", "name": "Jane"},
                    "timestamp": "2026-03-01T09:00:00.000Z",
                },
                {"type": "group", "userId": "jane", "groupId": "acme", "traits": {"name": "Acme"}},
                {"type": "group", "userId": "joe", "groupId": "acme", "messageId": "joe-joins"},
            ],
        )
        for start in range(0, 250, 50):
            send(client, [event(number) for number in range(start, start + 50)])

        # look up by email, as a support agent types it
        reads = httpx.Client(base_url=server.base_url, timeout=30, auth=basic(PROFILE_TOKEN))
        with reads:
            metadata = reads.get(f"{USERS}/email:Jane@Example.com/metadata")
            assert metadata.status_code == 200, metadata.text
            segment_id = metadata.json()["segment_id"]
            assert metadata.json()["metadata"]["first_message_id"] == "jane-signup"
            traits = reads.get(f"{USERS}/{segment_id}/traits").json()["traits"]
            assert traits == {"email": "jane@example.com", "name": "Jane"}

            # page through the history while the app keeps sending new events for the same person
            stop = threading.Event()
            sent_meanwhile: list[int] = []
            landed = threading.Event()  # set after each event the sender got a 200 for

            def keep_sending() -> None:
                with httpx.Client(base_url=server.base_url, timeout=30) as writer:
                    number = 1000
                    while not stop.is_set():
                        send(writer, [event(number, timestamp="2026-03-02T00:00:00.000Z")])
                        sent_meanwhile.append(number)
                        landed.set()
                        number += 1

            sender = threading.Thread(target=keep_sending)
            sender.start()
            try:
                seen: list[str] = []
                url = f"{USERS}/{segment_id}/events?limit=100&include=Viewed&end=2026-03-02"
                while True:
                    page = reads.get(url)
                    assert page.status_code == 200, page.text
                    body = page.json()
                    seen += [item["message_id"] for item in body["data"]]
                    if not body["cursor"]["has_more"]:
                        break
                    url = body["cursor"]["url"]  # follow the cursor's URL, as Segment's clients do
                    # let new events land between every two pages
                    landed.clear()
                    assert landed.wait(30), "no event landed between two pages"
            finally:
                stop.set()
                sender.join(timeout=60)
            assert len(sent_meanwhile) >= 2, "ingest did not run while paging"
            assert seen == [f"view-{number}" for number in range(249, -1, -1)]
            # the events sent meanwhile are there too, newest first, once each
            newest = reads.get(
                f"{USERS}/{segment_id}/events",
                params={"limit": "100", "start": "2026-03-02", "include": "Viewed"},
            )
            ids = [item["message_id"] for item in newest.json()["data"]]
            assert len(ids) == len(set(ids)) == min(100, len(sent_meanwhile))

            # the links of the account
            links = reads.get("/v1/spaces/default/collections/accounts/profiles/group_id:acme/links")
            assert links.status_code == 200
            users = sorted(
                item["id"]
                for link in links.json()["data"]
                for item in link["external_ids"]
                if item["type"] == "user_id"
            )
            assert users == ["jane", "joe"]
            assert {link["to_collection"] for link in links.json()["data"]} == {"users"}


# -- schemathesis against the served document ------------------------------------------------------


def seed_for_schema_checks(server: Server) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as client:
        send(
            client,
            [
                {"type": "identify", "userId": "u1", "anonymousId": "a1", "traits": {"email": "u1@x.io"}},
                {"type": "track", "userId": "u1", "event": "Bought", "properties": {"total": 3}},
                {"type": "identify", "userId": "u2", "anonymousId": "a1"},  # a1 becomes suspect
                {"type": "group", "userId": "u1", "groupId": "g1", "traits": {"name": "G"}},
                {"type": "track", "anonymousId": "null", "event": "Junk"},  # unresolved
            ],
        )


KNOWN_USERS = ["user_id:u1", "email:U1@x.io", "anonymous_id:a1", "user_id:u2"]


def test_every_response_matches_the_served_openapi_document(server: Server) -> None:
    """schemathesis on every operation of the served document: no 5xx, and every answer (4xx included)
    has a documented status, content type and headers and matches its schema.

    Generated path parameters mostly name no space or profile, so part of the cases are steered to the
    seeded space and profiles, where the 200 answers are.
    """
    seed_for_schema_checks(server)
    api = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) == 11
    statuses: dict[str, set[int]] = defaultdict(set)
    for operation in operations:
        check_operation(operation, server.base_url, statuses[operation.label])
    # the steering reached the answers that matter, not only the errors
    missing = {label: seen for label, seen in statuses.items() if 200 not in seen}
    assert not missing, missing
    assert set().union(*statuses.values()) >= {200, 403, 404}, statuses


def check_operation(operation: Any, base_url: str, statuses: set[int]) -> None:
    """Run schemathesis' checks on generated cases of one operation, noting the statuses seen."""

    @given(
        case=operation.as_strategy(),
        steer=st.sampled_from(["as generated", "known space", "known profile"]),
        token=st.sampled_from([PROFILE_TOKEN, ADMIN_TOKEN]),
        known=st.sampled_from(KNOWN_USERS),
    )
    # derandomize: the same cases every run, so whether the steering reaches each 200 does not
    # depend on the draw (one run in several missed the graph route's 200 with a random draw).
    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
        derandomize=True,
    )
    def check(case: Any, steer: str, token: str, known: str) -> None:
        # A cursor is a value only the server makes; arbitrary ones are refused with 400 (see
        # test_profile_api.py), which schemathesis would count as a valid request rejected.
        case.query = {key: value for key, value in (case.query or {}).items() if key != "next"}
        if steer != "as generated":
            case.path_parameters = {**case.path_parameters, "space": "default"}
            if steer == "known profile" and "id" in case.path_parameters:
                accounts = case.path_parameters.get("collection") == "accounts"
                case.path_parameters["id"] = "group_id:g1" if accounts else known
        authorization = "Basic " + base64.b64encode(f"{token}:".encode()).decode()
        response = case.call_and_validate(base_url=base_url, headers={"Authorization": authorization})
        statuses.add(response.status_code)

    check()


# -- how serve is set up ---------------------------------------------------------------------------------


def test_a_first_run_without_config_prints_profile_api_tokens_that_work(tmp_path: Path) -> None:
    server = Server(tmp_path / "server")
    del server.env["IDSTITCH_PROFILE_TOKEN"], server.env["IDSTITCH_ADMIN_TOKEN"]
    server.start()
    try:
        log = server.log()
        read = re.search(r"created Profile API read token (pt_\S+) for space default", log)
        admin = re.search(r"created Profile API admin token (at_\S+) for space default", log)
        assert read and admin, log
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            send(client, [{"type": "identify", "userId": "u1"}])
            found = client.get(f"{USERS}/user_id:u1/traits", auth=basic(read.group(1)))
            assert found.status_code == 200
            stats = client.get("/v1/spaces/default/stats", auth=basic(admin.group(1)))
            assert stats.status_code == 200 and stats.json()["profiles"] == 1
            assert client.get("/v1/spaces/default/stats", auth=basic(read.group(1))).status_code == 403
    finally:
        server.stop()
    # a restart keeps the tokens (they live in the store) and prints nothing new
    server.start()
    try:
        assert "created Profile API" not in server.log()
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            assert client.get(f"{USERS}/user_id:u1/traits", auth=basic(read.group(1))).status_code == 200
    finally:
        server.stop()


def test_the_profile_api_can_have_its_own_port(tmp_path: Path) -> None:
    profile_port = free_port()
    server = Server(tmp_path / "server", args=("--profile-port", str(profile_port)))
    server.start()
    try:
        profile_url = f"http://127.0.0.1:{profile_port}"
        assert f"(Tracking API), {profile_url} (Profile API)" in server.log()
        with httpx.Client(base_url=server.base_url, timeout=30) as tracking:
            send(tracking, [{"type": "identify", "userId": "u1", "traits": {"plan": "pro"}}])
            # the tracking port does not answer profile reads
            assert tracking.get(f"{USERS}/user_id:u1/traits", auth=basic(PROFILE_TOKEN)).status_code == 404
        with httpx.Client(base_url=profile_url, timeout=30, auth=basic(PROFILE_TOKEN)) as profiles:
            answer = profiles.get(f"{USERS}/user_id:u1/traits")
            assert answer.status_code == 200 and answer.json()["traits"] == {"plan": "pro"}
            assert profiles.get("/openapi.json").status_code == 200
            assert profiles.post("/v1/batch", json=batch([])).status_code == 404  # not a route of this port
        with httpx.Client(base_url=server.base_url, timeout=30) as tracking:
            metrics = tracking.get("/metrics").text
        route = 'route="/v1/spaces/{space}/collections/users/profiles/{id}/traits",status="200"'
        assert f"idstitch_http_request_duration_seconds_count{{{route}}} 1.0" in metrics
    finally:
        server.stop()


def worker_pids(server: Server) -> set[int]:
    """Pids of the server's Profile API worker processes (its children)."""
    assert server.process is not None
    tasks = Path(f"/proc/{server.process.pid}/task").iterdir()  # a thread's children are listed under it
    children = [pid for task in tasks for pid in (task / "children").read_text().split()]
    return {int(pid) for pid in children if "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()}


def test_profile_workers_serve_reads_from_processes_of_their_own(tmp_path: Path) -> None:
    profile_port = free_port()
    server = Server(tmp_path / "server", args=("--profile-port", str(profile_port), "--profile-workers", "2"))
    server.start()
    profile_url = f"http://127.0.0.1:{profile_port}"
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as tracking:
            send(tracking, [{"type": "identify", "userId": "u1", "traits": {"plan": "pro"}}])
            assert tracking.get(f"{USERS}/user_id:u1/traits", auth=basic(PROFILE_TOKEN)).status_code == 404
        deadline = time.monotonic() + 30
        while len(worker_pids(server)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = worker_pids(server)
        assert len(workers) == 2
        with httpx.Client(base_url=profile_url, timeout=30, auth=basic(PROFILE_TOKEN)) as profiles:
            # a write is visible to the workers as soon as its request returned
            for number in range(20):
                answer = profiles.get(f"{USERS}/user_id:u1/traits")
                assert answer.status_code == 200 and answer.json()["traits"] == {"plan": "pro"}, number
            # a worker that dies is replaced, and the port keeps answering meanwhile (new connections:
            # a keep-alive connection the dead worker held dies with it, as with any crashed server)
            os.kill(next(iter(workers)), signal.SIGKILL)
            for _ in range(20):
                fresh = httpx.get(
                    f"{profile_url}{USERS}/user_id:u1/traits", auth=basic(PROFILE_TOKEN), timeout=30
                )
                assert fresh.status_code == 200
            while (
                len(worker_pids(server)) < 2 or worker_pids(server) == workers - {next(iter(workers))}
            ) and (time.monotonic() < deadline):
                time.sleep(0.05)
            assert len(worker_pids(server)) == 2
        # the server's /metrics counts the workers' requests, the killed one's included
        route = 'route="/v1/spaces/{space}/collections/users/profiles/{id}/traits",status="200"'
        counted = f"idstitch_http_request_duration_seconds_count{{{route}}} 40.0"
        metrics = ""
        while counted not in metrics and time.monotonic() < deadline:
            metrics = httpx.get(f"{server.base_url}/metrics", timeout=30).text
            time.sleep(0.05)
        assert counted in metrics, metrics
        assert metrics.count("# TYPE idstitch_http_request_duration_seconds histogram") == 1
        assert "idstitch_http_request_duration_seconds" in {
            family.name for family in text_string_to_metric_families(metrics)
        }  # still one valid exposition
    finally:
        remaining = worker_pids(server)
        server.stop()  # SIGTERM: exit 0 (asserted by stop)
    for pid in remaining:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_killed_servers_worker_metrics_directory_is_removed_by_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no process now
    orphan = tmp_path / f"idstitch-profile-metrics-{dead.pid}-abc"
    alive = tmp_path / f"idstitch-profile-metrics-{os.getpid()}-def"
    for path in (orphan, alive):
        path.mkdir()
        (path / "histogram_1.db").write_bytes(b"x")
    _remove_orphaned_metrics_dirs()
    assert not orphan.exists() and alive.exists()
