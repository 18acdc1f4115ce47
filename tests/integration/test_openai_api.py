"""The OpenAI-compatible API of a real exod, used by the official `openai` package and by plain
HTTP: the same text as `exoctl run`, streaming, stop sequences, the documented answer to bad
requests, dropped clients whose generation stops, and eight clients at once.

One exod serves the whole module (the tests compare events after a seq taken at their start).
"""

from __future__ import annotations

import concurrent.futures
import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from exod.models.demo import Arch
from tests import models
from tests.daemon import Daemon, wait_until
from tests.httpapi import client, first_event_id, http_daemon, open_stream, request, send_request
from tests.reference import expected

PROMPT = "Once upon a time"
NON_ASCII = "Grüße aus München — 你好，世界 🦊"  # noqa: RUF001  # non-ASCII on purpose
NAMES: dict[Arch, str] = {"qwen2": "qwen", "llama": "llama"}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, int]]:
    d, port = http_daemon(tmp_path_factory.mktemp("openai") / "home")
    try:
        d.start()
        d.ok("models", "add", "qwen", str(models.demo_model("qwen2")))
        d.ok("models", "add", "llama", str(models.demo_model("llama")))
        d.ok("models", "add", "plain", str(models.demo_model("qwen2", chat_template=False)))
        yield d, port
    finally:
        assert not d.cleanup(), "runners outlived exod"


@pytest.fixture
def exod(api: tuple[Daemon, int]) -> Daemon:
    return api[0]


@pytest.fixture
def port(api: tuple[Daemon, int]) -> int:
    return api[1]


def cli_text(d: Daemon, *args: str) -> str:
    """What `exoctl run` prints, without the newline it ends with."""
    result = d.ok("run", *args)
    assert result.stdout.endswith(b"\n")
    return result.stdout[:-1].decode()


def runs_since(d: Daemon, since: int) -> list[dict[str, Any]]:
    return [e for e in d.events(since) if e["kind"] == "RunAccepted"]


@functools.cache
def conversation_reference(model: Path, messages: tuple[tuple[str, str], ...], limit: int) -> str:
    """mlx-lm's own text for a whole conversation through the model's chat template."""
    import mlx_lm

    loaded = mlx_lm.load(str(model))
    lm = loaded[0]
    tokenizer: Any = loaded[1]  # mlx-lm leaves apply_chat_template unannotated
    ids = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages], add_generation_prompt=True
    )
    return str(mlx_lm.generate(lm, tokenizer, list(ids), max_tokens=limit))


# --- the official client: list, complete, stream -----------------------------------------------


def test_the_openai_package_lists_the_registered_models(port: int) -> None:
    c = client(port)
    assert sorted(m.id for m in c.models.list()) == ["llama", "plain", "qwen"]
    assert c.models.retrieve("qwen").id == "qwen"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("prompt", [PROMPT, NON_ASCII], ids=["ascii", "non-ascii"])
def test_a_completion_is_exoctl_run_raw(exod: Daemon, port: int, arch: Arch, prompt: str) -> None:
    name = NAMES[arch]
    reply = client(port).completions.create(model=name, prompt=prompt, max_tokens=24, temperature=0)
    text = reply.choices[0].text
    assert text == cli_text(exod, name, prompt, "--raw", "--max-tokens", "24")
    want = expected(models.demo_model(arch), prompt, 24)
    assert text == want.text
    assert reply.choices[0].finish_reason == want.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == want.generation_tokens
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == name
    assert reply.id.startswith("cmpl-run-")


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_chat_is_exoctl_run_with_the_template(exod: Daemon, port: int, arch: Arch) -> None:
    name = NAMES[arch]
    reply = client(port).chat.completions.create(
        model=name, messages=[{"role": "user", "content": NON_ASCII}], max_tokens=24
    )
    message = reply.choices[0].message
    assert message.role == "assistant"
    assert message.content == cli_text(exod, name, NON_ASCII, "--max-tokens", "24")
    assert message.content == expected(models.demo_model(arch), NON_ASCII, 24, chat=True).text
    # The template was applied: the raw prompt continues differently.
    assert message.content != expected(models.demo_model(arch), NON_ASCII, 24).text


