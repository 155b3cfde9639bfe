"""Judged benchmarks (MM-Vet, LLaVA-Bench) against a scripted local judge server.

A real ``http.server`` in a thread plays the OpenAI-compatible endpoint: it records every
request and answers from a script, so the tests see the exact bytes the official
graders would send, and scores computed from scripted grades match hand-computed ones.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fedsim.configtools import ConfigError, to_dict
from fedsim.eval import llava_bench, mmvet
from fedsim.eval.benchmark import BenchmarkError
from fedsim.eval.judge import (
    Judge,
    JudgeConfig,
    JudgeError,
    JudgeNotConfigured,
    resolve_judge,
)

KEY_ENV = "FEDSIM_TEST_JUDGE_KEY"
KEY = "sk-test-DO-NOT-LEAK-7f3a9c2e41"
JUDGE_MODEL = "judge-m"


# -- the scripted judge ------------------------------------------------------------


@dataclass
class Reply:
    """A scripted answer: a chat completion with ``content``, or an error status."""

    content: str | None = None
    status: int = 200
    body: str | None = None  # raw body for errors
    delay: float = 0.0


@dataclass
class FakeJudge:
    """The server's script and what it received."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    queue: deque[Reply] = field(default_factory=deque)
    #: When the queue is empty: request JSON → reply.
    respond: Callable[[dict[str, Any]], Reply] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next_reply(self, request: dict[str, Any]) -> Reply:
        with self.lock:
            if self.queue:
                return self.queue.popleft()
        assert self.respond is not None, "no scripted reply left"
        return self.respond(request)

    def config(self, **kw: Any) -> JudgeConfig:
        base = dict(
            base_url=self.url,
            model=JUDGE_MODEL,
            api_key_env=KEY_ENV,
            backoff=0.0,
            retries=3,
            timeout=5.0,
        )
        return JudgeConfig(**{**base, **kw})


def _completion(content: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": JUDGE_MODEL + "-served",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
    }


