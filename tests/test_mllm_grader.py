"""The mllm reward against a real HTTP server on 127.0.0.1 (testing/fake_openai_server.py), through the
real openai client: concurrency, timeouts, retries, Retry-After, unusable replies, and the API key."""
from __future__ import annotations

import argparse
import base64
import io
import logging
import math
import os
import re
import secrets
import sys
import time
from email.utils import format_datetime
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reward import (MLLM_ASPECTS, GradeParseError, MllmRequestError, Secret, add_reward_args,  # noqa: E402
                    build_reward, load_mllm_template, parse_grade, retry_after_seconds)
from testing.fake_openai_server import FakeOpenAIServer, Reply, grade_json  # noqa: E402

KEY = "sk-test-" + secrets.token_hex(16)  # unique, so any leak is unambiguous


@pytest.fixture
def server():
    with FakeOpenAIServer() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _no_ambient_openai_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def make_reward(server: FakeOpenAIServer, **flags):
    values = dict(base_url=server.base_url, api_key=Secret(KEY), mllm_model="fake-grader", mllm_timeout=5.0,
                  mllm_max_retries=2, mllm_retry_backoff=0.01, mllm_concurrency=16)
    values.update(flags)
    return build_reward("mllm", argparse.Namespace(**values))


def images(count: int) -> list[Image.Image]:
    return [Image.new("RGB", (8 + i, 8), (i * 7 % 256, 100, 200)) for i in range(count)]


def prompt_number(request) -> int:
    text = request.body["messages"][0]["content"][0]["text"]
    return int(re.search(r"prompt number (\d+)", text)[1])


# ------------------------------------------------------------------------------------------ behaviour
def test_scores_keep_batch_order_and_requests_are_well_formed(server):
    # the grade encodes the prompt; random latencies make replies arrive out of order
    server.respond_with(lambda r: Reply.chat(grade_json(prompt_number(r)), delay_s=(prompt_number(r) * 37 % 5) / 50))
    reward = make_reward(server)
    batch = images(12)
    prompts = [f"prompt number {n}" for n in range(12)]
    out = reward.evaluate(batch, prompts)

    assert out.total.dtype == torch.float32 and out.total.shape == (12,)
    torch.testing.assert_close(out.total, torch.arange(12, dtype=torch.float32) / 100)
    assert set(out.components) == {"mllm"}
    assert reward.counters() == {"mllm/requests": 12, "mllm/retries": 0, "mllm/failures": 0,
                                 "mllm/request_failures": 0, "mllm/parse_failures": 0}

    request = next(r for r in server.requests if prompt_number(r) == 5)
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.body["model"] == "fake-grader"
    assert request.body["max_tokens"] == 1000
    assert request.body["response_format"] == {"type": "json_object"}
    text_part, image_part = request.body["messages"][0]["content"]
    assert "prompt number 5" in text_part["text"] and "{prompt}" not in text_part["text"]
    assert all(aspect in text_part["text"] for aspect in MLLM_ASPECTS)
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.format == "PNG" and decoded.size == batch[5].size
    torch.testing.assert_close(reward(batch, prompts), out.total)  # __call__ == evaluate().total


def test_requests_run_concurrently(server):
    n, latency = 32, 0.2
    server.respond_with(lambda r: Reply.chat(grade_json(50), delay_s=latency))
    reward = make_reward(server, mllm_concurrency=16)
    reward.evaluate(images(2), ["warm up", "warm up"])  # client/connection setup is not what we measure
    server.reset()
    start = time.perf_counter()
    out = reward.evaluate(images(n), [f"p{i}" for i in range(n)])
    elapsed = time.perf_counter() - start
    sequential = n * latency
    print(f"\n{n} images x {latency * 1000:.0f} ms at concurrency 16: {elapsed:.2f} s; sequential would be "
          f">= {sequential:.1f} s; speed-up {sequential / elapsed:.1f}x")
    assert torch.all(out.total == 0.5)
    assert elapsed < 0.5 * sequential
    assert 2 <= server.max_in_flight <= 16