def test_a_whole_conversation_goes_through_the_template(port: int) -> None:
    turns = (("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", PROMPT))
    reply = client(port).chat.completions.create(
        model="llama",
        messages=[{"role": r, "content": c} for r, c in turns],  # type: ignore[misc]  # plain dicts
        max_tokens=20,
    )
    assert reply.choices[0].message.content == conversation_reference(
        models.demo_model("llama"), turns, 20
    )


def test_streams_carry_the_same_text_and_the_usage(port: int) -> None:
    c = client(port)
    whole = c.chat.completions.create(
        model="qwen", messages=[{"role": "user", "content": PROMPT}], max_tokens=30
    )
    chunks = list(
        c.chat.completions.create(
            model="qwen",
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 30

    pieces = list(c.completions.create(model="qwen", prompt=PROMPT, max_tokens=30, stream=True))
    assert len(pieces) > 2
    assert (
        "".join(p.choices[0].text for p in pieces)
        == expected(models.demo_model("qwen2"), PROMPT, 30).text
    )


def test_stop_sequences_end_the_text_before_them(port: int) -> None:
    full = expected(models.demo_model("qwen2"), PROMPT, 40).text
    stop = full[15:18]
    want = full[: full.find(stop)]
    assert len(want) >= 5, full
    c = client(port)
    reply = c.completions.create(
        model="qwen", prompt=PROMPT, max_tokens=40, stop=[stop, "never-appears"]
    )
    assert reply.choices[0].text == want
    assert reply.choices[0].finish_reason == "stop"
    streamed = list(
        c.completions.create(model="qwen", prompt=PROMPT, max_tokens=40, stop=stop, stream=True)
    )
    assert "".join(p.choices[0].text for p in streamed) == want
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_temperature_and_seed_repeat_the_clis_sample(exod: Daemon, port: int) -> None:
    c = client(port)
    texts = {
        c.completions.create(model="qwen", prompt=PROMPT, max_tokens=24, temperature=1.5, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(texts) == 1
    cli = cli_text(
        exod, "qwen", PROMPT, "--raw", "--max-tokens", "24", "--temperature", "1.5", "--seed", "7"
    )
    assert texts == {cli}
    assert cli != expected(models.demo_model("qwen2"), PROMPT, 24).text  # it did sample


def test_a_model_without_a_template_answers_chat_as_exoctl_run_does(
    exod: Daemon, port: int
) -> None:
    c = client(port)
    # One user message goes as it is, as `exoctl run` (and mlx_lm.generate) send a prompt.
    reply = c.chat.completions.create(
        model="plain", messages=[{"role": "user", "content": PROMPT}], max_tokens=12
    )
    assert reply.choices[0].message.content == cli_text(exod, "plain", PROMPT, "--max-tokens", "12")
    # Several messages cannot be joined without a template.
    with pytest.raises(openai.BadRequestError) as err:
        c.chat.completions.create(
            model="plain",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
            ],
            max_tokens=5,
        )
    assert "this model has no chat template" in str(err.value)
    assert err.value.code == "invalid_argument"
    # A completion needs no template.
    assert c.completions.create(model="plain", prompt=PROMPT, max_tokens=5).choices[0].text


# --- bad requests get the documented answer, and nothing runs ----------------------------------


def test_bad_requests_get_the_documented_answer_and_exod_keeps_serving(
    exod: Daemon, port: int
) -> None:
    since = exod.last_seq()
    good = {"model": "qwen", "prompt": PROMPT, "max_tokens": 4}
    cases: list[tuple[Any, int, str, str | None]] = [
        (request(port, "POST", "/v1/completions", b'{"model": "qwen", "prompt": ',
                 {"Content-Type": "application/json"}), 400, "invalid_json", None),
        (request(port, "POST", "/v1/completions", {**good, "max_tokens": "4"}),
         400, "invalid_argument", "max_tokens"),
        (request(port, "POST", "/v1/chat/completions", {"model": "qwen", "messages": "Hi"}),
         400, "invalid_argument", "messages"),
        (request(port, "POST", "/v1/completions", {**good, "temperature": -1}),
         400, "invalid_argument", "temperature"),
        (request(port, "POST", "/v1/completions", {**good, "prompt": ""}),
         400, "prompt_empty", None),
        (request(port, "POST", "/v1/completions", {**good, "model": "nope"}),
         404, "model_not_found", "model"),
        (request(port, "POST", "/v1/completions", {**good, "model": str(models.demo_model())}),
         404, "model_not_found", "model"),
        (request(port, "POST", "/v1/completions", b'{"model": "qwen", "prompt": "x"}',
                 {"Content-Type": "text/plain"}), 415, "unsupported_media_type", None),
        (request(port, "POST", "/v1/completions", b"{}"), 415, "unsupported_media_type", None),
        (request(port, "POST", "/v1/completions", b"x" * 10_000_000,
                 {"Content-Type": "application/json"}), 413, "body_too_large", None),
        (request(port, "POST", "/v1/completions", b"x" * 10_000_000,
                 {"Content-Type": "application/json"}, chunked=True),
         413, "body_too_large", None),
        (request(port, "GET", "/v1/nothing"), 404, "not_found", None),
        (request(port, "DELETE", "/v1/models"), 405, "method_not_allowed", None),
    ]  # fmt: skip
    for answer, status, code, param in cases:
        assert (answer.status, answer.error["code"], answer.error["param"]) == (
            status,
            code,
            param,
        ), answer
        assert answer.error["type"] == "invalid_request_error"
        assert answer.error["message"]
        assert answer.headers["content-type"] == "application/json"
    # Each was refused before a run was admitted.
    assert runs_since(exod, since) == []
    # Still serving.
    answer = request(port, "POST", "/v1/completions", good)
    assert answer.status == 200, answer
    assert answer.json()["choices"][0]["text"] == expected(models.demo_model(), PROMPT, 4).text


@pytest.mark.parametrize(
    ("method", "path", "meant"),
    [
        ("GET", "/models", "/v1/models"),
        ("POST", "/chat/completions", "/v1/chat/completions"),
        ("GET", "/", "/v1/chat/completions"),
    ],
)
def test_a_path_outside_v1_gets_openais_404_naming_the_path_meant(
    port: int, method: str, path: str, meant: str
) -> None:
    body = {"model": "qwen", "messages": [{"role": "user", "content": "Hi"}]}
    answer = request(port, method, path, body if method == "POST" else None)
    assert answer.status == 404, answer
    assert answer.headers["content-type"] == "application/json"
    assert answer.error == {
        "message": f"no such path {path}; the API is under /v1, e.g. {meant} (an OpenAI "
        "client's base URL ends in /v1)",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }


def test_a_client_whose_base_url_lacks_v1_is_told_so(port: int) -> None:
    """The mistake as a user makes it: the official client given the server's root."""
    wrong = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}",
        api_key="unused",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )
    with pytest.raises(openai.NotFoundError) as raised:
        wrong.models.list()
    assert "the API is under /v1, e.g. /v1/models" in str(raised.value)
    assert raised.value.code == "not_found"


def test_a_foreign_host_is_refused_and_no_cors_is_offered(exod: Daemon, port: int) -> None:
    since = exod.last_seq()
    body = {"model": "qwen", "prompt": PROMPT, "max_tokens": 4}
    for host in ("evil.example", f"evil.example:{port}", f"localhost:{port + 1}"):
        for method, path, data in (("GET", "/v1/models", None), ("POST", "/v1/completions", body)):
            answer = request(port, method, path, data, {"Host": host})
            assert answer.status == 403, answer
            assert answer.error["code"] == "host_not_allowed"
    assert runs_since(exod, since) == []
    for host in (f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert request(port, "GET", "/v1/models", None, {"Host": host}).status == 200
    # A page of another origin can neither ask first nor read an answer.
    origin = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
    preflight = request(port, "OPTIONS", "/v1/completions", None, origin)
    assert preflight.status == 405
    answer = request(port, "POST", "/v1/completions", body, {"Origin": "http://evil.example"})
    assert answer.status == 200
    for a in (preflight, answer):
        assert not [h for h in a.headers if h.startswith("access-control-")], a.headers


# --- a client that leaves cancels its generation --------------------------------------------


def test_a_dropped_stream_stops_its_generation(exod: Daemon, port: int) -> None:
    since = exod.last_seq()
    body = {"model": "qwen", "prompt": PROMPT, "max_tokens": 50_000, "stream": True}
    sock, received = open_stream(port, "/v1/completions", body)
    assert received.startswith(b"HTTP/1.1 200 ")
    run_id = first_event_id(received).removeprefix("cmpl-")
    sock.close()
    finished = exod.wait_event(
        lambda e: e["kind"] == "RunFinished" and e["run_id"] == run_id, since=since
    )
    assert finished["stop_reason"] == "cancelled"
    # The runner is free again at once: 50,000 tokens would take minutes.
    assert wait_until(lambda: runner_states(exod) == {"ready"}, timeout=10, poll=0.2)
    started = time.monotonic()
    answer = request(port, "POST", "/v1/completions", {**body, "max_tokens": 8, "stream": False})
    assert answer.status == 200, answer
    assert time.monotonic() - started < 10
    assert answer.json()["choices"][0]["text"] == expected(models.demo_model(), PROMPT, 8).text


def test_a_client_that_leaves_before_the_answer_cancels_it(exod: Daemon, port: int) -> None:
    since = exod.last_seq()
    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 50_000}
    sock = send_request(port, "/v1/completions", body)
    accepted = exod.wait_event(
        lambda e: e["kind"] == "RunAccepted" and e["max_tokens"] == 50_000, since=since
    )
    sock.close()
    finished = exod.wait_event(
        lambda e: e["kind"] == "RunFinished" and e["run_id"] == accepted["run_id"], since=since
    )
    assert finished["stop_reason"] == "cancelled"
    assert wait_until(lambda: runner_states(exod) == {"ready"}, timeout=10, poll=0.2)


def runner_states(d: Daemon) -> set[str]:
    return {r["state"] for r in d.status()["runners"]}


# --- eight clients at once --------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    chat: bool
    arch: Arch
    prompt: str
    limit: int
    stream: bool

    def ask(self, c: openai.OpenAI) -> str:
        """The answer's text, as the client gets it."""
        model = NAMES[self.arch]
        if not self.chat:
            if self.stream:
                chunks = c.completions.create(
                    model=model, prompt=self.prompt, max_tokens=self.limit, stream=True
                )
                return "".join(ch.choices[0].text for ch in chunks)
            reply = c.completions.create(model=model, prompt=self.prompt, max_tokens=self.limit)
            return reply.choices[0].text
        messages: Any = [{"role": "user", "content": self.prompt}]
        if self.stream:
            deltas = c.chat.completions.create(
                model=model, messages=messages, max_tokens=self.limit, stream=True
            )
            return "".join(ch.choices[0].delta.content or "" for ch in deltas if ch.choices)
        chat = c.chat.completions.create(model=model, messages=messages, max_tokens=self.limit)
        return chat.choices[0].message.content or ""

    def want(self) -> str:
        return expected(models.demo_model(self.arch), self.prompt, self.limit, chat=self.chat).text


def test_eight_concurrent_clients_each_get_their_own_answer(port: int) -> None:
    jobs = [Job(False, "qwen2", f"{PROMPT} {i}", 12 + i, i % 2 == 0) for i in range(4)] + [
        Job(True, "llama", f"Hello number {i}", 12 + i, i % 2 == 1) for i in range(4)
    ]
    barrier = threading.Barrier(len(jobs))

    def one(job: Job) -> str:
        c = client(port)
        barrier.wait()  # all eight are in flight together
        return job.ask(c)

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    for job, answer in zip(jobs, answers, strict=True):
        assert answer == job.want(), job
