"""The mllm reward: an OpenAI-compatible multimodal chat model grades each image with the rubric in
mllm_template/ (the paper's Appendix C); concurrent requests with bounded retries; failures score NaN."""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

import torch
from PIL import Image

from .base import Reward, RewardOutput, Secret, check_batch
from .registry import register_reward


# The facade's name, so the grader's warnings read "reward: mllm: ..." and logging set up for "reward" covers them.
logger = logging.getLogger("reward")

REPO_DIR = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = REPO_DIR / "mllm_template"


def _mllm_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--api_key", type=Secret, default=None,
                   help="Key for the mllm grader. Prefer the OPENAI_API_KEY environment variable: a key on the command "
                        "line is visible to other users of the machine. Never logged or saved.")
    g.add_argument("--base_url", default=None,
                   help="OpenAI-compatible endpoint for the mllm grader, e.g. http://localhost:8000/v1 for vLLM or "
                        "http://localhost:11434/v1 for Ollama (default: OPENAI_BASE_URL or api.openai.com).")
    g.add_argument("--mllm_model", default="gpt-4o", help="Model name sent to the chat completions endpoint.")
    g.add_argument("--mllm_template", default="default",
                   help="Grading prompt: a name in mllm_template/ (without .txt) or a path to a text file containing "
                        "{prompt}. The reply must be a JSON object with 'overall' or the five aspect scores, 0-100.")
    g.add_argument("--mllm_concurrency", type=int, default=16, help="Grader requests in flight at once.")
    g.add_argument("--mllm_timeout", type=float, default=60.0, help="Seconds before one grader request is abandoned.")
    g.add_argument("--mllm_max_retries", type=int, default=3,
                   help="Retries of a grader request after a timeout, connection error, 408/409/429 or 5xx; "
                        "an image whose request still fails scores NaN (counted in mllm/failures).")
    g.add_argument("--mllm_retry_backoff", type=float, default=1.0,
                   help="Base seconds of the exponential backoff between retries (a Retry-After header wins).")
    g.add_argument("--mllm_max_backoff", type=float, default=60.0, help="Longest wait between two retries, in seconds.")
    g.add_argument("--mllm_max_tokens", type=int, default=1000, help="max_tokens of each grader reply (paper: 1000).")
    g.add_argument("--mllm_temperature", type=float, default=0.0,
                   help="Sampling temperature of the grader; 0 makes the reward as repeatable as the server allows.")
    g.add_argument("--mllm_response_format", choices=("json_object", "none"), default="json_object",
                   help="Ask the server for JSON mode; use 'none' for servers that reject response_format.")


# The paper's rubric (Appendix C): five aspects, each 0-100, and an overall score; normalised to [0, 1].
MLLM_ASPECTS = (
    "accuracy_to_prompt",
    "creativity_and_originality",
    "visual_quality_and_realism",
    "consistency_and_cohesion",
    "emotional_or_thematic_resonance",
)
MLLM_SCORE_MAX = 100.0
_RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx
_FATAL_STATUS = {401: "the API key was rejected (set OPENAI_API_KEY or --api_key)",
                 403: "access denied for this key or model (--mllm_model, --api_key)",
                 404: "no such model or endpoint (--mllm_model, --base_url)"}
_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*]{6,}")


class GradeParseError(ValueError):
    """The grader's reply holds no usable score."""


def parse_grade(text: str) -> float:
    """The normalised score in [0, 1] from a grader reply: a JSON object, possibly in a ```json fence.

    Uses "overall", or the mean of the five aspects when overall is absent. Any score outside 0-100
    rejects the reply: a guess (the upstream's last number in the text, or 7.0) would be a made-up reward.
    Every top-level object that names a grade field is read (a <think> block is dropped first): a reply that
    echoes the requested format or writes a draft before its answer holds several, and unless they agree,
    which one is the answer is unknown, so the reply is rejected rather than one of them picked.
    """
    if not isinstance(text, str) or not text.strip():
        raise GradeParseError("empty reply")
    objects = _json_objects(_THINK_BLOCK.sub("", text))
    if not objects:
        raise GradeParseError("no complete JSON object in the reply")
    graded = [obj for obj in objects if _GRADE_FIELDS & {_normalise_key(key) for key in obj}]
    grades = {_grade(obj) for obj in (graded or objects[:1])}  # none names a grade: the first says what is missing
    if len(grades) > 1:
        raise GradeParseError(f"the reply holds {len(graded)} grade objects with different grades {sorted(grades)}")
    return grades.pop()


_THINK_BLOCK = re.compile(r"<think>.*?</think>", flags=re.DOTALL | re.IGNORECASE)
_GRADE_FIELDS = {"overall", "overall_score", *MLLM_ASPECTS}