@pytest.fixture
def judge_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeJudge]:
    """A local OpenAI-compatible endpoint at ``FakeJudge.url`` (``.../v1``)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv(KEY_ENV, KEY)
    monkeypatch.delenv("FEDSIM_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("FEDSIM_JUDGE_MODEL", raising=False)
    state = FakeJudge()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            request = {
                "path": self.path,
                "headers": dict(self.headers.items()),
                "json": json.loads(body),
            }
            with state.lock:
                state.requests.append(request)
            reply = state.next_reply(request["json"])
            if reply.delay:
                time.sleep(reply.delay)
            if reply.status == 200:
                payload = json.dumps(_completion(reply.content)).encode()
            else:
                payload = (reply.body or "error").encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            try:
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def _user_content(request: dict[str, Any]) -> str:
    return request["json"]["messages"][-1]["content"]


def _assert_no_key(*things: Any) -> None:
    for thing in things:
        text = thing if isinstance(thing, str) else json.dumps(thing, default=str)
        assert KEY not in text


# -- MM-Vet fixtures -----------------------------------------------------------------

# key → (capabilities, question, answer, prediction, scripted grade reply)
MMVET_ROWS = {
    "v1_0": (["rec"], "What animal is this?", "cat", "P0 a cat", "0.5"),
    "v1_1": (["ocr", "spat"], "What is written left?", "STOP", "P1 STOP", "1.0"),
    "v1_2": (
        ["rec", "know", "gen"],
        "What is x in the equation?",
        "-1<AND>-5",
        "P2 x = -1",
        "0.3 partly",
    ),
    "v1_3": (["ocr", "math"], "What is 2+3?", "5<OR>five", "P3 six", "0.0"),
    "v1_4": (["spat", "ocr"], "Which sign is on top?", "yield", "P4 yield", "0.8"),
}


@pytest.fixture
def mmvet_dir(tmp_path: Path) -> Path:
    data = {
        key: {
            "imagename": f"{key}.png",
            "capability": caps,
            "question": q,
            "answer": a,
        }
        for key, (caps, q, a, _, _) in MMVET_ROWS.items()
    }
    (tmp_path / "mm-vet.json").write_text(json.dumps(data, indent=4))
    return tmp_path


def _mmvet_predictions() -> dict[int | str, str]:
    return {int(k[3:]): row[3] for k, row in MMVET_ROWS.items()}


def _grade_by_prediction(request: dict[str, Any]) -> Reply:
    content = request["messages"][0]["content"]
    for row in MMVET_ROWS.values():
        if f" | {row[3]} | " in content:
            return Reply(row[4])
    raise AssertionError("unknown row")


# -- MM-Vet --------------------------------------------------------------------------


def test_mmvet_load(mmvet_dir: Path) -> None:
    qs = mmvet.BENCHMARK.load(mmvet_dir / "mm-vet.json")
    assert [q.question_id for q in qs] == [0, 1, 2, 3, 4]
    assert qs[2].text == "What is x in the equation?"  # as is: no suffix
    assert qs[2].image == str(mmvet_dir / "images" / "v1_2.png")
    assert qs[2].meta["key"] == "v1_2"
    assert mmvet.BENCHMARK.judged and mmvet.BENCHMARK.max_new_tokens == 1024
    # The folder works too, and data_root moves the images.
    qs2 = mmvet.BENCHMARK.load(mmvet_dir, data_root=Path("/data/mmvet"))
    assert qs2[0].image == "/data/mmvet/images/v1_0.png"


def test_mmvet_official_prompt_key_and_scores(
    judge_server: FakeJudge, mmvet_dir: Path, tmp_path: Path
) -> None:
    judge_server.respond = _grade_by_prediction
    bench = mmvet.BENCHMARK
    qs = bench.load(mmvet_dir)
    result = bench.score(
        qs, _mmvet_predictions(), judge=judge_server.config(workers=4), details=True
    )

    # One request per question, each the official grader call.
    assert len(judge_server.requests) == 5
    for r in judge_server.requests:
        assert r["path"] == "/v1/chat/completions"
        assert r["headers"]["Authorization"] == f"Bearer {KEY}"
        body = r["json"]
        assert body["model"] == JUDGE_MODEL
        assert body["max_tokens"] == 3 and body["temperature"] == 0.0
        assert [m["role"] for m in body["messages"]] == ["user"]
        text = body["messages"][0]["content"]
        assert text.startswith(
            "Compare the ground truth and prediction from AI models, to give a "
            "correctness score for the prediction. <AND> in the ground truth means"
        )
        assert "Just complete the last space of the correctness score.\n\n" in text
        assert "Question | Ground truth | Prediction | Correctness\n--- | --- |" in text
        assert "| -1 <AND> -5 | x = -1 or x = -5 | 1.0\n" in text
        assert "'This is why I have trust issues' is a playful way" in text
    # The filled-in row: <AND>/<OR> padded, a trailing empty cell.
    by_pred = {_user_content(r).rsplit("\n", 1)[1]: r for r in judge_server.requests}
    assert "What is x in the equation? | -1 <AND> -5 | P2 x = -1 | " in by_pred
    assert "What is 2+3? | 5 <OR> five | P3 six | " in by_pred
    row = "What animal is this? | cat | P0 a cat | "
    assert _user_content(by_pred[row]) == mmvet.GRADER_PROMPT + "\n" + row

    # Hand-computed: grades 0.5, 1.0, 0.3, 0.0, 0.8.
    assert result["total"] == 52.0  # 2.6 / 5
    assert result["rec"] == 40.0  # (0.5 + 0.3) / 2
    assert result["ocr"] == 60.0  # (1.0 + 0.0 + 0.8) / 3
    assert result["know"] == 30.0 and result["gen"] == 30.0
    assert result["spat"] == 90.0  # (1.0 + 0.8) / 2
    assert result["math"] == 0.0
    assert result["integration"] == {
        "ocr_spat": 90.0,  # both orders in the file are one capability set
        "rec": 50.0,
        "rec_know_gen": 30.0,
        "ocr_math": 0.0,
    }
    assert next(iter(result["integration"])) == "ocr_spat"  # most frequent first
    assert result["judge_model"] == JUDGE_MODEL
    assert result["n"] == 5 and result["regraded"] == 0 and result["unparsed"] == 0
    # Question order, whatever order the threads finished in.
    assert [g["question_id"] for g in result["grades"]] == [0, 1, 2, 3, 4]
    assert [g["score"] for g in result["grades"]] == [0.5, 1.0, 0.3, 0.0, 0.8]

    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(result))
    _assert_no_key(result, saved.read_text())


def test_mmvet_unparsable_grade_follows_official_loop(
    judge_server: FakeJudge, mmvet_dir: Path
) -> None:
    qs = mmvet.BENCHMARK.load(mmvet_dir)[:1]
    preds = {0: "P0 a cat"}
    # Never a number: five re-asks with the suffix, temperature 0, 0, .5, 1, 1.5, 2;
    # then 0.0.
    judge_server.respond = lambda req: Reply("N/A")
    result = mmvet.BENCHMARK.score(qs, preds, judge=judge_server.config())
    reqs = judge_server.requests
    assert [r["json"]["temperature"] for r in reqs] == [0.0, 0.0, 0.5, 1.0, 1.5, 2.0]
    assert not _user_content(reqs[0]).endswith(mmvet.RETRY_SUFFIX)
    for r in reqs[1:]:
        assert _user_content(r) == _user_content(reqs[0]) + (
            "\nPredict the correctness of the answer (digit): "
        )
    assert result["total"] == 0.0 and result["rec"] == 0.0
    assert result["unparsed"] == 1 and result["regraded"] == 1

    # Out of range, then prose, then a grade: the third reply counts.
    judge_server.requests.clear()
    judge_server.respond = None
    judge_server.queue.extend([Reply("1.5"), Reply("Correctness: 0.7"), Reply("0.7")])
    result = mmvet.BENCHMARK.score(qs, preds, judge=judge_server.config())
    assert len(judge_server.requests) == 3
    assert result["total"] == 70.0 and result["unparsed"] == 0


def test_mmvet_parse_grade() -> None:
    assert mmvet.parse_grade("0.6") == 0.6
    assert mmvet.parse_grade("0.6 because") == 0.6
    assert mmvet.parse_grade("1.0\n") == 1.0
    assert mmvet.parse_grade(" 0.6") is None  # split(" ")[0] is empty, as official
    for bad in ("1.1", "-0.1", "nan", "", "0.5.", None):
        assert mmvet.parse_grade(bad) is None


def test_mmvet_read_predictions_both_formats(mmvet_dir: Path, tmp_path: Path) -> None:
    qs = mmvet.BENCHMARK.load(mmvet_dir)
    lines = tmp_path / "answers.jsonl"
    lines.write_text(
        "".join(
            json.dumps({"question_id": i, "prompt": "", "text": f"A{i}"}) + "\n"
            for i in range(5)
        )
    )
    results = tmp_path / "results.json"  # what convert_mmvet_for_eval.py writes
    results.write_text(json.dumps({f"v1_{i}": f"A{i}" for i in range(5)}, indent=2))
    expected = {i: f"A{i}" for i in range(5)}
    assert mmvet.BENCHMARK.read_predictions(lines, qs) == expected
    assert mmvet.BENCHMARK.read_predictions(results, qs) == expected


def test_mmvet_missing_prediction(judge_server: FakeJudge, mmvet_dir: Path) -> None:
    qs = mmvet.BENCHMARK.load(mmvet_dir)
    preds = _mmvet_predictions()
    del preds[3]
    with pytest.raises(
        BenchmarkError, match=r"1 of 5 questions have no prediction \(first: 3\)"
    ):
        mmvet.BENCHMARK.score(qs, preds, judge=judge_server.config())
    assert judge_server.requests == []


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"imagename": "a.png", "capability": ["rec"], "question": "q"}, "'answer'"),
        ({"imagename": "a.png", "capability": [], "question": "q", "answer": "a"},
         "'capability'"),
        ({"imagename": 3, "capability": ["rec"], "question": "q", "answer": "a"},
         "'imagename'"),
    ],
)  # fmt: skip
def test_mmvet_bad_file_names_file_line_field(
    tmp_path: Path, entry: dict, message: str
) -> None:
    good = {"imagename": "v.png", "capability": ["rec"], "question": "q", "answer": "a"}
    path = tmp_path / "mm-vet.json"
    path.write_text(json.dumps({"v1_0": good, "v1_1": entry}, indent=4))
    line = path.read_text().splitlines().index('    "v1_1": {') + 1
    with pytest.raises(BenchmarkError) as err:
        mmvet.BENCHMARK.load(path)
    assert str(err.value).startswith(f"{path}:{line}: 'v1_1'")
    assert message in str(err.value)

    path.write_text('{\n  "v1_0": {\n    "imagename": "x",\n  }\n}')
    with pytest.raises(BenchmarkError, match="^" + re.escape(f"{path}:4: not valid")):
        mmvet.BENCHMARK.load(path)


# -- judge client --------------------------------------------------------------------


def test_retry_on_server_error_and_timeout(
    judge_server: FakeJudge, mmvet_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    judge_server.queue.extend(
        [
            Reply(status=500, body=f"upstream failed for Bearer {KEY}"),
            Reply("0.9", delay=1.0),  # past the 0.3 s timeout
            Reply("0.9"),
        ]
    )
    qs = mmvet.BENCHMARK.load(mmvet_dir)[:1]
    with caplog.at_level(logging.WARNING, logger="fedsim.eval.judge"):
        result = mmvet.BENCHMARK.score(
            qs, {0: "P0 a cat"}, judge=judge_server.config(timeout=0.3)
        )
    assert result["total"] == 90.0
    assert len(judge_server.requests) == 3
    assert "HTTP 500" in caplog.text and "retry 1/3" in caplog.text
    assert "retry 2/3" in caplog.text  # the timeout
    assert "***" in caplog.text  # the echoed key, scrubbed
    _assert_no_key(caplog.text, result)


def test_errors_never_show_the_key(judge_server: FakeJudge) -> None:
    judge = Judge(judge_server.config(retries=2))
    messages = [{"role": "user", "content": "hi"}]

    # 401: not retried; the body (which may quote the key) is dropped.
    judge_server.queue.append(
        Reply(status=401, body=json.dumps({"error": f"Incorrect API key {KEY}"}))
    )
    with pytest.raises(JudgeError) as err:
        judge.chat(messages, 0.0, 3)
    assert "HTTP 401" in str(err.value) and f"${KEY_ENV}" in str(err.value)
    assert len(judge_server.requests) == 1
    _assert_no_key(str(err.value), repr(err.value), err.value.__cause__ or "")

    # 500 every time: retried, then one error naming the status, key scrubbed.
    judge_server.requests.clear()
    judge_server.respond = lambda req: Reply(status=500, body=f"echo {KEY}")
    with pytest.raises(JudgeError, match=r"HTTP 500 .*echo \*\*\*.*3 attempts"):
        judge.chat(messages, 0.0, 3)
    assert len(judge_server.requests) == 3
    assert all(
        r["headers"]["Authorization"] == f"Bearer {KEY}" for r in judge_server.requests
    )

    # Nothing listens: a connection error, retried, then a JudgeError.
    closed = JudgeConfig(
        base_url="http://127.0.0.1:9/v1", model="m", retries=1, backoff=0.0
    )
    with pytest.raises(JudgeError, match="gave up after 2 attempts"):
        Judge(closed).chat(messages, 0.0, 3)


def test_config_and_reprs_hold_no_key(
    judge_server: FakeJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = judge_server.config()
    judge = Judge(cfg)
    _assert_no_key(repr(cfg), repr(judge), str(to_dict(cfg)), vars(judge))
    assert cfg.api_key_env == KEY_ENV  # the variable's name, never its value

    # No key in the environment: no Authorization header at all (local vLLM).
    monkeypatch.delenv(KEY_ENV)
    judge_server.queue.append(Reply("ok"))
    assert judge.chat([{"role": "user", "content": "hi"}], 0.0, 3).content == "ok"
    assert "Authorization" not in judge_server.requests[-1]["headers"]


def test_resolve_judge_from_config_and_environment() -> None:
    env = {"FEDSIM_JUDGE_BASE_URL": "http://localhost:8000/v1"}
    cfg = resolve_judge({"model": "qwen", "retries": 2}, env=env)
    assert cfg.configured and cfg.base_url == "http://localhost:8000/v1"
    assert cfg.endpoint == "http://localhost:8000/v1/chat/completions"
    assert cfg.retries == 2
    assert not resolve_judge(None, env={}).configured
    assert not resolve_judge({"model": "qwen"}, env={}).configured
    with pytest.raises(ConfigError, match=r"eval\.judge\.bogus: unknown key"):
        resolve_judge({"bogus": 1}, env={})
    with pytest.raises(ConfigError, match=r"eval\.judge\.base_url"):
        JudgeConfig(base_url="localhost:8000", model="m")


@pytest.mark.parametrize("module", [mmvet, llava_bench])
def test_no_judge_is_one_clear_error(
    module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FEDSIM_JUDGE_BASE_URL", raising=False)
    monkeypatch.delenv("FEDSIM_JUDGE_MODEL", raising=False)
    bench = module.BENCHMARK
    for judge in (None, {}, {"model": "gpt-4"}, JudgeConfig(base_url="http://x/v1")):
        with pytest.raises(JudgeNotConfigured) as err:
            bench.score([], {}, judge=judge)
        assert str(err.value) == (
            f"{bench.name}: needs an LLM judge: set eval.judge.base_url and "
            "eval.judge.model (any OpenAI-compatible endpoint)"
        )


# -- LLaVA-Bench ---------------------------------------------------------------------

# question_id → (image, category, question, GPT-4 answer, prediction, review reply)
BENCH_ROWS = {
    0: ("001.jpg", "conv", "What is shown?", "REF0", "PRED0", "8 7\nBoth fine."),
    1: ("001.jpg", "detail", "Describe it.", "REF1", "PRED1", "9,6\nAssistant 1..."),
    2: ("002.jpg", "complex", "Why funny?", "REF2", "PRED2", "10 10\nEqual."),
    3: ("002.jpg", "complex", "What next?", "REF3", "PRED3", "7 5\nHmm."),
}
CAPTIONS = {
    "001.jpg": "An aerial view of Diamond Head.",
    "002.jpg": ["A meme.", "A dog on a floor."],  # a list joins with newlines
}


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    def jsonl(name: str, rows: list[dict]) -> None:
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    jsonl(
        "questions.jsonl",
        [
            {"question_id": i, "image": r[0], "text": r[2], "category": r[1]}
            for i, r in BENCH_ROWS.items()
        ],
    )
    jsonl(
        "context.jsonl",
        [{"id": k[:3], "image": k, "caption": v} for k, v in CAPTIONS.items()],
    )
    jsonl(
        "answers_gpt4.jsonl",
        [
            {"question_id": i, "text": r[3], "answer_id": f"g{i}", "model_id": "gpt-4"}
            for i, r in BENCH_ROWS.items()
        ],
    )
    return tmp_path


def _review_by_prediction(request: dict[str, Any]) -> Reply:
    content = request["messages"][1]["content"]
    for row in BENCH_ROWS.values():
        if f"[Assistant 2]\n{row[4]}\n\n" in content:
            return Reply(row[5])
    raise AssertionError("unknown answer")


def test_llava_bench_load(bench_dir: Path) -> None:
    qs = llava_bench.BENCHMARK.load(bench_dir / "questions.jsonl")
    assert [q.question_id for q in qs] == [0, 1, 2, 3]
    assert qs[1].text == "Describe it."  # as is
    assert qs[1].image == str(bench_dir / "images" / "001.jpg")
    assert qs[1].meta["reference"] == "REF1" and qs[1].meta["category"] == "detail"
    assert llava_bench.BENCHMARK.max_new_tokens == 1024


def test_llava_bench_official_request_and_relative_scores(
    judge_server: FakeJudge, bench_dir: Path
) -> None:
    judge_server.respond = _review_by_prediction
    bench = llava_bench.BENCHMARK
    qs = bench.load(bench_dir)
    preds = {i: r[4] for i, r in BENCH_ROWS.items()}
    result = bench.score(qs, preds, judge=judge_server.config(workers=3), details=True)

    assert len(judge_server.requests) == 4
    rule = (
        "We would like to request your feedback on the performance of two AI "
        "assistants in response to the user question displayed above. The user asks "
        "the question on observing an image. For your reference, the visual content "
        "in the image is represented with a few sentences describing the image. \n"
        "Please rate the helpfulness, relevance, accuracy, level of details of their "
        "responses."
    )
    for r in judge_server.requests:
        assert r["headers"]["Authorization"] == f"Bearer {KEY}"
        body = r["json"]
        assert body["temperature"] == 0.2 and body["max_tokens"] == 1024
        assert body["messages"][0] == {
            "role": "system",
            "content": "You are a helpful and precise assistant for checking the "
            "quality of the answer.",
        }
        text = body["messages"][1]["content"]
        assert body["messages"][1]["role"] == "user"
        assert rule in text
        assert (
            "The two scores are separated by a space.\nIn the subsequent line" in text
        )
        assert text.endswith("does not affect your judgment.\n\n")
    first = next(
        _user_content(r) for r in judge_server.requests if "PRED0" in _user_content(r)
    )
    assert first == (
        "[Context]\nAn aerial view of Diamond Head.\n\n"
        "[Question]\nWhat is shown?\n\n"
        "[Assistant 1]\nREF0\n\n[End of Assistant 1]\n\n"
        "[Assistant 2]\nPRED0\n\n[End of Assistant 2]\n\n"
        f"[System]\n{llava_bench.RULES['llava_bench_conv']['prompt']}\n\n"
    )
    third = next(
        _user_content(r) for r in judge_server.requests if "PRED2" in _user_content(r)
    )
    assert third.startswith("[Context]\nA meme.\nA dog on a floor.\n\n[Question]\n")

    # Hand-computed from (gpt4, model) = (8, 7), (9, 6), (10, 10), (7, 5).
    assert result["all"] == 82.4  # 7.0 / 8.5
    assert result["all_gpt4_mean"] == 8.5 and result["all_model_mean"] == 7.0
    assert result["conv"] == 87.5  # 7 / 8
    assert result["detail"] == 66.7  # 6 / 9
    assert result["complex"] == 88.2  # 7.5 / 8.5
    assert result["complex_gpt4_mean"] == 8.5 and result["complex_model_mean"] == 7.5
    assert result["judge_model"] == JUDGE_MODEL
    assert result["n"] == 4 and result["unparsed"] == 0
    assert [r["question_id"] for r in result["reviews"]] == [0, 1, 2, 3]
    assert result["reviews"][1]["tuple"] == [9.0, 6.0]
    assert result["reviews"][1]["category"] == "llava_bench_detail"
    _assert_no_key(result)


def test_llava_bench_unparsable_review_counts_as_minus_one(
    judge_server: FakeJudge, bench_dir: Path
) -> None:
    replies = {3: "Assistant 1 is better.\n..."}

    def respond(request: dict[str, Any]) -> Reply:
        content = request["messages"][1]["content"]
        if "[Assistant 2]\nPRED3\n" in content:
            return Reply(replies[3])
        return _review_by_prediction(request)

    judge_server.respond = respond
    qs = llava_bench.BENCHMARK.load(bench_dir)
    preds = {i: r[4] for i, r in BENCH_ROWS.items()}
    result = llava_bench.BENCHMARK.score(qs, preds, judge=judge_server.config())
    # Official: [-1, -1] is averaged in, not dropped, and not re-asked.
    assert len(judge_server.requests) == 4
    assert result["unparsed"] == 1
    assert result["complex"] == 100.0  # (10 - 1) / 2 both
    assert result["all_gpt4_mean"] == 6.5 and result["all_model_mean"] == 5.5
    assert result["all"] == 84.6  # 5.5 / 6.5


def test_llava_bench_parse_score() -> None:
    ps = llava_bench.parse_score
    assert ps("8 7\nexplanation") == [8.0, 7.0]
    assert ps("8,7") == [8.0, 7.0]
    assert ps("8.5 6") == [8.5, 6.0]
    for bad in ("8, 7", "8  7", "Scores: 8 7", "8", "", None, "eight seven"):
        assert ps(bad) == [-1.0, -1.0]


def test_llava_bench_literal_context(judge_server: FakeJudge, bench_dir: Path) -> None:
    judge_server.respond = _review_by_prediction
    qs = llava_bench.BENCHMARK.load(bench_dir)[:1]
    llava_bench.BENCHMARK.score(
        qs, {0: "PRED0"}, judge=judge_server.config(), literal_context=True
    )
    # '\n'.join on the released string captions: one character a line.
    assert _user_content(judge_server.requests[0]).startswith("[Context]\nA\nn\n \na\n")


@pytest.mark.parametrize(
    "file, line, mutate, field_name",
    [
        ("questions.jsonl", 3, {"category": "chat"}, "'category'"),
        ("questions.jsonl", 2, {"text": None}, "'text'"),
        ("questions.jsonl", 4, {"image": "999.jpg"}, "'image'"),
        ("context.jsonl", 2, {"caption": 5}, "'caption'"),
    ],
)
def test_llava_bench_bad_files(
    bench_dir: Path, file: str, line: int, mutate: dict, field_name: str
) -> None:
    path = bench_dir / file
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[line - 1].update(mutate)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(BenchmarkError) as err:
        llava_bench.BENCHMARK.load(bench_dir)
    assert str(err.value).startswith(f"{path}:{line}: field {field_name}")


def test_llava_bench_missing_reference(bench_dir: Path) -> None:
    path = bench_dir / "answers_gpt4.jsonl"
    path.write_text("".join(path.read_text().splitlines(True)[:3]))
    with pytest.raises(BenchmarkError, match=r"questions\.jsonl:4: question_id 3 has"):
        llava_bench.BENCHMARK.load(bench_dir)
