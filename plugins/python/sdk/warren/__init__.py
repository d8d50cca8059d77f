"""The Warren plugin SDK for Python: a thin layer over the componentize-py
bindings of the ``warren:plugin@0.3.0`` world (its ``plugin-script`` variant) (``wit/plugin.wit``).

A plugin is a module (``app.py``) that subclasses :class:`Plugin` and binds
the class componentize-py exports as ``Handler``::

    import warren

    class Echo(warren.Plugin):
        def manifest(self):
            return warren.Manifest("echo", "0.1.0").subscribe(
                warren.Subscription.queue("echo.in")
            )

        def handle(self, d):
            warren.publish(warren.forward(d, "", "echo.out"))

    Handler = warren.export(Echo)

built with ``componentize-py -d wit -w plugin-script componentize -p . -p SDK app``
(``SDK`` is the directory holding this package).

``handle`` returning acknowledges the delivery once the messages given to
:func:`publish` are safe (and the writes given to :data:`kv` committed). Raise :class:`Retry` for a transient failure (the
message is delivered again later, ``d.attempt`` counting up, until the
subscription's attempt limit) and :class:`Reject` to dead-letter it now.
Any other exception is a fault: the traceback goes to the host's log at
error level and the delivery is dead-lettered as a trap whose reason is the
exception's one-line summary (``ValueError: bad input``).

State that must outlive a delivery goes in the plugin's key-value bucket,
:data:`kv` (``kv.get``, ``kv.set``, ``kv.delete``, ``kv.increment``,
``kv.get_json``, ``kv.set_json``), with ``.state()`` in the manifest::

    seen = warren.kv.increment(f"count:{customer}", 1)

Its writes are part of the delivery: they reach the store only if
``handle`` returns, and a retry, reject or fault discards them. A refused
operation raises :class:`KvError`; unhandled, ``unavailable`` retries the
delivery and the others reject it.

Rules of the sandbox: there is no filesystem, network or environment at
run time, so import every module at the top of ``app.py`` (the build
snapshots the interpreter after importing it; a module imported inside
``handle`` fails). ``hash()`` of a string is fixed at build time. Warren
instantiates the plugin afresh for every delivery unless the operator sets
``instance = "reuse"``, when module-level state survives from one delivery
to the next until the instance is dropped (after a set number of
deliveries or any trap): never keep there what one message must not see
of another.
"""

import os
import sys
import traceback

from componentize_py_types import Err
from wit_world import exports
import json as _json

from wit_world.imports import host, http as _http, kv as _kv, types
from wit_world.imports.types import (  # noqa: F401  (re-exported for plugins)
    Binding,
    Delivery,
    DeliveryMode,
    ExchangeKind,
    Header,
    LogLevel,
    Message,
    OutputExchange,
    OutputQueue,
    Properties,
    QueueKind,
)

__all__ = [
    "Plugin",
    "Manifest",
    "Subscription",
    "Retry",
    "Reject",
    "export",
    "publish",
    "config",
    "log",
    "kv",
    "KvError",
    "message",
    "forward",
    "properties",
    "header",
    "bounded_catch_all",
    "types",
    "Delivery",
    "Message",
    "Properties",
    "Header",
    "ExchangeKind",
    "QueueKind",
    "DeliveryMode",
]


class Retry(Exception):
    """A transient failure: deliver the message again after a delay, until
    the subscription's attempt limit, then dead-letter it. ``delay_ms``
    asks for at least that delay (a downstream's ``Retry-After``)."""

    def __init__(self, reason: str = "", delay_ms: int | None = None):
        super().__init__(reason)
        self.delay_ms = delay_ms


class Reject(Exception):
    """A permanent failure: dead-letter the message now."""


class Plugin:
    """Subclass this, implement both methods, and bind
    ``Handler = warren.export(YourPlugin)`` in the app module."""

    def manifest(self) -> "Manifest":
        """What the plugin is and what it consumes. Called once at load."""
        raise NotImplementedError

    def handle(self, delivery: Delivery) -> None:
        """Handle one delivery; return to acknowledge it, raise
        :class:`Retry` or :class:`Reject` to end it otherwise."""
        raise NotImplementedError