def _grade(obj: dict) -> float:
    fields = {_normalise_key(key): value for key, value in obj.items()}
    for key in ("overall", "overall_score"):
        if key in fields:
            return _score_value(fields[key], "overall") / MLLM_SCORE_MAX
    missing = [aspect for aspect in MLLM_ASPECTS if aspect not in fields]
    if missing:
        raise GradeParseError(f"no 'overall' and aspects missing: {missing}")
    return sum(_score_value(fields[aspect], aspect) for aspect in MLLM_ASPECTS) / len(MLLM_ASPECTS) / MLLM_SCORE_MAX


def _json_objects(text: str) -> list[dict]:
    """Every top-level JSON object in the text, in order (an object nested in another is part of it)."""
    decoder = json.JSONDecoder()
    objects, position = [], 0
    while (start := text.find("{", position)) != -1:
        try:
            obj, position = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):  # JSONDecodeError, an integer past Python's digit limit, deep nesting
            position = start + 1
            continue
        if isinstance(obj, dict):
            objects.append(obj)
    return objects


def _normalise_key(key: Any) -> str:
    """'Accuracy to Prompt', 'creativity & originality' -> 'accuracy_to_prompt', 'creativity_and_originality'."""
    return re.sub(r"[^a-z0-9]+", "_", str(key).lower().replace("&", " and ")).strip("_")


def _score_value(value: Any, name: str) -> float:
    if isinstance(value, dict):
        if "score" not in value:
            raise GradeParseError(f"{name!r} has no 'score'")
        value = value["score"]
    if isinstance(value, bool):
        raise GradeParseError(f"{name!r} is a boolean")
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d+(\.\d+)?\s*", value):
        value = float(value)
    if not isinstance(value, (int, float)) or value != value:  # NaN
        raise GradeParseError(f"{name!r} is not a number: {value!r}")
    # Compared before any float(): an integer of 309+ digits is valid JSON and overflows float().
    if not 0.0 <= value <= MLLM_SCORE_MAX:
        raise GradeParseError(f"{name!r} = {str(value)[:20]} is outside 0-{MLLM_SCORE_MAX:g}")
    return float(value)