def test_timeout_is_retried_then_scores_nan(server, caplog):
    server.respond_with(lambda r: Reply.chat(grade_json(90), delay_s=1.0))
    reward = make_reward(server, mllm_timeout=0.2, mllm_max_retries=2, mllm_concurrency=2)
    with caplog.at_level(logging.WARNING, logger="reward"):
        out = reward.evaluate(images(2), ["a", "b"])
    assert torch.isnan(out.total).all()
    assert len(server.requests) == 6  # 1 + 2 retries per image
    counters = reward.counters()
    assert counters["mllm/retries"] == 4 and counters["mllm/failures"] == 2
    assert counters["mllm/request_failures"] == 2 and counters["mllm/parse_failures"] == 0
    assert "APITimeoutError" in caplog.text and "after 3 attempt(s)" in caplog.text


def test_server_errors_are_retried_until_success(server):
    server.queue(Reply.error(500), Reply.error(503))
    reward = make_reward(server, mllm_concurrency=1)
    out = reward.evaluate(images(1), ["a"])
    torch.testing.assert_close(out.total, torch.tensor([0.75]))
    assert len(server.requests) == 3
    assert reward.counters()["mllm/retries"] == 2 and reward.counters()["mllm/failures"] == 0


def test_persistent_500_scores_nan_after_bounded_retries(server):
    server.respond_with(lambda r: Reply.error(500))
    reward = make_reward(server, mllm_max_retries=3, mllm_concurrency=1)
    out = reward.evaluate(images(1), ["a"])
    assert torch.isnan(out.total).all()
    assert len(server.requests) == 4
    assert reward.counters()["mllm/failures"] == 1


def test_bad_request_is_not_retried(server):
    server.respond_with(lambda r: Reply.error(400))
    reward = make_reward(server, mllm_concurrency=1)
    assert torch.isnan(reward.evaluate(images(1), ["a"]).total).all()
    assert len(server.requests) == 1


def test_a_batch_the_server_refuses_entirely_stops_the_run(server):
    """One refused image can be the image (a content filter) and scores NaN; every request of a batch refused is the
    request (e.g. a reasoning model refusing max_tokens or temperature): all NaN skipped every update while the run
    went on paying for requests."""
    unsupported = Reply(status=400, body='{"error": {"message": "Unsupported parameter: max_tokens"}}')
    server.respond_with(lambda r: unsupported if prompt_number(r) != 1 else Reply.chat(grade_json(40)))
    reward = make_reward(server)
    prompts = [f"prompt number {n}" for n in range(3)]
    out = reward.evaluate(images(3), prompts)  # one image graded: the others are NaN, the run goes on
    assert out.total[1].item() == pytest.approx(0.4) and torch.isnan(out.total[[0, 2]]).all()
    server.respond_with(lambda r: unsupported)
    with pytest.raises(MllmRequestError, match=r"refused all 3 requests of this batch \(HTTP 400: .*Unsupported parameter: max_tokens.*--mllm_max_tokens"):
        reward.evaluate(images(3), prompts)


def test_429_retry_after_is_honoured(server):
    server.queue(Reply.error(429, headers={"Retry-After": "1"}))
    reward = make_reward(server, mllm_retry_backoff=0.0, mllm_concurrency=1)
    out = reward.evaluate(images(1), ["a"])
    first, second = server.requests
    waited = second.received_at - first.received_at
    print(f"\nRetry-After: 1 -> waited {waited:.2f} s")
    assert waited >= 0.95
    torch.testing.assert_close(out.total, torch.tensor([0.75]))


def test_retry_after_header_forms():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    in_three = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=3), usegmt=True)
    assert 1.5 < retry_after_seconds({"retry-after": in_three}) <= 3.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None and retry_after_seconds(None) is None
    # "nan"/"inf" parse as floats; time.sleep(nan) raises, which used to end the run: fall back to our backoff.
    assert retry_after_seconds({"retry-after": "nan"}) is None and retry_after_seconds({"retry-after": "inf"}) is None
    assert retry_after_seconds({"retry-after-ms": "NaN", "retry-after": "3"}) == 3.0