class Subscription:
    """A queue the plugin consumes, built by chaining."""

    def __init__(self, queue: str):
        self._s = types.Subscription(
            queue=queue,
            kind=QueueKind.QUORUM,
            bind=None,
            prefetch=64,
            message_ttl_ms=None,
            max_attempts=None,
        )

    @classmethod
    def queue(cls, name: str) -> "Subscription":
        """Consume quorum queue ``name`` with prefetch 64 and the host's
        attempt limit."""
        return cls(name)

    def bind(self, exchange: str, kind: ExchangeKind, keys) -> "Subscription":
        """Bind the queue to ``exchange`` (declared with ``kind``) with ``keys``."""
        self._s.bind = Binding(exchange=exchange, kind=kind, keys=list(keys))
        return self

    def classic(self) -> "Subscription":
        """Declare a classic queue instead of a quorum queue."""
        self._s.kind = QueueKind.CLASSIC
        return self

    def prefetch(self, n: int) -> "Subscription":
        self._s.prefetch = n
        return self

    def message_ttl_ms(self, ms: int) -> "Subscription":
        self._s.message_ttl_ms = ms
        return self

    def max_attempts(self, n: int) -> "Subscription":
        """Dead-letter after ``n`` attempts (1 = never retry)."""
        self._s.max_attempts = n
        return self


class Manifest:
    """What a plugin is and what it consumes, built by chaining."""

    def __init__(self, name: str, version: str):
        self.name = name
        self.version = version
        self._subscriptions = []
        self._exchanges = []
        self._queues = []
        self._limits = types.Limits(
            memory_bytes=None,
            deadline_ms=None,
            max_concurrency=None,
            wall_deadline_ms=None,
            max_response_bytes=None,
        )
        self._outbound = []
        self._state = False

    def state(self) -> "Manifest":
        """Say the plugin uses key-value state (:data:`kv`)."""
        self._state = True
        return self

    def outbound(self, origin: str) -> "Manifest":
        """Ask to call ``origin`` (``https://api.example.com``,
        ``https://*.example.com`` for subdomains); the operator grants."""
        self._outbound.append(origin)
        return self

    def wall_deadline_ms(self, ms: int) -> "Manifest":
        """Wall-clock budget of all outbound calls of one delivery."""
        self._limits.wall_deadline_ms = ms
        return self

    def subscribe(self, s: Subscription) -> "Manifest":
        self._subscriptions.append(s._s)
        return self

    def output_exchange(self, name: str, kind: ExchangeKind) -> "Manifest":
        """Declare exchange ``name`` (durable, of ``kind``) as a destination
        of the plugin's outputs."""
        self._exchanges.append(OutputExchange(name=name, kind=kind))
        return self

    def output_queue(self, name: str) -> "Manifest":
        """Declare quorum queue ``name`` as a destination of the plugin's
        outputs (published to through the default exchange)."""
        return self.output(
            OutputQueue(name=name, kind=QueueKind.QUORUM, bind=None, max_length=None)
        )

    def output(self, q: OutputQueue) -> "Manifest":
        """Declare queue ``q`` (see :func:`bounded_catch_all`)."""
        self._queues.append(q)
        return self

    def deadline_ms(self, ms: int) -> "Manifest":
        self._limits.deadline_ms = ms
        return self

    def memory_bytes(self, n: int) -> "Manifest":
        self._limits.memory_bytes = n
        return self

    def max_concurrency(self, n: int) -> "Manifest":
        self._limits.max_concurrency = n
        return self

    def to_wit(self) -> types.Manifest:
        return types.Manifest(
            name=self.name,
            version=self.version,
            subscriptions=list(self._subscriptions),
            outputs=types.Outputs(
                exchanges=list(self._exchanges), queues=list(self._queues)
            ),
            limits=self._limits,
            outbound=list(self._outbound),
            state=self._state,
        )


def bounded_catch_all(name, exchange, kind, keys, max_length) -> OutputQueue:
    """Classic queue ``name`` bound to ``exchange`` (declared with ``kind``)
    with ``keys``, keeping at most ``max_length`` messages: a catch-all for
    outputs nobody may read."""
    return OutputQueue(
        name=name,
        kind=QueueKind.CLASSIC,
        bind=Binding(exchange=exchange, kind=kind, keys=list(keys)),
        max_length=max_length,
    )


def properties() -> Properties:
    """No property set and no headers (published persistent)."""
    return Properties(
        content_type=None,
        content_encoding=None,
        headers=[],
        delivery_mode=None,
        priority=None,
        correlation_id=None,
        reply_to=None,
        expiration=None,
        message_id=None,
        timestamp=None,
        message_type=None,
        user_id=None,
        app_id=None,
    )


def header(props: Properties, key: str):
    """The value of top-level header ``key`` (a ``types.HeaderValue_*``
    case), or None."""
    for h in props.headers:
        if h.parent == 0 and h.key == key:
            return h.value
    return None