def load_mllm_template(name_or_path: str) -> str:
    """A template name in mllm_template/ or a file path; it must contain {prompt}."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = TEMPLATE_DIR / f"{name_or_path}.txt"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in TEMPLATE_DIR.glob("*.txt")))
        raise FileNotFoundError(f"--mllm_template {name_or_path!r}: no such file, nor a template in {TEMPLATE_DIR} "
                                f"(available: {names}).")
    template = path.read_text(encoding="utf-8")
    if "{prompt}" not in template:
        raise ValueError(f"--mllm_template {path}: the template must contain {{prompt}}.")
    return template


def encode_image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class MllmRequestError(RuntimeError):
    """A grader request that cannot succeed by retrying (bad key, unknown model)."""


class MllmReward(Reward):
    """Grades each image with a multimodal chat model; requests run concurrently with bounded retries.

    A request that still fails, or a reply without a valid score, gives NaN and counts in counters().
    """

    name = "mllm"
    io_bound = True

    def __init__(self, client: Any, *, model: str, template: str, concurrency: int, timeout: float,
                 max_retries: int, backoff: float, max_backoff: float, max_tokens: int, temperature: float,
                 json_mode: bool, base_url: str | None, secret: Secret | None) -> None:
        self.client, self.model, self.template = client, model, template
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.max_tokens, self.temperature, self.json_mode = max_tokens, temperature, json_mode
        self.base_url = strip_userinfo(base_url)
        self._secret = secret  # only to scrub it from error text; its repr is masked
        self._counts = {"requests": 0, "retries": 0, "failures": 0, "request_failures": 0, "parse_failures": 0}
        self._lock = threading.Lock()

    def evaluate(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> RewardOutput:
        check_batch(images, prompts)
        if not images:
            empty = torch.zeros(0)
            return RewardOutput(total=empty, components={self.name: empty})
        scores = self._grade_all(list(images), list(prompts))
        total = torch.tensor(scores, dtype=torch.float32)
        return RewardOutput(total=total, components={self.name: total})

    def _grade_all(self, images: list[Image.Image], prompts: list[str]) -> list[float]:
        """Grade with `concurrency` worker threads. A fatal error (rejected key, unknown model) raises at once:
        no new request starts, and requests still in flight are abandoned (daemon threads) instead of awaited, so
        a run with a bad key stops in about one round trip, on every rank that sees it."""
        scores: list[float] = [float("nan")] * len(images)
        refused: list[str] = []  # the server's reason for each request it refused as bad (a 4xx other than the fatal ones)
        pending = iter(range(len(images)))
        lock, finished, failure = threading.Lock(), threading.Event(), []
        remaining = [len(images)]

        def work() -> None:
            while not failure:
                with lock:
                    index = next(pending, None)
                if index is None:
                    return
                try:
                    scores[index] = self._grade(images[index], prompts[index], index, refused)
                except BaseException as err:  # MllmRequestError, or a bug: stop everything
                    failure.append(err)
                    finished.set()
                    return
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        finished.set()

        for _ in range(min(self.concurrency, len(images))):
            threading.Thread(target=work, name="mllm", daemon=True).start()
        finished.wait()
        if failure:
            raise failure[0]
        if len(images) > 1 and len(refused) == len(images):
            # One refused image can be the image (a content filter); every one of them is the request: scoring all
            # NaN would skip every update of the run while it went on paying for requests.
            raise MllmRequestError(f"mllm grader: the server refused all {len(images)} requests of this batch ({refused[0]}). "
                                   "The request does not suit this server or model: check --mllm_model, --mllm_max_tokens, "
                                   "--mllm_temperature and --mllm_response_format (reasoning models refuse some of them).")
        return scores

    def _grade(self, image: Image.Image, prompt: str, index: int, refused: list[str]) -> float:
        reply = self._request(self._messages(image, prompt), index, refused)
        if reply is None:
            return float("nan")
        try:
            return parse_grade(reply)
        except GradeParseError as err:
            self._count("failures", "parse_failures")
            logger.warning("mllm: unusable reply for image %d (%s): %r; scoring it NaN.", index, err,
                           self._scrub(reply[:200]))
            return float("nan")

    def _messages(self, image: Image.Image, prompt: str) -> list[dict]:
        text = self.template.replace("{prompt}", prompt)
        return [{"role": "user", "content": [
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": encode_image_data_url(image)}},
        ]}]

    def _request(self, messages: list[dict], index: int, refused: list[str]) -> str | None:
        """The reply text, or None once the retries are spent (counted and logged; a refused bad request is also
        added to `refused`)."""
        import openai

        extra: dict[str, Any] = {"response_format": {"type": "json_object"}} if self.json_mode else {}
        last_error = "no attempt"
        for attempt in range(self.max_retries + 1):
            self._count("requests")
            if attempt:
                self._count("retries")
            headers = None
            try:
                response = self.client.chat.completions.create(
                    model=self.model, messages=messages, max_tokens=self.max_tokens, temperature=self.temperature,
                    timeout=self.timeout, **extra)
                return _reply_text(response)
            except openai.APIStatusError as err:
                if err.status_code in _FATAL_STATUS:
                    raise MllmRequestError(f"mllm grader: HTTP {err.status_code}, {_FATAL_STATUS[err.status_code]}: "
                                           f"{self._scrub(str(err))[:300]}") from None
                if err.status_code not in _RETRYABLE_STATUS and err.status_code < 500:
                    last_error = f"HTTP {err.status_code}: {self._scrub(str(err))[:300]}"
                    refused.append(last_error)
                    break  # a bad request stays bad
                last_error, headers = f"HTTP {err.status_code}", err.response.headers
            except (openai.APIConnectionError, openai.APIResponseValidationError, _EmptyReply,
                    json.JSONDecodeError) as err:
                # timeouts, refused connections, bodies that are not a chat completion: transient
                last_error = f"{type(err).__name__}: {self._scrub(str(err))[:200]}"
            if attempt < self.max_retries:
                time.sleep(self._retry_delay(attempt, headers))
        self._count("failures", "request_failures")
        logger.warning("mllm: request for image %d failed (%s) after %d attempt(s); scoring it NaN.",
                       index, last_error, attempt + 1)
        return None

    def _retry_delay(self, attempt: int, headers: Any) -> float:
        server_says = retry_after_seconds(headers)
        if server_says is not None:
            return min(server_says, self.max_backoff)
        # exponential backoff with jitter, so concurrent requests do not retry in lockstep
        return min(self.backoff * 2 ** attempt, self.max_backoff) * random.uniform(0.5, 1.0)

    def _count(self, *keys: str) -> None:
        with self._lock:
            for key in keys:
                self._counts[key] += 1

    def _scrub(self, text: str) -> str:
        if self._secret and self._secret.reveal():
            text = text.replace(self._secret.reveal(), "***")
        return _KEY_PATTERN.sub("sk-***", text)

    def counters(self) -> dict[str, int]:
        with self._lock:
            return {f"mllm/{key}": value for key, value in self._counts.items()}

    def __repr__(self) -> str:
        return (f"MllmReward(model={self.model!r}, base_url={self.base_url!r}, concurrency={self.concurrency}, "
                f"timeout={self.timeout}, max_retries={self.max_retries})")


class _EmptyReply(Exception):
    """A 200 response without a message text."""


def _reply_text(response: Any) -> str:
    choices = getattr(response, "choices", None)
    if not choices or getattr(choices[0], "message", None) is None or not choices[0].message.content:
        raise _EmptyReply("the response has no message content")
    return choices[0].message.content


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds the server asks us to wait: retry-after-ms, or retry-after as seconds or an HTTP date."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            seconds = float(value) / 1000.0
            if math.isfinite(seconds):  # "NaN" and "inf" parse as floats, and time.sleep refuses NaN
                return max(seconds, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def strip_userinfo(url: str | None) -> str | None:
    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def split_userinfo(url: str | None) -> tuple[str | None, tuple[str, str] | None]:
    """The URL without its user:password@ part, and that (user, password), percent-decoded; None when there is none."""
    parts = urlsplit(url) if url else None
    if parts is None or "@" not in parts.netloc:
        return url, None
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=host)), (unquote(user), unquote(password))


def _api_key(args: argparse.Namespace) -> Secret | None:
    key = args.api_key
    if isinstance(key, str):  # a Namespace built in code rather than by add_reward_args
        key = Secret(key)
    if key:
        return key
    env = os.environ.get("OPENAI_API_KEY", "")
    return Secret(env) if env else None


def _is_http_url(url: str) -> bool:
    from urllib.parse import urlparse

    parsed = urlparse(url)
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)


def _check_mllm_args(args: argparse.Namespace) -> None:
    if args.mllm_concurrency < 1:
        raise ValueError("--mllm_concurrency must be >= 1.")
    if not args.mllm_timeout > 0:
        raise ValueError("--mllm_timeout must be > 0 seconds.")
    if args.mllm_max_retries < 0:
        raise ValueError("--mllm_max_retries must be >= 0.")
    if args.mllm_retry_backoff < 0 or args.mllm_max_backoff < 0:
        raise ValueError("--mllm_retry_backoff and --mllm_max_backoff must be >= 0.")
    where, url = ("--base_url", args.base_url) if args.base_url else ("OPENAI_BASE_URL", os.environ.get("OPENAI_BASE_URL"))
    if url and not _is_http_url(url):
        # e.g. the placeholder "your_base_url": every request would fail to connect and score NaN, skipping every update
        raise ValueError(f"{where} {strip_userinfo(url)!r} is not an http(s) URL; give the server's address, e.g. "
                         "https://api.openai.com/v1 or http://localhost:8000/v1, or leave it out for OpenAI's.")
    if _api_key(args) is None and not url:
        raise ValueError("the mllm reward needs an API key: set OPENAI_API_KEY (preferred) or pass --api_key; for a "
                         "local OpenAI-compatible server without authentication pass --base_url.")
    template = load_mllm_template(args.mllm_template)
    if args.mllm_response_format == "json_object" and "json" not in template.lower():
        raise ValueError(f"--mllm_template {args.mllm_template!r} never mentions JSON, which OpenAI's JSON mode "
                         "requires; say so in the template or pass --mllm_response_format none.")


@register_reward("mllm", flags=_mllm_flags, validate=_check_mllm_args)
def build_mllm_reward(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> MllmReward:
    import openai

    _check_mllm_args(args)
    secret = _api_key(args)
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL") or None
    # Credentials in the URL (https://user:token@host/v1) go to the HTTP client as basic auth, as the URL's userinfo
    # would, and leave the URL: the client's HTTP library logs every request's URL at INFO.
    address, credentials = split_userinfo(base_url)
    http_client = openai.DefaultHttpxClient(auth=credentials) if credentials else None
    for name in ("httpx", "httpx2"):  # one INFO line per graded image otherwise (m x N per step)
        logging.getLogger(name).setLevel(logging.WARNING)
    # Local servers (vLLM, Ollama) accept any key, but the client refuses to start without one.
    client = openai.OpenAI(api_key=secret.reveal() if secret else "EMPTY", base_url=address, http_client=http_client,
                           timeout=args.mllm_timeout, max_retries=0)  # our own retry loop counts and bounds retries
    return MllmReward(client, model=args.mllm_model, template=load_mllm_template(args.mllm_template),
                      concurrency=args.mllm_concurrency, timeout=args.mllm_timeout,
                      max_retries=args.mllm_max_retries, backoff=args.mllm_retry_backoff,
                      max_backoff=args.mllm_max_backoff, max_tokens=args.mllm_max_tokens,
                      temperature=args.mllm_temperature, json_mode=args.mllm_response_format == "json_object",
                      base_url=base_url, secret=secret)
