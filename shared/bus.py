"""NATS connection with start-up retry, and a JSON publish helper with deterministic msg-ids."""

from __future__ import annotations

import asyncio
import logging
import ssl
from datetime import UTC, datetime

import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck

from shared import metrics
from shared.schemas import Wire

log = logging.getLogger(__name__)


RETRY_MAX_S = 10.0  # the longest wait between tries, at start-up, of what needs NATS


async def stopped_within(stop: asyncio.Event | None, seconds: float) -> bool:
    """Wait ``seconds``, less if ``stop`` is set meanwhile; whether it was (a start-up's backoff ends on a stop)."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def connect(
    url: str,
    name: str,
    stop: asyncio.Event | None = None,
    max_delay: float = RETRY_MAX_S,
    *,
    user: str | None = None,
    password: str | None = None,
    inbox_prefix: str = "_INBOX",
    tls: ssl.SSLContext | None = None,
) -> NATS:
    """Connect to NATS, retrying with exponential backoff until it answers (or ``stop`` is set).

    ``user``/``password`` authenticate against the server's auth file; ``inbox_prefix`` is where replies
    arrive (the auth file lets each user subscribe to its own prefix only). ``tls``: verify the server
    with it (and present its client certificate, if it has one).
    """
    delay, attempt = 0.25, 0
    connected = False
    last_error: Exception | None = None

    async def _error(e: Exception) -> None:
        nonlocal last_error
        if connected:
            log.warning("NATS error: %s", e)
        else:  # the start-up loop below reports it
            last_error = e

    async def _disconnected() -> None:
        if not (nc.is_draining or nc.is_closed):  # a drain at shutdown disconnects on purpose
            log.warning("NATS disconnected from %s; reconnecting", url)

    async def _reconnected() -> None:
        log.info("NATS reconnected to %s", url)

    while True:
        attempt += 1
        nc = NATS()
        try:
            # No library reconnects during the first connect: this loop owns the start-up backoff and
            # its log line. Once connected, the client reconnects on its own, forever.
            await nc.connect(
                url,
                name=name,
                user=user,
                password=password,
                inbox_prefix=inbox_prefix,
                tls=tls,
                connect_timeout=2,
                allow_reconnect=False,
                max_reconnect_attempts=1,  # one try per round (nats-py counts the first as a reconnect)
                reconnect_time_wait=0,
                error_cb=_error,
                disconnected_cb=_disconnected,
                reconnected_cb=_reconnected,
            )
        except (TimeoutError, OSError, nats.errors.Error) as e:
            cause = last_error or e
            # nats-py reports a refused user as AuthorizationError or as a plain Error carrying the text.
            if isinstance(cause, nats.errors.AuthorizationError) or "authorization violation" in str(cause).lower():
                log.error(
                    "NATS at %s refused user %r (attempt %d): check OPENCLAW_NATS_USER / OPENCLAW_NATS_PASSWORD "
                    "against the server's auth file; retrying in %.1fs", url, user, attempt, delay,
                )
            elif isinstance(cause, ssl.SSLError):
                log.error(
                    "TLS with NATS at %s failed (attempt %d: %s): check OPENCLAW_NATS_CA_FILE (the CA that signed the "
                    "server's certificate) and, if the server verifies clients, OPENCLAW_NATS_CERT_FILE / "
                    "OPENCLAW_NATS_KEY_FILE; retrying in %.1fs", url, attempt, cause, delay,
                )
            else:
                log.warning(
                    "NATS not reachable at %s (attempt %d: %s); retrying in %.1fs",
                    url, attempt, str(cause) or type(cause).__name__, delay,
                )
            if await stopped_within(stop, delay):
                raise asyncio.CancelledError("stopped before NATS was reachable") from None
            delay = min(delay * 2, max_delay)
            continue
        nc.options["allow_reconnect"] = True
        nc.options["max_reconnect_attempts"] = -1
        nc.options["reconnect_time_wait"] = 1
        connected = True
        log.info("connected to NATS at %s after %d attempt(s)", url, attempt)
        return nc


async def publish(js: JetStreamContext, subject: str, msg: Wire | bytes, msg_id: str | None = None) -> PubAck:
    """Publish a wire model (or its bytes); ``msg_id`` makes a repeat within the stream's duplicate window a no-op."""
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    return await js.publish(subject, msg if isinstance(msg, bytes) else msg.to_bytes(), headers=headers)


async def schedule(js: JetStreamContext, subject: str, target: str, at: datetime, msg: Wire, msg_id: str) -> PubAck:
    """Have the stream publish ``msg`` on ``target`` at ``at``: a JetStream message schedule (nats-server
    2.12+, a stream with ``allow_msg_schedules``). Until then nothing is delivered to anyone; ``subject``
    (inside the stream, one per schedule) holds it, and the server removes it once it has fired."""
    when = at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    headers = {"Nats-Msg-Id": msg_id, "Nats-Schedule": f"@at {when}", "Nats-Schedule-Target": target}
    return await js.publish(subject, msg.to_bytes(), headers=headers)


async def emit(nc: NATS, subject: str, msg: Wire, msg_id: str) -> None:
    """Publish an event into its stream without waiting for the stream's acknowledgement.

    For what only observes an execution (lifecycle and cost events, a task's start): the stream stores
    it like any publish and ``msg_id`` still dedups a repeat, but the sender neither waits a round trip
    nor handles an ack. Publishes from one connection reach the stream in order, so an event emitted
    before an acknowledged publish is stored before it. If the stream cannot take it (no quorum, server
    gone past the client's reconnect buffer) the event is lost, and the caller goes on: the execution
    document in KV, written before any event about it, stays the record. An event must never stop what
    it reports on (a paid call's result behind its cost event).
    """
    try:
        await nc.publish(subject, msg.to_bytes(), headers={"Nats-Msg-Id": msg_id})
    except nats.errors.Error as e:
        metrics.EVENTS_DROPPED.inc()
        log.warning("event on %s not sent: %s", subject, str(e) or type(e).__name__)