@pytest.mark.parametrize("reply, kind", [
    (Reply.chat("I would rate this image 8 out of 10."), "parse_failures"),   # numbers but no JSON: never a score
    (Reply.chat('{"overall": 8'), "parse_failures"),                           # truncated JSON in the message
    (Reply.chat('{"overall": 150}'), "parse_failures"),                        # outside 0-100
    (Reply.chat('{"accuracy_to_prompt": 80, "overall": "high"}'), "parse_failures"),
    (Reply.chat(grade_json(None, {"visual_quality_and_realism": None})), "parse_failures"),
    (Reply.raw('{"id": "chatcmpl-1", "choices": [{"message": {"content": "{\\"overall\\": 9'), "request_failures"),
    (Reply.raw("<html>bad gateway</html>"), "request_failures"),
    (Reply.raw('{"id": "x", "object": "chat.completion"}'), "request_failures"),  # no choices at all
])
def test_unusable_replies_score_nan_and_count(server, reply, kind):
    server.respond_with(lambda r: reply)
    reward = make_reward(server, mllm_concurrency=1, mllm_max_retries=1)
    out = reward.evaluate(images(1), ["a"])
    assert torch.isnan(out.total).all()
    counters = reward.counters()
    assert counters["mllm/failures"] == 1 and counters[f"mllm/{kind}"] == 1


# ------------------------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, expected", [
    ('{"overall": 64}', 0.64),
    ('Here you go:\n```json\n{"overall": 64, "note": "x"}\n```\nThanks!', 0.64),
    ('```\n{"Overall Score": "72.5"}\n```', 0.725),
    ('{"overall": {"score": 90, "justification": "good"}}', 0.90),
    ('Sure! {"overall": 0} That is all, 7/10.', 0.0),
    (grade_json(None, {a: {"score": s} for a, s in zip(MLLM_ASPECTS, (10, 20, 30, 40, 50))}), 0.30),
    ('{"Accuracy to Prompt": 60, "Creativity & Originality": 70, "visual-quality-and-realism": 80, '
     '"consistency_and_cohesion": 90, "emotional_or_thematic_resonance": 100}', 0.80),
    ('<think>maybe {"overall": 20}, no</think>{"overall": 90}', 0.90),  # a reasoning model's draft is not its answer
    ('{"overall": 70} and once more: ```json\n{"overall": 70}\n```', 0.70),  # the same grade twice
    ('{"note": "no grade here"} {"overall": 55}', 0.55),  # objects without a grade field are not grades
])
def test_parse_grade_accepts(text, expected):
    assert math.isclose(parse_grade(text), expected, abs_tol=1e-9)


@pytest.mark.parametrize("text", [
    "", "8", "Score: 85/100", '{"overall": -1}', '{"overall": 101}', '{"overall": true}', '{"overall": NaN}',
    '["overall", 80]', '{"accuracy_to_prompt": 80}', '{"overall": "eighty"}', '{"overall": {"value": 3}}',
    '{"overall": Infinity}', '{"overall": 1' + '0' * 400 + '}',  # 10^400 overflowed float() and ended the run
    '{"overall": 1' + '0' * 5000 + '}',  # past Python's int digit limit: a plain ValueError from the JSON decoder
    'Format: {"overall": 0}. My grade: {"overall": 80}',  # two different grades: which is the answer is unknown
    '{"overall": 150} {"overall": 80}',  # one grade object is invalid
])
def test_parse_grade_rejects(text):
    with pytest.raises(GradeParseError):
        parse_grade(text)


def test_the_default_templates_example_answer_is_not_a_grade():
    """A grader that echoes the requested format must not score: the template's example holds no parseable numbers."""
    example = load_mllm_template("default").split("exactly in this form")[1]
    assert "{" in example
    with pytest.raises(GradeParseError):
        parse_grade(example)


# ------------------------------------------------------------------------------------- configuration
def test_api_key_never_printed_logged_or_in_repr(server, caplog, capfd):
    # the server even echoes the key back in an error body, as OpenAI's 401/400 messages partly do
    echo = Reply(status=400, body='{"error": {"message": "Incorrect API key provided: ' + KEY + '"}}')
    server.queue(echo, Reply.error(500), Reply.chat("no json here"))
    parser = argparse.ArgumentParser()
    add_reward_args(parser)
    args = parser.parse_args(["--reward_model", "mllm", "--api_key", KEY, "--base_url", server.base_url,
                              "--mllm_retry_backoff", "0", "--mllm_max_retries", "1", "--mllm_concurrency", "1"])
    with caplog.at_level(logging.DEBUG):
        reward = build_reward(args.reward_model, args)
        out = reward.evaluate(images(3), ["a", "b", "c"])
        print(repr(args), args, repr(reward), str(reward), reward.counters())
        logging.getLogger("reward").warning("args: %s", vars(args))
        server.respond_with(lambda r: Reply(status=401, body='{"error": {"message": "bad key ' + KEY + '"}}'))
        with pytest.raises(MllmRequestError) as info:
            reward.evaluate(images(1), ["d"])
    assert torch.isnan(out.total).sum() == 2  # the 400 and the unparsable reply; the 500 was retried
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}"  # the key was really in use
    captured = capfd.readouterr()
    assert "401" in str(info.value) and KEY not in str(info.value)
    everything = captured.out + captured.err + caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert "Secret('***')" in captured.out
    assert KEY not in everything and KEY[8:] not in everything
    assert "sk-***" in caplog.text or "***" in caplog.text


