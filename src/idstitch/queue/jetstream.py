"""NATS JetStream plumbing of queue mode: the queue URL, the connection, the stream and the workers' consumer.

The stream uses *work-queue* retention on file storage. It is a buffer between the Tracking API and the
workers, not the system of record: every stored event keeps its raw payload in the store, so replays
read the store, and a message a worker has committed and acknowledged has no reason to stay on disk.
With work-queue retention an acknowledgement deletes the message, so the stream holds exactly the
backlog, and its size is the lag. `discard=new`: a stream that hits a limit an operator set refuses
new publishes (the Tracking API answers 429, clients retry) instead of silently dropping old messages
that were acknowledged to a client but not yet resolved.

A stream that disappears (deleted, or lost in a NATS restart without persistent storage) is created
again, as at start-up: by a publisher whose publish finds no stream, by a worker that finds its
consumer gone. Requests a worker cannot resolve are *parked*: copied, bytes unchanged, to a dead-letter
stream of their own (`<stream>_DEAD`, subjects `<subject>_dead.<space>`, limits retention: kept until
an operator replays or deletes them; see `idstitch.queue.parked`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, urlsplit, urlunsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    ConsumerInfo,
    DeliverPolicy,
    DiscardPolicy,
    PubAck,
    RetentionPolicy,
    StorageType,
    StreamConfig,
    StreamInfo,
)

from idstitch.core.errors import ConfigError
from idstitch.group_commit import WriterBusy

__all__ = [
    "DEFAULT_ACK_WAIT",
    "DEFAULT_CONSUMER",
    "DEFAULT_STREAM",
    "DEFAULT_SUBJECT",
    "PARKED_DELIVERIES",
    "PARKED_REASON",
    "PARKED_SEQUENCE",
    "PARKED_STREAM",
    "PARKED_SUBJECT",
    "JetStream",
    "QueueConfig",
    "QueueUnavailable",
    "jetstream_unanswered",
    "parse_queue_url",
]

DEFAULT_STREAM: Final = "IDSTITCH"
DEFAULT_SUBJECT: Final = "idstitch.ingest"
DEFAULT_CONSUMER: Final = "idstitch-workers"
DEFAULT_ACK_WAIT: Final = 60.0  # seconds; workers also report progress while a long group commits
DEFAULT_MAX_ACK_PENDING: Final = 10_000  # delivered, unacknowledged messages over all workers together
DUPLICATE_WINDOW: Final = 120.0  # seconds in which a re-sent publish (same Nats-Msg-Id) is stored once

# The headers of a parked request: why it was parked, and where it came from.
PARKED_REASON: Final = "Idstitch-Parked-Reason"
PARKED_STREAM: Final = "Idstitch-Original-Stream"
PARKED_SUBJECT: Final = "Idstitch-Original-Subject"
PARKED_SEQUENCE: Final = "Idstitch-Original-Sequence"
PARKED_DELIVERIES: Final = "Idstitch-Deliveries"
_MAX_REASON = 500  # characters of the reason header: the log line has it whole

_NAME = re.compile(r"[A-Za-z0-9_-]{1,200}")  # stream and consumer names: no dots, wildcards or blanks
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_PARAMETERS = ("stream", "subject", "consumer", "ack_wait")
_log = logging.getLogger("idstitch.queue")


class QueueUnavailable(WriterBusy):
    """JetStream cannot take the request now (unreachable, or the stream refuses); retry later.

    A `WriterBusy`: the Tracking API answers 429 with Retry-After, which every Segment client retries.
    """


@dataclass(frozen=True, slots=True)
class QueueConfig:
    """Where queue mode's messages go: the NATS servers, the stream, its subjects and the workers' consumer."""

    servers: tuple[str, ...]
    stream: str = DEFAULT_STREAM
    subject: str = DEFAULT_SUBJECT  # the prefix: a space's requests go to `<subject>.<space>`
    consumer: str = DEFAULT_CONSUMER
    ack_wait: float = DEFAULT_ACK_WAIT

    @property
    def filter_subject(self) -> str:
        """Every subject of the stream: the prefix and any space."""
        return f"{self.subject}.>"

    def subject_for(self, space: str) -> str:
        """The subject a space's requests are published to."""
        return f"{self.subject}.{_subject_token(space)}"

    @property
    def dead_stream(self) -> str:
        """The dead-letter stream, where workers park the requests they cannot resolve."""
        return f"{self.stream}_DEAD"

    @property
    def dead_filter_subject(self) -> str:
        """Every subject of the dead-letter stream.

        Beside the stream's subjects, not under them: two streams may not share a subject.
        """
        return f"{self.subject}_dead.>"

    def dead_subject_for(self, subject: str) -> str:
        """The dead-letter subject of a request published to `subject`: the same space token."""
        return f"{self.subject}_dead{subject.removeprefix(self.subject)}"

    @property
    def shown_servers(self) -> str:
        """The servers for humans and logs, without credentials."""
        return ",".join(_without_credentials(server) for server in self.servers)


