"""Score with a remote reward server over HTTP (JSON only): `reward.function=reward.http:HttpScorer`.

    relayrl reward-server --function my_module:my_reward --port 8000      # on the scoring machine
    relayrl train --reward.function=reward.http:HttpScorer --reward.url=http://HOST:8000/score

The protocol, which reward/server.py serves and any other server can implement:

    POST <url>   {"prompts": [str], "completions": [str], "answers": [str]}
    200          {"scores": [float, ...]}
              or {"total": [float, ...], "components": {"<part>": [float, ...]}}
                 optionally with "failures": [{"index": int, "reason": str, "detail": str}] for the
                 samples the server could not score (their score is null)

A batch is sent in requests of at most `batch_size` completions. A request that fails transiently
(connection refused or reset, timeout, 408/429/5xx) is retried `retries` times with exponential
backoff; a request that still fails, or that the server rejects (413 body too large, 422 bad input),
fails its completions as ScoreFailure("exception") with the reason, while the other requests of
the batch are kept. The client uses only the standard library and keeps no state between calls,
so it works the same inside a Ray reward actor, a thread or a plain script.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import typing
import urllib.error
import urllib.request
from typing import Any, Callable

from core.messages import ScoreFailure, ScoreResult
from reward.worker import check_output

RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_REASONS = frozenset(typing.get_args(typing.get_type_hints(ScoreFailure)["reason"]))


class ScoringRequestFailed(RuntimeError):
    """One HTTP request could not be answered (after its retries, or rejected outright)."""


def backoff_delays(retries: int, base_s: float = 0.5, cap_s: float = 8.0) -> list[float]:
    """Seconds to wait before retry 1, 2, ...: base_s * 2**k, capped (0.5, 1, 2, 4, 8, 8, ...)."""
    return [min(cap_s, base_s * 2 ** k) for k in range(retries)]


def parse_response(data: Any, n: int) -> ScoreResult:
    """A server's JSON answer for n completions -> a checked ScoreResult (failures carry "remote: ")."""
    if not isinstance(data, dict) or ("scores" not in data and "total" not in data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ScoringRequestFailed(f"response has neither 'scores' nor 'total' ({keys})")
    total = data["scores"] if "scores" in data else data["total"]
    components = data.get("components") or {}
    if not isinstance(components, dict):
        raise ScoringRequestFailed(f"response 'components' is {type(components).__name__}, expected an object")
    failures = []
    for f in data.get("failures") or []:
        if not isinstance(f, dict) or not isinstance(f.get("index"), int):
            raise ScoringRequestFailed(f"response has a malformed failure entry {f!r}")
        reason = f.get("reason") if f.get("reason") in _REASONS else "exception"
        failures.append(ScoreFailure(f["index"], reason, f"remote: {f.get('detail', '')}"))
    if not failures:
        return check_output({"total": total, **components}, n)
    return check_output(ScoreResult(total, tuple(failures), components), n)


class HttpScorer:
    """Client for a remote scorer; see the module docstring for the protocol and retry rules."""

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 2, batch_size: int = 64,
                 backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward.url: must start with http:// or https://, got {url!r}")
        if batch_size < 1 or retries < 0 or timeout_s <= 0:
            raise ValueError(f"HttpScorer: need batch_size >= 1, retries >= 0, timeout_s > 0 "
                             f"(got {batch_size}, {retries}, {timeout_s})")
        self.url, self.timeout_s, self.retries, self.batch_size = url, timeout_s, retries, batch_size
        self.delays = backoff_delays(retries, backoff_s)
        self.sleep = sleep
        self.requests = 0  # HTTP requests sent, retries included (for tests and logs)

    @classmethod
    def from_config(cls, cfg) -> "HttpScorer":
        return cls(cfg.url, cfg.http_timeout_s, cfg.http_retries, cfg.http_batch_size)

    def __call__(self, prompts: list[str], completions: list[str], answers: list[str]) -> ScoreResult:
        n = len(completions)
        scores: list[float | None] = [None] * n
        components: dict[str, list[float | None]] = {}
        failures: list[ScoreFailure] = []
        for start in range(0, n, self.batch_size):
            end = min(n, start + self.batch_size)
            try:
                data = self.post({"prompts": list(prompts[start:end]), "completions": list(completions[start:end]),
                                  "answers": list(answers[start:end])})
                res = parse_response(data, end - start)
            except ScoringRequestFailed as e:
                failures.extend(ScoreFailure(i, "exception", f"{self.url}: {e}") for i in range(start, end))
                continue
            scores[start:end] = res.scores
            for name, col in res.components.items():
                components.setdefault(name, [None] * n)[start:end] = col
            failures.extend(ScoreFailure(start + f.index, f.reason, f.detail) for f in res.failures)
        return ScoreResult(tuple(scores), tuple(failures), {k: tuple(v) for k, v in components.items()})

    def post(self, payload: dict) -> Any:
        """POST one JSON request, retrying transient failures; the decoded JSON answer or ScoringRequestFailed."""
        body = json.dumps(payload).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self.sleep(self.delays[attempt - 1])
            self.requests += 1
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
            try:
                # timeout bounds each socket operation, not the whole exchange: the reward pool's
                # per-batch deadline (timeouts.reward_s) is what bounds a server that trickles bytes
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    ctype = resp.headers.get("Content-Type", "")
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                text = e.read(300).decode(errors="replace")
                last = f"HTTP {e.code}: {text}"
                if e.code == 413:
                    raise ScoringRequestFailed(f"{last} (request of {len(body)} bytes too large for the server; "
                                               f"lower reward.http_batch_size)") from None
                if e.code not in RETRY_STATUS:
                    raise ScoringRequestFailed(f"{last} (not retried)") from None
                continue
            except (urllib.error.URLError, http.client.HTTPException, OSError) as e:  # refused, reset, timeout
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                last = f"{type(reason).__name__}: {reason}" if not isinstance(reason, str) else reason
                if isinstance(e, socket.timeout) or isinstance(reason, socket.timeout):
                    last = f"no answer within reward.http_timeout_s={self.timeout_s}s"
                continue
            if "json" not in ctype:
                raise ScoringRequestFailed(f"response Content-Type is {ctype!r}, expected application/json")
            try:
                return json.loads(raw)
            except ValueError as e:
                raise ScoringRequestFailed(f"response is not valid JSON: {e}") from None
        raise ScoringRequestFailed(f"POST failed {self.retries + 1} times; last: {last}")
