"""Answering a registry's 401: the WWW-Authenticate challenge, Bearer tokens, Basic.

The first 401 of a registry names its scheme: Bearer (fetch a token from the
realm it names, with our credentials if we have any) or Basic (send them).
Our password goes to the token realm only over https, or to a host listed in
images.insecure_registries; a token goes only to the registry's own origin
(registry_http.Transport.follow). What a token server answers is untrusted:
size-capped, and a token must be one printable word.
"""

from __future__ import annotations

import asyncio
import re

import httpx

from cocoon.errors import ImageError
from cocoon.images.auth import Credentials
from cocoon.images.registry_errors import printable, reason
from cocoon.images.registry_http import Transport, netloc, read_bounded
from cocoon.util import boundedjson

#: Token responses are small; a huge one is hostile.
MAX_TOKEN_RESPONSE = 1 << 20
MAX_TOKEN = 64 << 10

_CHALLENGE_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="..",service="..",scope=".."`` -> ("bearer", {...}).

    Quoted values may hold commas (``scope="repository:a:pull,push"``), so
    this is a tokenizer, not a split on ",".
    """
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _CHALLENGE_PARAM.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
        pos = m.end()
    return scheme.lower(), params


def token_of(body: bytes) -> str | None:
    """The bearer token of a token server's JSON answer, if it holds a usable one."""
    try:
        doc = boundedjson.loads(body, max_bytes=MAX_TOKEN_RESPONSE)
    except boundedjson.JSONError:
        return None
    token = (doc.get("token") or doc.get("access_token")) if isinstance(doc, dict) else None
    if (
        not isinstance(token, str)
        or not token
        or len(token) > MAX_TOKEN
        or not all(33 <= ord(c) < 127 for c in token)
    ):
        return None
    return token


class Authenticator:
    """One registry's credentials and the Authorization header they earned, and
    the words for each way a registry can refuse them."""

    def __init__(
        self, http: Transport, credentials: Credentials | None, repository: str | None
    ) -> None:
        self.http = http
        self.domain = http.domain
        self.credentials = credentials
        self.repository = repository
        #: The header requests carry ("Bearer ..." or "Basic ..."), once a 401 asked.
        self.authorization: str | None = None
        self.scheme = ""
        #: Set by a login: a refusal then means a wrong password, not a missing login.
        self.logging_in = False
        self._lock = asyncio.Lock()

    def _login_hint(self) -> str:
        return f"run `cocoon login {self.domain}`"

    def required(self) -> ImageError:
        return ImageError(f"authentication required: {self._login_hint()}")

    def rejected(self) -> ImageError:
        user = self.credentials.username if self.credentials else ""
        if self.logging_in:
            return ImageError(f"login to {self.domain} failed: wrong username or password")
        return ImageError(
            f"unauthorized: {self.domain} rejected the credentials of {user!r}; "
            + self._login_hint()
        )

    def denied(self) -> ImageError:
        if not self.credentials:
            return self.required()
        if self.scheme == "basic":
            return self.rejected()
        return ImageError(
            f"access denied to {self.domain}/{self.repository or ''} for "
            f"{self.credentials.username!r}: no such repository, or no pull permission"
        )

    async def answer(self, challenge: str, sent: str | None) -> None:
        """Answer a 401: fetch a Bearer token or use Basic credentials, once per stale header.

        The lock makes concurrent layer downloads that hit an expired token at
        the same time fetch one new token, not one each.
        """
        async with self._lock:
            if self.authorization != sent:
                return  # another task answered this challenge meanwhile
            scheme, params = parse_challenge(challenge)
            self.scheme = scheme
            if not scheme:
                raise self.denied()  # a 401 without a challenge: nothing to answer
            if scheme == "basic":
                if not self.credentials:
                    raise self.required()
                header = "Basic " + self.credentials.encoded()
                if sent == header:
                    raise self.rejected()
                self.authorization = header
            elif scheme == "bearer":
                self.authorization = "Bearer " + await self._fetch_token(params)
            else:
                raise ImageError(
                    f"registry {self.domain} wants authentication scheme "
                    f"{printable(scheme, 40)!r}, which cocoon does not speak (Bearer, Basic)"
                )

    async def _fetch_token(self, params: dict[str, str]) -> str:
        """GET <realm>?service=..&scope=.. (Basic auth if we have credentials) -> token."""
        realm = params.get("realm", "")
        try:
            url = httpx.URL(realm)
        except httpx.InvalidURL:
            url = httpx.URL()
        if url.scheme not in ("http", "https") or not url.host:
            raise ImageError(
                f"registry {self.domain} named no usable token realm ({printable(realm, 100)!r})"
            )
        # The realm gets our password: never over plain HTTP to a host nobody listed.
        self.http.check_scheme(url)
        query: dict[str, str] = {}
        if "service" in params:
            query["service"] = params["service"]
        scope = params.get("scope") or (
            f"repository:{self.repository}:pull" if self.repository else ""
        )
        if scope:
            query["scope"] = scope
        headers = {"Accept": "application/json"}
        if self.credentials:
            headers["Authorization"] = "Basic " + self.credentials.encoded()
        url = url.copy_merge_params(query)

        def unreachable(e: httpx.TransportError) -> ImageError:
            return ImageError(
                f"token server {netloc(url)} of registry {self.domain} unreachable: " + reason(e)
            )

        # A TLS failure is retried here too, as it always was: only the registry's is final.
        resp = await self.http.send(
            lambda: self.http.get(url, headers),
            self.http.retry(),
            unreachable,
            what=f"token server {netloc(url)}",
            tls_is_final=False,
        )
        try:
            if resp.status_code in (401, 403):
                raise self.rejected() if self.credentials else self.required()
            if resp.status_code != 200:
                detail = await self.http.error_detail(resp)
                raise ImageError(f"token server {netloc(url)} of {self.domain}: {detail}")
            body = await read_bounded(resp, MAX_TOKEN_RESPONSE, "token response")
        finally:
            await resp.aclose()
        token = token_of(body)
        if token is None:
            raise ImageError(f"token server {netloc(url)} of {self.domain} sent no usable token")
        return token
