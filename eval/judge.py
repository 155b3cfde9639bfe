"""An LLM judge over any OpenAI-compatible chat-completions endpoint.

MM-Vet (``yuweihao/MM-Vet``, ``mm-vet_evaluator.py``) and LLaVA-Bench in-the-wild
(``haotian-liu/LLaVA``, ``llava/eval/eval_gpt_review_bench.py``) score answers with GPT-4
through the ``openai`` client. :class:`Judge` sends the same requests with the standard
library to any server that speaks ``POST {base_url}/chat/completions``: OpenAI itself, a
local vLLM (``vllm serve MODEL`` → ``http://localhost:8000/v1``), or a proxy.

The API key is read from the environment variable named by
:attr:`JudgeConfig.api_key_env` at request time and goes into the ``Authorization``
header only: it is never stored on an object, and it is scrubbed from every log line and
error message (a server may echo it back in an error body).

Transport failures are retried with exponential backoff, as the official scripts do
(``eval_gpt_review_bench.get_eval`` retries every exception after 0.5 s; the ``openai``
client that ``mm-vet_evaluator.py`` uses retries connection errors, 408, 409, 429 and 5xx
with exponential backoff); unlike them, the number of retries is bounded.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fedsim.configtools import ConfigError, from_dict

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Environment fallbacks for a judge not set in the config.
BASE_URL_ENV = "FEDSIM_JUDGE_BASE_URL"
MODEL_ENV = "FEDSIM_JUDGE_MODEL"

# HTTP statuses worth another try (the openai client's list): timeout, conflict, rate
# limit, and every server error. Anything else (400, 401, 403, 404, 422) will not heal.
_RETRY_STATUSES = frozenset({408, 409, 429})
_REDACTED = "***"


class JudgeNotConfigured(ConfigError):
    """A judged benchmark was asked to score with no judge endpoint or model set."""


class JudgeError(RuntimeError):
    """The judge endpoint failed (after retries) or answered something unreadable."""


@dataclass(frozen=True, kw_only=True)
class JudgeConfig:
    """Where the judge lives and how it is called (``eval.judge`` in the run config).

    Attributes
    ----------
    base_url:
        The OpenAI-style API root, ``/v1`` included, e.g. ``http://localhost:8000/v1``
        for ``vllm serve``; requests go to ``{base_url}/chat/completions``. Null: read
        ``FEDSIM_JUDGE_BASE_URL``; still unset: no judge (judged benchmarks refuse).
    model:
        The judge's model name as the endpoint knows it (the official scripts use
        ``gpt-4-0613`` for MM-Vet and ``gpt-4-0314`` for LLaVA-Bench). Null: read
        ``FEDSIM_JUDGE_MODEL``. Every judged score stores it as ``judge_model``.
    api_key_env:
        Name of the environment variable that holds the API key (sent as
        ``Authorization: Bearer …``); when that variable is unset or empty no header
        is sent, as a local vLLM without ``--api-key`` expects. Whitespace around the
        key (a trailing newline) is ignored; a key with a line break, control or
        non-ASCII character inside is refused with an error that names the variable.
    temperature:
        Sampling temperature; null: the benchmark's official value (MM-Vet 0.0, raised
        by 0.5 on every unparsable grade; LLaVA-Bench 0.2).
    max_tokens:
        Reply budget; null: the benchmark's official value (MM-Vet 3, LLaVA-Bench 1024).
    retries:
        Further attempts after a failed request (connection error, timeout, HTTP 408,
        409, 429 or 5xx, unreadable body) before :class:`JudgeError` is raised.
    timeout:
        Seconds to wait for one response.
    backoff:
        Seconds before the first retry; doubled for each further one.
    max_backoff:
        Cap on the wait between two attempts (a ``Retry-After`` header counts too).
    workers:
        Requests in flight at once (threads); results keep question order.
    """

    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    temperature: float | None = None
    max_tokens: int | None = None
    retries: int = 5
    timeout: float = 120.0
    backoff: float = 1.0
    max_backoff: float = 30.0
    workers: int = 4

    def __post_init__(self) -> None:
        if self.base_url is not None:
            scheme = urllib.parse.urlsplit(self.base_url).scheme
            if scheme not in ("http", "https"):
                raise ConfigError(
                    f"eval.judge.base_url: {_safe_url(self.base_url)!r} is not an "
                    "http(s) URL"
                )
        if not self.api_key_env:
            raise ConfigError("eval.judge.api_key_env: must not be empty")
        if self.temperature is not None and not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(
                f"eval.judge.temperature: must be in [0, 2], got {self.temperature!r}"
            )
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigError(
                f"eval.judge.max_tokens: must be > 0, got {self.max_tokens!r}"
            )
        if self.retries < 0:
            raise ConfigError(f"eval.judge.retries: must be >= 0, got {self.retries!r}")
        for name in ("timeout", "workers"):
            if getattr(self, name) <= 0:
                raise ConfigError(
                    f"eval.judge.{name}: must be > 0, got {getattr(self, name)!r}"
                )
        for name in ("backoff", "max_backoff"):
            if getattr(self, name) < 0:
                raise ConfigError(
                    f"eval.judge.{name}: must be >= 0, got {getattr(self, name)!r}"
                )

    @property
    def configured(self) -> bool:
        """Both an endpoint and a model are set."""
        return bool(self.base_url) and bool(self.model)

    @property
    def endpoint(self) -> str:
        """``{base_url}/chat/completions``."""
        if not self.base_url:
            raise JudgeNotConfigured("eval.judge.base_url: not set")
        return self.base_url.rstrip("/") + "/chat/completions"


def resolve_judge(
    config: JudgeConfig | Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> JudgeConfig:
    """The judge from the config, endpoint and model falling back to the environment.

    Parameters
    ----------
    config:
        A :class:`JudgeConfig`, the ``eval.judge`` mapping of a YAML config, or None.
    env:
        The environment (default ``os.environ``); ``FEDSIM_JUDGE_BASE_URL`` and
        ``FEDSIM_JUDGE_MODEL`` fill a null ``base_url`` / ``model``.

    Returns
    -------
    JudgeConfig
        Possibly unconfigured (see :attr:`JudgeConfig.configured`); judged benchmarks
        then raise :class:`JudgeNotConfigured`, the others never look at it.
    """
    env = os.environ if env is None else env
    if config is None:
        cfg = JudgeConfig()
    elif isinstance(config, JudgeConfig):
        cfg = config
    else:
        cfg = from_dict(JudgeConfig, config, prefix="eval.judge")
    base_url = cfg.base_url or env.get(BASE_URL_ENV) or None
    model = cfg.model or env.get(MODEL_ENV) or None
    if (base_url, model) == (cfg.base_url, cfg.model):
        return cfg
    return from_dict(
        JudgeConfig,
        {**_fields(cfg), "base_url": base_url, "model": model},
        prefix="eval.judge",
    )


def require_judge(
    judge: JudgeConfig | Mapping[str, Any] | None, benchmark: str
) -> Judge:
    """A ready :class:`Judge`, or the one-line error a judged benchmark gives without one."""
    cfg = resolve_judge(judge)
    if not cfg.configured:
        raise JudgeNotConfigured(
            f"{benchmark}: needs an LLM judge: set eval.judge.base_url and "
            "eval.judge.model (any OpenAI-compatible endpoint)"
        )
    return Judge(cfg)


@dataclass(frozen=True)
class JudgeReply:
    """One chat completion: the reply text (None if the server sent none) and the model
    name the server reports."""

    content: str | None
    model: str


class Judge:
    """Chat completions against :attr:`JudgeConfig.endpoint`, retried, key kept secret.

    Parameters
    ----------
    config:
        A configured :class:`JudgeConfig`.
    sleep:
        Waits between attempts (tests pass a no-op).
    """

    def __init__(
        self, config: JudgeConfig, sleep: Callable[[float], None] = time.sleep
    ) -> None:
        if not config.configured:
            raise JudgeNotConfigured(
                "eval.judge: set base_url and model (any OpenAI-compatible endpoint)"
            )
        self.config = config
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"Judge(model={self.config.model!r}, endpoint={self._where()!r})"

    @property
    def model(self) -> str:
        """The configured judge model (stored beside every judged score)."""
        assert self.config.model is not None
        return self.config.model

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        temperature: float,
        max_tokens: int,
    ) -> JudgeReply:
        """One completion of ``messages``, retried on transport and server errors.

        Raises
        ------
        JudgeError
            The endpoint refused (HTTP 4xx other than 408/409/429), or kept failing
            for ``1 + retries`` attempts.
        """
        body = json.dumps(
            {
                "model": self.config.model,
                "messages": [dict(m) for m in messages],
                "temperature": temperature,
                "max_tokens": max_tokens,
            }
        ).encode("utf-8")
        self._check_key()
        attempts = self.config.retries + 1
        for attempt in range(1, attempts + 1):
            wait = min(
                self.config.backoff * 2 ** (attempt - 1), self.config.max_backoff
            )
            refused: str | None = None
            try:
                return self._post(body)
            except urllib.error.HTTPError as e:
                status = e.code
                detail = self._http_detail(e)
                if status not in _RETRY_STATUSES and status < 500:
                    raise JudgeError(f"judge {self._where()}: {detail}") from None
                retry_after = _retry_after(e.headers.get("Retry-After"))
                if retry_after is not None:
                    wait = min(max(wait, retry_after), self.config.max_backoff)
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                # Connection refused or reset, timeout (an OSError), truncated body.
                detail = self._scrub(f"{type(e).__name__}: {getattr(e, 'reason', e)}")
            except _BadReply as e:
                detail = self._scrub(str(e))
            except ValueError as e:
                # A request urllib or http.client refuses to send: not worth a retry.
                # Their messages quote the offending value, so the original exception is
                # not kept as context either.
                refused = self._scrub(str(e))
            if refused is not None:
                raise JudgeError(f"judge {self._where()}: {refused}")
            if attempt == attempts:
                raise JudgeError(
                    f"judge {self._where()}: {detail} (gave up after {attempts} "
                    "attempts)"
                ) from None
            log.warning(
                "judge %s: %s; retry %d/%d in %.1f s",
                self._where(),
                detail,
                attempt,
                attempts - 1,
                wait,
            )
            self._sleep(wait)
        raise AssertionError("unreachable")

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """``[fn(x) for x in items]`` with up to ``workers`` calls in flight, in order.

        The first failure (in item order) cancels the calls not yet started and is
        raised.
        """
        items = list(items)
        if self.config.workers == 1 or len(items) <= 1:
            return [fn(x) for x in items]
        with ThreadPoolExecutor(
            max_workers=self.config.workers, thread_name_prefix="judge"
        ) as pool:
            futures: list[Future[R]] = [pool.submit(fn, x) for x in items]
            try:
                return [f.result() for f in futures]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise

    # -- internals -----------------------------------------------------------------

    def _post(self, body: bytes) -> JudgeReply:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(
            self.config.endpoint, data=body, headers=headers, method="POST"
        )
        with urllib.request.urlopen(request, timeout=self.config.timeout) as response:
            raw = response.read()
        try:
            data = json.loads(raw)
            message = data["choices"][0]["message"]
            content = message.get("content")
            if content is not None and not isinstance(content, str):
                raise TypeError("content is not a string")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            excerpt = raw[:200].decode("utf-8", "replace")
            raise _BadReply(f"unreadable reply ({e!r}): {excerpt!r}") from None
        return JudgeReply(content=content, model=str(data.get("model") or ""))

    def _key(self) -> str:
        # A key read from a file often ends in a newline: never part of the key.
        return os.environ.get(self.config.api_key_env, "").strip()

    def _check_key(self) -> None:
        """Refuse a key that no HTTP header can carry (a line break, a non-ASCII or
        control character): urllib's error would quote the whole header, key included."""
        key = self._key()
        if key and not (key.isascii() and key.isprintable()):
            raise JudgeError(
                f"judge {self._where()}: the API key in ${self.config.api_key_env} "
                "holds a line break, control or non-ASCII character; an HTTP header "
                "cannot carry it"
            )

    def _scrub(self, text: str) -> str:
        """``text`` with the API key (if any) replaced by ``***``."""
        key = self._key()
        return text.replace(key, _REDACTED) if key else text

    def _where(self) -> str:
        return f"{self.config.model} at {_safe_url(self.config.endpoint)}"

    def _http_detail(self, e: urllib.error.HTTPError) -> str:
        detail = f"HTTP {e.code} {e.reason}"
        if e.code in (401, 403):
            # Auth errors often quote the key back (OpenAI masks part of it): say
            # which variable was used instead, and drop the body.
            var = self.config.api_key_env
            state = "set" if self._key() else "not set"
            return f"{detail} (API key from ${var}, {state})"
        try:
            excerpt = e.read()[:300].decode("utf-8", "replace").strip()
        except Exception:  # the body is a courtesy only
            excerpt = ""
        return self._scrub(f"{detail}: {excerpt}" if excerpt else detail)


class _BadReply(ValueError):
    """A 200 response that is not a chat completion (retried like a server error)."""


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _safe_url(url: str) -> str:
    """``url`` without user info, query or fragment (where a key could hide)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        host = f"{host}:{port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def _fields(cfg: JudgeConfig) -> dict[str, Any]:
    return {name: getattr(cfg, name) for name in cfg.__dataclass_fields__}
