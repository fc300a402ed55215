"""Queue mode: `serve --queue` publishes accepted requests to NATS JetStream; `idstitch worker`s resolve them.

`jetstream` (queue URL, connection, stream, consumer), `envelope` (the JetStream message format),
`publisher` (the Tracking API's writer in queue mode, and `publish_messages` for benchmarks), `worker`
(the consumer loop, `run_worker`), `parked` (the requests workers parked: `parked_requests`,
`parked_request`, `replay_parked`, `delete_parked`).
"""

from idstitch.queue.jetstream import QueueConfig, QueueUnavailable, parse_queue_url
from idstitch.queue.parked import (
    ParkedRequest,
    delete_parked,
    parked_request,
    parked_requests,
    replay_parked,
)
from idstitch.queue.publisher import JetStreamPublisher, PublishSummary, publish_messages
from idstitch.queue.worker import QueueWorker, WorkerSummary, run_worker

__all__ = [
    "JetStreamPublisher",
    "ParkedRequest",
    "PublishSummary",
    "QueueConfig",
    "QueueUnavailable",
    "QueueWorker",
    "WorkerSummary",
    "delete_parked",
    "parked_request",
    "parked_requests",
    "parse_queue_url",
    "publish_messages",
    "replay_parked",
    "run_worker",
]