def test_credentials_in_the_base_url_authenticate_and_never_reach_the_log(server, caplog, capfd):
    """https://user:token@host/v1: the HTTP library logged every request's full URL at INFO, the level the training
    scripts log at, so the token went to stderr (and wandb's console capture) once per graded image."""
    token = "tok-" + secrets.token_hex(8)
    url = server.base_url.replace("://", f"://alice:{token}%21@")  # percent-encoded: the password is token + "!"
    server.respond_with(lambda r: Reply.chat(grade_json(50)))
    with caplog.at_level(logging.INFO):
        reward = make_reward(server, base_url=url)
        out = reward.evaluate(images(2), ["a", "b"])
        print(repr(reward))
    assert torch.isfinite(out.total).all()
    sent = base64.b64decode(server.requests[0].headers["authorization"].removeprefix("Basic ")).decode()
    assert sent == f"alice:{token}!"  # the userinfo authenticates, as it did when it stayed in the URL
    everything = capfd.readouterr().out + caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert "***@127.0.0.1" in everything and token not in everything


def test_key_falls_back_to_openai_api_key(server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY + "-env")
    reward = make_reward(server, api_key=None)
    reward.evaluate(images(1), ["a"])
    assert server.requests[0].headers["authorization"] == f"Bearer {KEY}-env"


def test_missing_key_is_a_clear_error():
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        build_reward("mllm", argparse.Namespace(api_key=None, base_url=None))


def test_local_server_needs_no_key(server):
    reward = make_reward(server, api_key=None)
    torch.testing.assert_close(reward.evaluate(images(1), ["a"]).total, torch.tensor([0.75]))


@pytest.mark.parametrize("flag, value, message", [
    ("mllm_concurrency", 0, "--mllm_concurrency"),
    ("mllm_timeout", 0.0, "--mllm_timeout"),
    ("mllm_max_retries", -1, "--mllm_max_retries"),
    ("mllm_template", "no-such-template", "--mllm_template"),
    ("base_url", "your_base_url", "--base_url 'your_base_url' is not an http\\(s\\) URL"),  # the seed's placeholder
])
def test_bad_grader_flags_fail_before_any_request(server, flag, value, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        make_reward(server, **{flag: value})
    assert server.requests == []


def test_custom_template_file(server, tmp_path):
    template = tmp_path / "strict.txt"
    template.write_text('Rate "{prompt}" from 0 to 100. JSON: {"overall": n}')
    reward = make_reward(server, mllm_template=str(template), mllm_response_format="none")
    reward.evaluate(images(1), ["a red {cat}"])
    body = server.requests[0].body
    assert body["messages"][0]["content"][0]["text"] == 'Rate "a red {cat}" from 0 to 100. JSON: {"overall": n}'
    assert "response_format" not in body


def test_a_rejected_key_stops_at_once_without_waiting_for_requests_in_flight(server):
    """One 401 among slow requests: evaluate raises after about one round trip, not after the slow ones; no
    request starts after the failure."""
    def reply(request):
        return Reply(status=401, body='{"error": {"message": "bad key"}}') if prompt_number(request) == 0 \
            else Reply.chat(grade_json(50), delay_s=4.0)

    server.respond_with(reply)
    reward = make_reward(server, mllm_concurrency=4)
    started = time.monotonic()
    with pytest.raises(MllmRequestError, match="401"):
        reward.evaluate(images(40), [f"prompt number {n}" for n in range(40)])
    assert time.monotonic() - started < 2.0
    time.sleep(0.2)
    assert len(server.requests) <= 4  # the first wave only; the other 36 never started