def message(exchange: str, routing_key: str, body, props=None) -> Message:
    """A message with ``body`` (bytes, or text sent as UTF-8)."""
    if isinstance(body, str):
        body = body.encode()
    return Message(
        exchange=exchange,
        routing_key=routing_key,
        body=bytes(body),
        properties=props if props is not None else properties(),
    )


def forward(d: Delivery, exchange: str, routing_key: str) -> Message:
    """Republish delivery ``d`` (body, every property and header, byte for
    byte) to ``exchange`` with ``routing_key``."""
    return Message(
        exchange=exchange, routing_key=routing_key, body=d.body, properties=d.properties
    )


def publish(msg: Message) -> None:
    """Queue ``msg`` for publishing once ``handle`` returns. A message the
    host will not take raises :class:`Reject`."""
    try:
        host.publish(msg)
    except Err as e:
        why = e.value
        if isinstance(why, types.PublishError_LimitExceeded):
            raise Reject(f"publish refused: {why.value}") from None
        raise Reject(f"invalid output: {why.value}") from None


def config(key: str):
    """A per-plugin setting from the host's ``warren.toml``, or None."""
    return host.config(key)


def secret(key: str) -> str:
    """A secret the operator gives the plugin in ``[plugin.<name>] config``
    (as ``{ file = ".." }`` or ``{ env = ".." }``; Warren never shows its
    value). Raises Reject, naming the key, when it is not configured: no
    delivery can succeed until the operator sets it. Never log it."""
    value = host.config(key)
    if value is None:
        raise Reject(f"secret {key!r} is not configured ([plugin.<name>] config)")
    return value


class HttpError(Exception):
    """An outbound call that produced no response: ``kind`` is ``denied``
    (the message names the rule), ``timeout``, ``too-large``, ``invalid``
    or ``failed``. Unhandled, a timeout or failure retries the delivery and
    the others reject it."""

    def __init__(self, kind: str, text: str):
        super().__init__(f"outbound call {kind}: {text}")
        self.kind = kind


class Response:
    """A whole response, whatever its status (redirects are returned)."""

    def __init__(self, r):
        self.status = r.status
        self.headers = dict(r.headers)
        self.body = bytes(r.body)

    def header(self, name: str):
        return self.headers.get(name.lower())

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self):
        return _json.loads(self.body)

    def retry_if_busy(self) -> "Response":
        """Raise :class:`Retry` after the ``Retry-After`` for 429 and 503."""
        if self.status in (429, 503):
            try:
                delay = int(self.header("retry-after")) * 1000
            except (TypeError, ValueError):
                delay = 1000
            raise Retry(f"downstream answered {self.status}", delay_ms=delay)
        return self


_HTTP_ERRORS = {
    "HttpError_Denied": "denied",
    "HttpError_Timeout": "timeout",
    "HttpError_TooLarge": "too-large",
    "HttpError_Invalid": "invalid",
    "HttpError_Failed": "failed",
}


def fetch(method: str, url: str, headers=None, body=None, json=None, timeout_ms=None):
    """Call ``url`` under the plugin's grants and return a :class:`Response`."""
    headers = list((headers or {}).items())
    if json is not None:
        body = _json.dumps(json).encode()
        headers.append(("content-type", "application/json"))
    if isinstance(body, str):
        body = body.encode()
    req = _http.HttpRequest(
        method=method, url=url, headers=headers, body=body, timeout_ms=timeout_ms
    )
    try:
        return Response(_http.fetch(req))
    except Err as e:
        kind = _HTTP_ERRORS.get(type(e.value).__name__, "failed")
        raise HttpError(kind, e.value.value) from None


def get(url: str, **kw) -> Response:
    return fetch("GET", url, **kw)


def post(url: str, **kw) -> Response:
    return fetch("POST", url, **kw)


class KvError(Exception):
    """A key-value operation the host refused: ``kind`` is
    ``limit-exceeded`` (a key, a value or the delivery's writes over a
    limit; ``text`` names it), ``invalid`` (an empty key, ``increment`` of a
    value that is not an integer, a value that is not JSON) or
    ``unavailable`` (the store cannot be reached). Unhandled,
    ``unavailable`` retries the delivery and the others reject it."""

    _WORDS = {
        "limit-exceeded": "state limit exceeded",
        "invalid": "invalid state operation",
        "unavailable": "state unavailable",
    }

    def __init__(self, kind: str, text: str):
        super().__init__(f"{self._WORDS.get(kind, kind)}: {text}")
        self.kind = kind
        self.text = text