def parse_queue_url(url: str) -> QueueConfig:
    """`nats://host:port[,nats://other:port][?stream=NAME&subject=PREFIX&consumer=NAME&ack_wait=SECONDS]`."""
    base, _, query = url.partition("?")
    servers = tuple(part.strip() for part in base.split(",") if part.strip())
    if not servers:
        raise ConfigError(f"queue URL {url!r}: expected nats://host:port")
    for server in servers:
        parts = urlsplit(server)
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise ConfigError(f"queue URL {_without_credentials(server)!r}: expected nats://host:port")
        try:
            parts.port  # noqa: B018  # raises on a port that is not a number
        except ValueError:
            raise ConfigError(f"queue URL {_without_credentials(server)!r}: bad port") from None
        if parts.path not in ("", "/"):
            raise ConfigError(f"queue URL {_without_credentials(server)!r}: no path expected")
    try:
        values = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigError(f"queue URL: cannot read the parameters {query!r}") from None
    unknown = sorted(set(values) - set(_PARAMETERS))
    if unknown:
        raise ConfigError(f"queue URL: unknown parameter {unknown[0]!r} (known: {', '.join(_PARAMETERS)})")
    single: dict[str, str] = {}
    for key, given in values.items():
        if len(given) != 1 or not given[0]:
            raise ConfigError(f"queue URL: give {key} once, with a value")
        single[key] = given[0]
    stream = single.get("stream", DEFAULT_STREAM)
    consumer = single.get("consumer", DEFAULT_CONSUMER)
    for key, name in (("stream", stream), ("consumer", consumer)):
        if not _NAME.fullmatch(name):
            raise ConfigError(f"queue URL: {key} {name!r} may hold only letters, digits, - and _")
    subject = single.get("subject", DEFAULT_SUBJECT)
    if not all(_TOKEN.fullmatch(token) for token in subject.split(".")):
        raise ConfigError(
            f"queue URL: subject {subject!r} must be dot-separated tokens of letters, digits, - and _"
        )
    ack_wait = DEFAULT_ACK_WAIT
    if "ack_wait" in single:
        try:
            ack_wait = float(single["ack_wait"])
        except ValueError:
            ack_wait = -1.0
        if not 1.0 <= ack_wait <= 3600.0:
            raise ConfigError("queue URL: ack_wait must be a number of seconds from 1 to 3600")
    return QueueConfig(servers, stream, subject, consumer, ack_wait)


