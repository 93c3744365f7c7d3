"""Several OpenAI-compatible servers behind one distilabel LLM.

``--base_url http://a:8000/v1,http://b:8000/v1`` spreads a step's requests over
both servers (several vLLM replicas of one model, on one machine or a cluster)
without a load balancer in front. distilabel's ``OpenAILLM`` talks to one
``base_url`` through one ``AsyncOpenAI`` client; :class:`BalancedOpenAILLM` gives
that client a :class:`BalancingTransport`, which sends every HTTP request (chat
completions, forced-verdict continuations, retries) to the server with the
fewest requests in flight. A server that refuses connections, drops one or
answers 502/503/504 is left out for ``down_for`` seconds, so the OpenAI
client's retry of that request goes to another server and a run survives
losing a replica.
"""

from __future__ import annotations

import importlib
import time
from types import ModuleType
from typing import Any

from distilabel.models.llms import OpenAILLM
from pydantic import Field

from tpo_data.errors import TPODataError

# Answers of a server (or its proxy) that cannot serve now; the client retries them elsewhere.
_UNAVAILABLE = (502, 503, 504)


def split_endpoints(base_url: str, flag: str = "--base_url") -> list[str]:
    """The endpoints of a comma-separated ``--base_url``, checked."""
    urls = [u.strip().rstrip("/") for u in base_url.split(",")]
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if bad:
        raise TPODataError(
            f"{flag} {base_url!r} has an entry that is not an http(s) URL: {bad[0]!r}.",
            f"Pass {flag} http://HOST:PORT/v1, or several separated by commas.",
        )
    if len(set(urls)) < len(urls):
        raise TPODataError(
            f"{flag} {base_url!r} names the same endpoint twice.",
            "List each server once; requests are shared by load, not by weight.",
        )
    return urls


def openai_http() -> ModuleType:
    """The HTTP library the installed ``openai`` client is built on (httpx2 from openai 3, httpx
    before): the transport, its URLs and its errors must all come from that one library."""
    from openai import DefaultAsyncHttpxClient

    return importlib.import_module(DefaultAsyncHttpxClient.__mro__[1].__module__.partition(".")[0])


class BalancingTransport:
    """An async transport of ``http`` (default :func:`openai_http`) that sends each request,
    addressed to the first endpoint, to the least busy endpoint.

    Busy = requests in flight; ties go to the endpoint that has been sent fewer
    requests, so a sequential caller alternates. ``sent`` counts per endpoint.
    """

    def __init__(self, base_urls: list[str], down_for: float = 30.0, http: ModuleType | None = None):
        http = http or openai_http()
        self.bases = [http.URL(u.rstrip("/")) for u in base_urls]
        self.down_for = down_for
        self.open = [0] * len(self.bases)
        self.sent = [0] * len(self.bases)
        self.down_until = [0.0] * len(self.bases)
        # Errors that say the server is gone, not merely slow (a read timeout is not one).
        self._gone = (http.ConnectError, http.ConnectTimeout, http.RemoteProtocolError, http.ReadError)
        # Same pool size as the OpenAI client's own default transport.
        self._inner = http.AsyncHTTPTransport(
            limits=http.Limits(max_connections=1000, max_keepalive_connections=100)
        )

    def pick(self) -> int:
        now = time.monotonic()
        up = [i for i in range(len(self.bases)) if self.down_until[i] <= now]
        return min(up or range(len(self.bases)), key=lambda i: (self.open[i], self.sent[i], i))

    def route(self, url: Any, i: int) -> Any:
        """``url`` (under the first endpoint) moved under endpoint ``i``, path and query kept."""
        first, target = self.bases[0], self.bases[i]
        if not url.raw_path.startswith(first.raw_path):
            raise ValueError(f"{url} is not under {first}")
        suffix = url.raw_path[len(first.raw_path):]
        return target.copy_with(raw_path=target.raw_path + suffix)

    async def handle_async_request(self, request: Any) -> Any:
        i = self.pick()
        request.url = self.route(request.url, i)
        request.headers["Host"] = request.url.netloc.decode("ascii")
        self.open[i] += 1
        self.sent[i] += 1
        try:
            response = await self._inner.handle_async_request(request)
        except self._gone:
            self.down_until[i] = time.monotonic() + self.down_for
            raise
        finally:
            self.open[i] -= 1
        if response.status_code in _UNAVAILABLE:
            self.down_until[i] = time.monotonic() + self.down_for
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> BalancingTransport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class FinishReasonOpenAILLM(OpenAILLM):
    """distilabel's ``OpenAILLM`` that also returns each choice's finish reason.

    distilabel 1.5.3 drops ``choice.finish_reason``, and with ``n=K`` samples in
    one request the usage counts only the total tokens, so a sample cut off at
    ``max_tokens`` cannot be told from one that ended. The reasons travel as an
    extra output key, which distilabel's tasks store per sample in the
    ``llm_<task>_finish_reason`` column.
    """

    def _generations_from_openai_completion(self, completion: Any) -> Any:
        output = super()._generations_from_openai_completion(completion)
        output["finish_reason"] = [choice.finish_reason for choice in completion.choices]
        return output


class BalancedOpenAILLM(FinishReasonOpenAILLM):
    """distilabel's ``OpenAILLM`` over several endpoints serving the same model."""

    base_urls: list[str] = Field(default_factory=list)

    def load(self) -> None:
        from openai import AsyncOpenAI, DefaultAsyncHttpxClient

        super().load()
        self._aclient = AsyncOpenAI(
            base_url=self.base_urls[0],
            api_key=self.api_key.get_secret_value(),
            max_retries=self.max_retries,  # type: ignore[arg-type]
            timeout=self.timeout,
            default_headers=self.default_headers,
            http_client=DefaultAsyncHttpxClient(transport=BalancingTransport(self.base_urls)),
        )