_KV_ERRORS = {
    "KvError_LimitExceeded": "limit-exceeded",
    "KvError_Invalid": "invalid",
    "KvError_Unavailable": "unavailable",
}


def _kv_call(call, *args):
    try:
        return call(*args)
    except Err as e:
        kind = _KV_ERRORS.get(type(e.value).__name__, "unavailable")
        raise KvError(kind, e.value.value) from None


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class _Kv:
    """The plugin's key-value bucket. Writes are pending until ``handle``
    returns; reads see this delivery's own pending writes."""

    def get(self, key: str):
        """The value of ``key`` as bytes, or None."""
        return _kv_call(_kv.get, key)

    def set(self, key: str, value) -> None:
        """Set ``key`` to ``value`` (bytes, or text stored as UTF-8)."""
        _kv_call(_kv.set, key, _bytes(value))

    def delete(self, key: str) -> None:
        """Delete ``key``."""
        _kv_call(_kv.delete, key)

    def increment(self, key: str, delta: int = 1) -> int:
        """Add ``delta`` to the integer in ``key`` (absent counts as 0) and
        return the value this delivery now sees (kept as decimal text)."""
        return _kv_call(_kv.increment, key, delta)

    def add(self, key: str, delta: int = 1) -> None:
        """``increment`` without its answer: adds ``delta`` at commit
        without reading the key first (no round trip to Redis)."""
        _kv_call(_kv.add, key, delta)

    def get_json(self, key: str):
        """The value of ``key`` parsed as JSON, or None when absent."""
        value = self.get(key)
        if value is None:
            return None
        try:
            return _json.loads(value)
        except ValueError as e:
            raise KvError("invalid", f"value of {key} is not JSON: {e}") from None

    def set_json(self, key: str, value) -> None:
        """Set ``key`` to ``value`` as JSON."""
        self.set(key, _json.dumps(value))


kv = _Kv()


class _Log:
    """Log through the host; lines carry the plugin's name and version."""

    def debug(self, text: str) -> None:
        host.log(LogLevel.DEBUG, text)

    def info(self, text: str) -> None:
        host.log(LogLevel.INFO, text)

    def warn(self, text: str) -> None:
        host.log(LogLevel.WARN, text)

    def error(self, text: str) -> None:
        host.log(LogLevel.ERROR, text)


log = _Log()


def _summary(e: BaseException) -> str:
    """``Type: first line of the message``: what a trap's reason says."""
    text = str(e).strip().splitlines()
    name = type(e).__qualname__
    return f"{name}: {text[0]}" if text else name


def _reason(e: Exception) -> str:
    return str(e) or type(e).__qualname__


def _trap(e: BaseException) -> None:
    """End the call as a trap: the traceback to the log, the one-line
    summary to stderr (which the host makes the trap's reason), then abort
    (a wasm ``unreachable``)."""
    try:
        host.log(LogLevel.ERROR, "".join(traceback.format_exception(e)).rstrip())
    finally:
        sys.stderr.write(_summary(e) + "\n")
        sys.stderr.flush()
        os.abort()


def export(plugin_class):
    """The class componentize-py exports: bind it as ``Handler`` in the app
    module. One plugin object serves every call of an instance."""
    plugin = plugin_class()

    class Handler(exports.Handler):
        def manifest(self) -> types.Manifest:
            try:
                m = plugin.manifest()
            except BaseException as e:
                _trap(e)
            return m.to_wit() if isinstance(m, Manifest) else m

        def handle(self, delivery: Delivery) -> None:
            try:
                plugin.handle(delivery)
            except Retry as e:
                if e.delay_ms is not None:
                    raise Err(
                        types.HandleError_RetryAfter(
                            types.DelayedRetry(reason=_reason(e), delay_ms=e.delay_ms)
                        )
                    ) from None
                raise Err(types.HandleError_Retry(_reason(e))) from None
            except HttpError as e:
                if e.kind in ("timeout", "failed"):
                    raise Err(types.HandleError_Retry(str(e))) from None
                raise Err(types.HandleError_Reject(str(e))) from None
            except KvError as e:
                if e.kind == "unavailable":
                    raise Err(types.HandleError_Retry(str(e))) from None
                raise Err(types.HandleError_Reject(str(e))) from None
            except Reject as e:
                raise Err(types.HandleError_Reject(_reason(e))) from None
            except BaseException as e:
                _trap(e)

    return Handler