class JetStream:
    """One NATS connection with its JetStream context, for a publisher or a worker."""

    def __init__(self, queue: QueueConfig, client: Client) -> None:
        self.queue = queue
        self.client = client
        self.js: JetStreamContext = client.jetstream()
        self.last_error: Exception | None = None
        self.stream_max_msg_size: int | None = None  # the stream's own limit, when an operator set one
        self.stream_storage = StorageType.FILE  # the stream's, for the dead-letter stream
        self.stream_replicas: int | None = None
        self._recovering = asyncio.Lock()
        self._recoveries = 0  # streams recreated: concurrent publishes that found none recreate it once
        self._quiet = True  # until connected, failures end in one error, not a log line per attempt

    @classmethod
    async def connect(
        cls, queue: QueueConfig, *, name: str, timeout: float = 10.0, ensure_stream: bool = True
    ) -> JetStream:
        """Connect (reconnecting forever once connected) and make sure the stream exists (unless told not to)."""
        connection = cls(queue, Client())
        try:
            # Reconnect without end: a NATS restart must not stop a server or a worker for good.
            await asyncio.wait_for(
                connection.client.connect(
                    servers=list(queue.servers),
                    name=name,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    connect_timeout=max(1, min(int(timeout), 5)),
                    error_cb=connection._on_error,
                    disconnected_cb=connection._on_disconnected,
                    reconnected_cb=connection._on_reconnected,
                ),
                timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as error:
            await connection.close()
            cause = connection.last_error or error
            raise QueueUnavailable(
                f"cannot connect to NATS at {queue.shown_servers} within {timeout:g} s: "
                f"{type(cause).__name__}: {cause}"
            ) from None
        connection._quiet = False
        if not ensure_stream:
            return connection  # a reader of the dead-letter stream: it must create nothing
        try:
            await connection.ensure_stream()
        except (nats.errors.Error, TimeoutError) as error:
            # Not the stream's answer (that is a ConfigError): JetStream's API did not answer at all,
            # which is what a nats-server started without `-js` does (no responders, 503).
            await connection.close()
            raise jetstream_unanswered(queue, error) from None
        except BaseException:
            await connection.close()
            raise
        return connection

    async def _on_error(self, error: Exception) -> None:
        self.last_error = error
        if not self._quiet:
            _log.warning("NATS connection error", extra={"error": f"{type(error).__name__}: {error}"})

    async def _on_disconnected(self) -> None:
        if not self._quiet:
            _log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        # nats-py hands over a ParseResult: logged as the URL a user writes, without credentials.
        url = self.client.connected_url
        _log.warning(
            "reconnected to NATS",
            extra={"server": None if url is None else _without_credentials(url.geturl())},
        )

    @property
    def max_message_bytes(self) -> int:
        """The largest JetStream message this connection may publish: the server's and the stream's limit.

        Less a margin for the headers (`Nats-Msg-Id`), which both limits count.
        """
        limit = self.client.max_payload
        if self.stream_max_msg_size is not None and self.stream_max_msg_size > 0:
            limit = min(limit, self.stream_max_msg_size)
        return limit - min(1024, limit // 8)

    async def ensure_stream(self) -> StreamInfo:
        """Create the stream, or check that an existing one of that name holds our subjects."""
        queue = self.queue
        config = StreamConfig(
            name=queue.stream,
            description="idstitch queue mode: accepted Tracking API requests waiting for a worker",
            subjects=[queue.filter_subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            discard=DiscardPolicy.NEW,
            duplicate_window=DUPLICATE_WINDOW,
        )
        info = await self._ensure(queue.stream, config, queue.filter_subject)
        self.stream_max_msg_size = info.config.max_msg_size
        self.stream_storage = info.config.storage or StorageType.FILE
        self.stream_replicas = info.config.num_replicas
        return info

    async def recover_stream(self, seen: int, cause: Exception) -> None:
        """Create the stream again after a publish found none; `seen`: the recreations counted before it.

        Publishes under way when the stream vanished all fail alike: the first recreates it, the others
        find the count moved on and publish again at once.
        """
        async with self._recovering:
            if self._recoveries != seen:
                return
            await self.ensure_stream()
            self._recoveries += 1
        _log.warning(
            "JetStream stream was missing; recreated it",
            extra={"stream": self.queue.stream, "error": f"{type(cause).__name__}: {cause}"},
        )

    async def ensure_dead_stream(self) -> StreamInfo:
        """Create the dead-letter stream (on the stream's storage and replicas), or check an existing one.

        Limits retention and no limits: a parked request stays until an operator replays or deletes it.
        """
        queue = self.queue
        config = StreamConfig(
            name=queue.dead_stream,
            description=f"idstitch queue mode: requests parked by workers of stream {queue.stream}",
            subjects=[queue.dead_filter_subject],
            retention=RetentionPolicy.LIMITS,
            storage=self.stream_storage,
            num_replicas=self.stream_replicas,
            discard=DiscardPolicy.NEW,
            duplicate_window=DUPLICATE_WINDOW,
        )
        return await self._ensure(queue.dead_stream, config, queue.dead_filter_subject)

    async def _ensure(self, name: str, config: StreamConfig, subject: str) -> StreamInfo:
        try:
            return await self.js.add_stream(config)
        except nats.js.errors.APIError as error:
            try:
                info = await self.js.stream_info(name)
            except nats.js.errors.NotFoundError:
                # Not ours and not there: our subjects overlap another stream's, most likely.
                raise ConfigError(
                    f"cannot create JetStream stream {name}: {error.description or error}"
                ) from None
        # An existing stream an operator tuned (limits, replicas) is used as it is, if our subjects land there.
        subjects = info.config.subjects or []
        if subject not in subjects and ">" not in subjects:
            raise ConfigError(
                f"JetStream stream {name} exists with subjects {', '.join(subjects) or 'none'}, "
                f"not {subject}: choose another stream or subject in the queue URL"
            )
        return info

    async def park(self, msg: Msg, reason: str) -> PubAck:
        """Copy a delivered queue message, bytes unchanged, to the dead-letter stream; headers say why and whence.

        Its `Nats-Msg-Id` names the original (stream, sequence, time): parking it again, after a `term`
        that was lost, stores it once.
        """
        queue = self.queue
        metadata = msg.metadata
        sequence = metadata.sequence.stream
        headers = {
            "Nats-Msg-Id": f"{metadata.stream}:{sequence}:{metadata.timestamp.isoformat()}",
            PARKED_REASON: _header_value(reason)[:_MAX_REASON],
            PARKED_STREAM: metadata.stream,
            PARKED_SUBJECT: msg.subject,
            PARKED_SEQUENCE: str(sequence),
            PARKED_DELIVERIES: str(metadata.num_delivered),
        }
        # Created when first needed, and again if it was deleted since: parking is rare, one API call cheap.
        await self.ensure_dead_stream()
        return await self.js.publish(
            queue.dead_subject_for(msg.subject),
            msg.data,
            timeout=5.0,
            stream=queue.dead_stream,
            headers=headers,
        )

    async def ensure_consumer(self) -> ConsumerInfo:
        """Create the workers' durable pull consumer, or bring its settings up to date (all workers share it)."""
        queue = self.queue
        config = ConsumerConfig(
            durable_name=queue.consumer,
            description="idstitch workers: resolve, commit, then acknowledge",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=queue.ack_wait,
            # Unbounded here: the worker counts deliveries itself and parks a request that keeps failing.
            # With a bound, JetStream would stop delivering it and leave it in the stream, unseen.
            max_deliver=-1,
            filter_subject=queue.filter_subject,
            max_ack_pending=DEFAULT_MAX_ACK_PENDING,
        )
        try:
            return await self.js.add_consumer(queue.stream, config)
        except nats.js.errors.APIError as error:
            raise ConfigError(
                f"cannot create the consumer {queue.consumer} on JetStream stream {queue.stream}: "
                f"{error.description or error}"
            ) from None

    async def publish(self, subject: str, data: bytes, *, message_id: str, timeout: float) -> PubAck:
        """Publish and wait for JetStream's ack (the message is on disk), retrying until `timeout`.

        Every attempt carries the same `Nats-Msg-Id`, so a retry of a publish that did land (its ack was
        lost) is stored once.
        """
        deadline = time.monotonic() + timeout
        attempt = 0
        sent = False
        recreated = False
        while True:
            remaining = deadline - time.monotonic()
            seen = self._recoveries
            try:
                if not self.client.is_connected:
                    # A publish now would wait in the client's reconnect buffer and go out when NATS is
                    # back, after this request was answered 429: wait for the connection instead.
                    raise nats.errors.ConnectionReconnectingError
                sent = True
                return await self.js.publish(
                    subject,
                    data,
                    timeout=max(min(remaining, 5.0), 0.05),
                    stream=self.queue.stream,
                    headers={"Nats-Msg-Id": message_id},
                )
            except nats.js.errors.NoStreamResponseError as error:
                # No stream takes the subject: it was deleted, or lost in a NATS restart without
                # persistent storage. Waiting would not bring it back: recreate it, publish again at once.
                last: Exception = error
                if not recreated:
                    recreated = True
                    try:
                        await self.recover_stream(seen, error)
                    except ConfigError as failure:
                        raise QueueUnavailable(
                            f"JetStream stream {self.queue.stream} is missing and cannot be recreated: {failure}"
                        ) from None
                    except (nats.errors.Error, OSError) as failure:  # JetStream not ready yet, say
                        last = failure
                    else:
                        continue
            except nats.js.errors.ServiceUnavailableError as error:
                if error.err_code is not None:
                    # A full stream answers 503 with a reason (10077: maximum messages / bytes exceeded).
                    raise QueueUnavailable(
                        f"JetStream stream {self.queue.stream} refused the message: {error.description or error}"
                    ) from None
                last = error  # JetStream itself is briefly unavailable
            except nats.js.errors.APIError as error:
                # The stream refused it (the subject is not ours, say): retrying now would not help.
                raise QueueUnavailable(
                    f"JetStream stream {self.queue.stream} refused the message: {error.description or error}"
                ) from None
            except (nats.errors.Error, OSError) as error:  # timeouts, no responders, reconnecting
                last = error
            pause = min(0.1 * 2**attempt, 1.0)
            attempt += 1
            if time.monotonic() + pause >= deadline:
                # Sent but not acknowledged: it may still be stored. Its Nats-Msg-Id and the messages'
                # messageIds make a retry land once; messages sent without one may land twice.
                unknown = "; it may still be stored: a retry is de-duplicated by messageId" if sent else ""
                raise QueueUnavailable(
                    f"JetStream did not acknowledge within {timeout:g} s ({type(last).__name__}){unknown}"
                ) from None
            await asyncio.sleep(pause)

    async def close(self) -> None:
        """Send what is buffered (acks, say), then close the connection."""
        self._quiet = True
        client = self.client
        if client.is_connected:
            try:
                await client.flush(timeout=5)
            except (nats.errors.Error, OSError, TimeoutError):
                _log.warning("could not flush the NATS connection before closing it")
        try:
            await client.close()
        except (nats.errors.Error, OSError) as error:
            # Closed while NATS is down: what the client buffered meanwhile (pull requests, acks) cannot
            # be sent, and nothing depends on it (unacked messages are delivered again).
            _log.warning(
                "NATS connection closed uncleanly", extra={"error": f"{type(error).__name__}: {error}"}
            )


def jetstream_unanswered(queue: QueueConfig, error: Exception) -> QueueUnavailable:
    """The error for a NATS server whose JetStream API does not answer (one started without `-js`)."""
    return QueueUnavailable(
        f"NATS at {queue.shown_servers} does not answer JetStream requests "
        f"({_nats_error(error)}): is JetStream enabled (nats-server -js)?"
    )


def _nats_error(error: Exception) -> str:
    """A NATS error for humans: nats-py's JetStream errors print as `code=None err_code=None description='None'`."""
    if isinstance(error, nats.js.errors.APIError):
        return f"{type(error).__name__}: {error.description}" if error.description else type(error).__name__
    text = str(error).removeprefix("nats: ")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _header_value(text: str) -> str:
    """Text as one header value: one line, ASCII (other characters \\u-escaped; NATS clients differ on them)."""
    return " ".join(text.split()).encode("ascii", "backslashreplace").decode("ascii")


def _subject_token(space: str) -> str:
    """A space name as one subject token: letters, digits, - and _ stay; any other character is %XX-escaped.

    The escaping is one-to-one, so two spaces never share a subject, and a dot or wildcard in a name
    cannot change which subjects a message lands on.
    """
    if _TOKEN.fullmatch(space):
        return space
    if not space:
        return "%"  # never the escape of a name: those are %XX
    return "".join(
        char if _TOKEN.fullmatch(char) else "".join(f"%{byte:02X}" for byte in char.encode())
        for char in space
    )


def _without_credentials(server: str) -> str:
    """A server URL without user name and password (they must not reach logs)."""
    parts = urlsplit(server)
    if parts.username is None and parts.password is None:
        return server
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
