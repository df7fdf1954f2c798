"""Reference reward server: serve any reward function (or scorer class) over HTTP for reward.http:HttpScorer.

    relayrl reward-server --function my_module:my_reward --host 127.0.0.1 --port 8000 --max-body-bytes 8388608

    GET  /health   -> {"status": "ok", "function": "my_module:my_reward"}
    POST /score    {"prompts": [str], "completions": [str], "answers": [str]}   (application/json)
                   -> {"scores": [float|null]}  or  {"total": [...], "components": {"<part>": [...]}}
                      plus "failures": [{"index", "reason", "detail"}] for samples that could not be scored

The function's output is checked exactly as in a reward actor (reward.worker.check_output), so
NaN never goes on the wire: a bad sample comes back as null with a failure and its reason, and an
exception in the function fails every sample of the request with the exception's message.

Limits: a body larger than max_body_bytes is refused with 413 before it is read in full; a body
that is not JSON of three equal-length lists of strings is refused with 422 (415 for another
Content-Type). It binds 127.0.0.1 unless told otherwise: it runs arbitrary scoring code and has no
authentication, so expose it beyond the machine only behind something that does.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handler's annotations here
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError, model_validator
from starlette.concurrency import run_in_threadpool

from core.config import RewardConfig
from core.messages import ScoreResult
from reward.worker import Scorer, instantiate, score_batch

DEFAULT_MAX_BODY_BYTES = 8 * 2**20


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[StrictStr]
    completions: list[StrictStr]
    answers: list[StrictStr]

    @model_validator(mode="after")
    def _same_lengths(self) -> "ScoreRequest":
        if not len(self.prompts) == len(self.completions) == len(self.answers):
            raise ValueError(f"prompts, completions and answers must have the same length, got "
                             f"{len(self.prompts)}, {len(self.completions)}, {len(self.answers)}")
        return self


def result_to_json(res: ScoreResult) -> dict[str, Any]:
    """The wire form of a checked ScoreResult (see the module docstring)."""
    out: dict[str, Any] = ({"total": list(res.scores), "components": {k: list(v) for k, v in res.components.items()}}
                           if res.components else {"scores": list(res.scores)})
    if res.failures:
        out["failures"] = [{"index": f.index, "reason": f.reason, "detail": f.detail} for f in res.failures]
    return out


def create_app(scorer: Scorer, name: str = "", max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    app = FastAPI(title="relayrl reward server", docs_url=None, redoc_url=None, openapi_url=None)
    lock = threading.Lock()  # scorers (a model, a session) need not be thread-safe: one batch at a time

    def _score(req: ScoreRequest) -> ScoreResult:
        with lock:
            return score_batch(scorer, req.prompts, req.completions, req.answers)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "function": name}

    @app.post("/score")
    async def score(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("application/json"):
            return JSONResponse({"detail": f"Content-Type must be application/json, got {ctype!r}"}, status_code=415)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            return JSONResponse({"detail": f"body of {declared} bytes exceeds the limit of {max_body_bytes}"}, 413)
        body = bytearray()
        async for chunk in request.stream():  # also bounds a chunked body that declared no length
            body += chunk
            if len(body) > max_body_bytes:
                return JSONResponse({"detail": f"body exceeds the limit of {max_body_bytes} bytes"}, 413)
        try:
            req = ScoreRequest.model_validate_json(bytes(body))
        except ValidationError as e:
            return JSONResponse({"detail": json.loads(e.json(include_url=False))}, status_code=422)
        return JSONResponse(result_to_json(await run_in_threadpool(_score, req)))

    return app


def build_app(cfg: RewardConfig, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """The app for the scorer that `cfg.function` names (a class is built once, from `cfg`)."""
    return create_app(instantiate(cfg.function, cfg), cfg.function, max_body_bytes)


def serve(cfg: RewardConfig, host: str = "127.0.0.1", port: int = 8000,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(build_app(cfg, max_body_bytes), host=host, port=port, log_level=log_level)


class BackgroundServer:
    """Run an app on a free loopback port in a daemon thread (tests, notebooks):

        with BackgroundServer(create_app(my_reward)) as srv:
            HttpScorer(srv.url + "/score")(prompts, completions, answers)

    The socket is bound before the thread starts, so the port cannot be taken in between.
    """

    def __init__(self, app, host: str = "127.0.0.1", start_timeout_s: float = 30.0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        self.url = f"http://{self.host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"reward server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
