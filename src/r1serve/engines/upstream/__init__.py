"""An engine that forwards to an OpenAI-compatible upstream (a provider, or vLLM / SGLang / llama-server /
Ollama on a GPU box) and normalises what comes back into r1serve's deltas.

One :class:`UpstreamEngine` is one target: one base URL, one key, one reasoning dialect. It makes exactly
one attempt per ``generate`` call; retries, failover, circuit breaking and health checks live one level
up, in :mod:`r1serve.gateway`, which needs to know whether anything has reached the client yet. The
rule here: an error before the first delta is yielded is an :class:`AttemptFailed` (the gateway may try
again, nothing was sent); an error after it is a plain :class:`~r1serve.errors.UpstreamError` (the API
turns it into an error event followed by ``[DONE]``).

Modules
-------
* :mod:`.config`: :class:`UpstreamConfig`, :class:`Timeouts`, :data:`Dialect` (the connection settings).
* :mod:`.engine`: :class:`UpstreamEngine`. :mod:`.pool`: :class:`HttpClient`, the shared connections.
* :mod:`.wire`: the request body. :mod:`.sse`: the events of a read, and the response after the stream.
* :mod:`.normalise`: reasoning split from content, finish reasons, logprobs. :mod:`.usage`: token usage.
* :mod:`.errors`: :class:`AttemptFailed`, HTTP statuses as errors, the key scrubbed from upstream text.

The names imported here are the package's public surface (what it takes to build, run and fail over an
engine); everything else is imported from its module.

Wire choices
------------
* A streaming client's request goes upstream with ``stream: true`` and ``stream_options.include_usage``
  (turn the latter off per provider with ``include_usage = false`` for servers that reject it): it is
  the only way to ask for usage on a stream, and idle timeouts need chunks. A client that wants one
  JSON answer (``GenerationRequest.stream`` False) gets it asked for as one JSON answer (``stream:
  false``): half the work on both sides, and the same normalisation (the whole text goes through the
  same parser as one piece). Such a request has no chunks to time: headers and body must arrive within
  ``Timeouts.whole``. An upstream that answers either way with the other shape is accepted too.
* The body is read as it arrives (``readany``), split into SSE lines, and every read becomes at most
  one delta: events that arrived in the same read are merged, nothing waits for more. The read that
  ends the stream (finish and ``[DONE]``) becomes the final delta, its text included.
* Reasoning is split with :class:`r1serve.reasoning.ReasoningParser`, so the result is identical to the
  embedded engine's for the same text. See :data:`~.config.Dialect` for how each dialect is read.
* History: the API already removed reasoning from earlier assistant turns
  (:func:`r1serve.reasoning.strip_reasoning_from_history`); here messages are serialised field by field
  and ``reasoning_content`` / ``reasoning`` are never sent, whatever the caller passed.
* Usage: upstream's when it sends one; otherwise counted locally with the configured
  :class:`~.usage.TokenCounter` and marked ``estimated``.
* The API key is sent only in the Authorization header; it is never logged, never part of ``repr`` and
  scrubbed from any upstream error text before that text goes anywhere (:meth:`UpstreamEngine.scrub`).
"""

from r1serve.engines.upstream.config import Dialect, Timeouts, UpstreamConfig
from r1serve.engines.upstream.engine import UpstreamEngine
from r1serve.engines.upstream.errors import AttemptFailed
from r1serve.engines.upstream.pool import HttpClient

__all__ = ["AttemptFailed", "Dialect", "HttpClient", "Timeouts", "UpstreamConfig", "UpstreamEngine"]
