"""Serving many at once: exod against mlx_lm.server on the same generated models, in one run.

1. Aggregate decode tokens/s at 1, 4 and 8 concurrent clients, for exod over gRPC and over HTTP
   (EXOD_PARALLEL=8) and for `mlx_lm.server --decode-concurrency 8`, on a tiny model (6 layers,
   hidden 96: per-step overhead dominates, so batching shows even on a CPU) and a larger one
   (8 layers, hidden 512). One client process drives all of them with threads; each request asks
   for a fixed number of tokens, greedy; the figure is all completion tokens over the wall time
   from the first request sent to the last answer received, the median of --repeats rounds in
   which the three servers take turns (so a slow spell of the machine falls on all alike).
2. Time to first token of a ~2,000-token conversation's next turn, with exod's prompt cache and
   without it (EXOD_PROMPT_CACHE_BYTES=0), on the larger model, streamed over HTTP.
3. Single-client decode as the client sees it (wall time of 200 tokens over gRPC and HTTP)
   against in-process `mlx_lm.stream_generate` of the same prompt in a fresh interpreter.

Everything listens on loopback only, every loop is bounded, and the servers it starts are ended
when it ends. Run: `.venv/bin/python bench/bench_serving.py` (`--quick` for a smoke run). Nothing
is asserted; record the figures in docs/benchmarks.md. Targets (issue 10): exod >= 1.0x
mlx_lm.server at every level; tiny model exod at 8 >= 2.5x exod at 1; TTFT with the cache >= 5x
faster; single-client decode >= 0.97 of in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from exod.models.demo import CORPUS, write_demo_model
from exod.proto.exo.v1 import control_pb2, control_pb2_grpc

HOST = "127.0.0.1"
LEVELS = (1, 4, 8)
PROMPTS = [
    "Once upon a time",
    "The quick brown fox",
    "Der schnelle braune Fuchs",
    "Events are appended to the log",
    "How many tokens are in this sentence?",
    "Le cœur a ses raisons",
    "A model that runs on your own machine",
    "Numbers such as 0, 1, 2, 3",
]
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 600.0
# urllib without the environment's proxies: everything here is on loopback.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    max_tokens: int  # per request in the concurrency runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited {proc.returncode} before listening")
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise SystemExit(f"{what} did not listen on {HOST}:{port} within {START_TIMEOUT_S:g}s")


def end(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL to its whole group (each server here runs in its own)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# --- clients ------------------------------------------------------------------------------------


def http_chat(
    port: int, model: str | None, messages: list[dict[str, str]], max_tokens: int
) -> tuple[int, float, str]:
    """(completion tokens, seconds to the first content, text) of one streamed chat request."""
    body: dict[str, Any] = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if model is not None:
        body["model"] = model
    request = urllib.request.Request(
        f"http://{HOST}:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    first = 0.0
    tokens = 0
    parts = []
    try:
        response = OPENER.open(request, timeout=REQUEST_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"HTTP {e.code} from port {port}: {e.read()[:500]!r}") from None
    with response:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    first = first or time.perf_counter() - start
                    parts.append(content)
    return tokens, first, "".join(parts)


def grpc_run(socket_path: Path, model: str, prompt: str, max_tokens: int) -> tuple[int, float]:
    """(generation tokens, seconds to the first text) of one Run over exod's socket."""
    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        stub = control_pb2_grpc.ControlStub(channel)
        request = control_pb2.RunRequest(
            model=model, prompt=prompt, max_tokens=max_tokens, temperature=0
        )
        start = time.perf_counter()
        first = 0.0
        for reply in stub.Run(request, timeout=REQUEST_TIMEOUT_S):
            if reply.HasField("tokens") and reply.tokens.text:
                first = first or time.perf_counter() - start
            if reply.HasField("done"):
                return reply.done.generation_tokens, first
    raise RuntimeError("the run ended without finishing")


Send = Callable[[str, int], int]  # (prompt, max_tokens) -> completion tokens


def aggregate(send: Send, clients: int, max_tokens: int) -> float:
    """Completion tokens per second of `clients` requests sent at once from threads."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clients)]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(lambda p: send(p, max_tokens), prompts))
    return tokens / (time.perf_counter() - start)


def interleaved(
    senders: dict[str, Send], max_tokens: int, repeats: int
) -> dict[str, dict[int, float]]:
    """Median tokens/s per sender and level. Each round measures every sender once, one after
    the other, so a slow spell of a shared machine falls on all of them alike rather than on
    whichever server happened to run then; single rounds vary by tens of percent here."""
    for send in senders.values():
        send(PROMPTS[0], 4)  # loads the model and warms it
    rates: dict[str, dict[int, list[float]]] = {name: {n: [] for n in LEVELS} for name in senders}
    for n in LEVELS:
        for _ in range(repeats):
            for name, send in senders.items():
                rates[name][n].append(aggregate(send, n, max_tokens))
    return {name: {n: statistics.median(r) for n, r in by.items()} for name, by in rates.items()}


# --- servers ------------------------------------------------------------------------------------


@dataclass
class Exod:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    socket: Path
    port: int

    def exoctl(self, *args: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "exoctl", *args], env=self.env, check=True, capture_output=True
        )


def start_exod(work: Path, name: str, models: list[Model], **settings: str) -> Exod:
    port = free_port()
    home = work / name
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXOD_")}
    env |= {
        "EXOD_HOME": str(home),
        "EXOD_SOCKET": str(work / f"{name}.sock"),
        "EXOD_HTTP_PORT": str(port),
        "EXOD_HTTP_BIND": HOST,
        "EXOD_QUEUE_DEPTH": "64",  # whatever EXOD_PARALLEL allows, the rest waits, never refused
        # A 2,000-token prefill on a busy CPU can take minutes in one step: no stall verdicts.
        "EXOD_LOAD_STALL_TIMEOUT": "1800",
        "EXOD_DECODE_STALL_TIMEOUT": "1800",
        "HF_HUB_OFFLINE": "1",
        **settings,
    }
    home.mkdir(parents=True)
    with (home / "exod.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "exod"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    wait_for_port(port, proc, "exod")
    server = Exod(proc, env, work / f"{name}.sock", port)
    for model in models:
        server.exoctl("models", "add", model.name, str(model.path))
    return server


@contextlib.contextmanager
def exod_server(work: Path, name: str, models: list[Model], **settings: str) -> Iterator[Exod]:
    server = start_exod(work, name, models, **settings)
    try:
        yield server
    finally:
        end(server.proc)


@contextlib.contextmanager
def mlx_lm_server(model: Model, concurrency: int) -> Iterator[int]:
    """`mlx_lm.server` on loopback for one model; yields its port."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlx_lm.server",
        "--model",
        str(model.path),
        "--host",
        HOST,
        "--port",
        str(port),
        "--decode-concurrency",
        str(concurrency),
        "--prompt-concurrency",
        str(concurrency),
        "--temp",
        "0",
        "--log-level",
        "WARNING",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for_port(port, proc, "mlx_lm.server")
        yield port
    finally:
        end(proc)


# --- the measurements ---------------------------------------------------------------------------


def user(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def concurrency(
    work: Path, models: list[Model], repeats: int
) -> dict[tuple[str, str], dict[int, float]]:
    """Aggregate tokens/s by (model, server) and number of clients, the servers interleaved."""
    results: dict[tuple[str, str], dict[int, float]] = {}
    with exod_server(work, "exod-batch", models, EXOD_PARALLEL=str(max(LEVELS))) as exod:
        for model in models:
            with mlx_lm_server(model, max(LEVELS)) as port:

                def over_grpc(prompt: str, n: int, model: Model = model) -> int:
                    return grpc_run(exod.socket, model.name, prompt, n)[0]

                def over_http(prompt: str, n: int, model: Model = model) -> int:
                    return http_chat(exod.port, model.name, user(prompt), n)[0]

                def mlx_lm(prompt: str, n: int, port: int = port) -> int:
                    return http_chat(port, None, user(prompt), n)[0]

                senders: dict[str, Send] = {
                    "exod gRPC": over_grpc,
                    "exod HTTP": over_http,
                    "mlx_lm.server": mlx_lm,
                }
                for name, rates in interleaved(senders, model.max_tokens, repeats).items():
                    results[model.name, name] = rates
            exod.exoctl("kill", "--all")  # the next model gets the memory
    return results


def long_conversation(path: Path, tokens: int, variant: int) -> list[dict[str, str]]:
    """A system prompt and a question of about `tokens` tokens (by the model's tokenizer);
    `variant` makes each conversation's text different from the others'."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    words: list[str] = []
    text = ""
    for i in range(10_000):  # bounded: the corpus gives a few tokens per word
        sentence = CORPUS[(i + variant) % len(CORPUS)]
        words.append(f"{variant}.{i} {sentence}")
        text = " ".join(words)
        if len(tokenizer.encode(text).ids) >= tokens:
            break
    return [
        {"role": "system", "content": text},
        {"role": "user", "content": "Summarise the notes above."},
    ]


def next_turn_ttft(port: int, model: Model, tokens: int, repeats: int) -> float:
    """Median seconds to the first token of a long conversation's second turn."""
    ttfts = []
    for variant in range(repeats):
        messages = long_conversation(model.path, tokens, variant + 1)
        _, _, answer = http_chat(port, model.name, messages, 16)
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "And what comes next?"},
        ]
        ttfts.append(http_chat(port, model.name, messages, 4)[1])
    return statistics.median(ttfts)


def prompt_cache(work: Path, model: Model, tokens: int, repeats: int) -> tuple[float, float]:
    """(TTFT with exod's prompt cache, TTFT without it) of a conversation's next turn."""
    with exod_server(work, "exod-cache", [model], EXOD_PARALLEL="1") as exod:
        cached = next_turn_ttft(exod.port, model, tokens, repeats)
    with exod_server(
        work, "exod-nocache", [model], EXOD_PARALLEL="1", EXOD_PROMPT_CACHE_BYTES="0"
    ) as exod:
        uncached = next_turn_ttft(exod.port, model, tokens, repeats)
    return cached, uncached


def in_process_wall(model: Model, prompt: str, max_tokens: int, repeats: int) -> tuple[float, int]:
    """(median wall seconds, tokens) of mlx_lm.stream_generate of the chat prompt, in a fresh
    interpreter, the model loaded once and warmed."""
    code = f"""
import json, time, mlx_lm
model, tok = mlx_lm.load({str(model.path)!r})
prompt = tok.apply_chat_template([{{"role": "user", "content": {prompt!r}}}],
                                 add_generation_prompt=True)
walls, count = [], 0
for _ in range({repeats + 1}):
    start = time.perf_counter()
    count = sum(1 for _ in mlx_lm.stream_generate(model, tok, prompt, max_tokens={max_tokens}))
    walls.append(time.perf_counter() - start)
print(json.dumps([walls[1:], count]))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, env=env, timeout=600
    )
    walls, count = json.loads(out.stdout)
    return statistics.median(walls), int(count)


def single_client(
    work: Path, model: Model, max_tokens: int, repeats: int
) -> dict[str, tuple[float, int]]:
    """(median wall seconds, tokens) of one request at a time, by path."""
    prompt = PROMPTS[0]
    walls: dict[str, tuple[float, int]] = {
        "in-process stream_generate": in_process_wall(model, prompt, max_tokens, repeats)
    }
    with exod_server(work, "exod-single", [model]) as exod:
        sends: dict[str, Callable[[], int]] = {
            "exod gRPC": lambda: grpc_run(exod.socket, model.name, prompt, max_tokens)[0],
            "exod HTTP": lambda: http_chat(exod.port, model.name, user(prompt), max_tokens)[0],
        }
        for label, send in sends.items():
            send()  # loads the runner
            times, count = [], 0
            for _ in range(repeats):
                start = time.perf_counter()
                count = send()
                times.append(time.perf_counter() - start)
            walls[label] = (statistics.median(times), count)
    return walls


# --- main ---------------------------------------------------------------------------------------


def make_models(work: Path, quick: bool) -> tuple[Model, Model]:
    tiny = write_demo_model(
        work / "tiny", hidden_size=96, num_layers=6, intermediate_size=192, vocab_size=512
    )
    # Room for a 2,000-token conversation and its next turn.
    large = write_demo_model(
        work / "large",
        hidden_size=512,
        num_layers=8,
        intermediate_size=1408,
        vocab_size=1024,
        max_position_embeddings=4096,
    )
    return Model("tiny", tiny, 64 if quick else 256), Model("large", large, 32 if quick else 128)


def import_real_model(work: Path) -> Model | None:
    """SmolLM2-135M-Instruct imported from its cached GGUF (tools/smollm2.py), or None when it
    is not cached (this never downloads)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tools.smollm2 import cached_path

    gguf = cached_path()
    if gguf is None:
        print("no real model: SmolLM2's GGUF is not cached (python tools/smollm2.py fetches it)")
        return None
    with exod_server(work, "exod-import", []) as exod:
        exod.exoctl("models", "add", "smollm2", str(gguf))
        listed = subprocess.run(
            [sys.executable, "-m", "exoctl", "models", "list", "--json"],
            env=exod.env,
            check=True,
            capture_output=True,
        )
    path = Path(json.loads(listed.stdout)["models"][0]["path"])
    return Model("smollm2", path, 128)


def print_concurrency(results: dict[tuple[str, str], dict[int, float]]) -> None:
    print("aggregate decode tokens/s (median of rounds), by concurrent clients")
    header = "".join(f"{n:>10}" for n in LEVELS)
    print(f"{'model':<7}{'server':<15}{header}   8 vs 1   vs mlx_lm.server at 1/4/8")
    for (model, server), rates in results.items():
        base = results.get((model, "mlx_lm.server"), {})
        cells = "".join(f"{rates[n]:>10.1f}" for n in LEVELS)
        scaling = rates[8] / rates[1]
        versus = " ".join(f"{rates[n] / base[n]:.2f}" for n in LEVELS) if base else "-"
        print(f"{model:<7}{server:<15}{cells}   {scaling:6.2f}   {versus}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    parser.add_argument(
        "--skip", action="append", default=[], choices=["concurrency", "cache", "single"]
    )
    parser.add_argument(
        "--model",
        action="append",
        choices=["tiny", "large"],
        help="measure concurrency on this generated model only (repeatable; default both)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=5,
        help="rounds per concurrency level, the median kept (1 with --quick)",
    )
    parser.add_argument(
        "--cache-tokens",
        type=int,
        default=2000,
        help="the conversation's length for the prompt-cache TTFT (500 with --quick)",
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="also measure concurrency on SmolLM2-135M (imported from its cached GGUF)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="exos", dir="/tmp"))  # short: socket paths
    try:
        measure(args, work)
    except BaseException:
        print(f"the servers' logs are kept in {work}", file=sys.stderr)
        raise
    shutil.rmtree(work, ignore_errors=True)


def measure(args: argparse.Namespace, work: Path) -> None:
    repeats = 1 if args.quick else args.repeats
    tiny, large = make_models(work, args.quick)
    started = time.perf_counter()
    print(f"models: tiny (6 layers, hidden 96), large (8 layers, hidden 512); work dir {work}")
    if "concurrency" not in args.skip:
        real = import_real_model(work) if args.real else None
        chosen = [m for m in (tiny, large) if m.name in (args.model or ["tiny", "large"])]
        models = [*chosen, *([real] if real else [])]
        print_concurrency(concurrency(work, models, repeats))
    if "cache" not in args.skip:
        tokens = 500 if args.quick else args.cache_tokens
        # One conversation: without the cache, each turn of it prefills it all (minutes here).
        cached, uncached = prompt_cache(work, large, tokens, 1)
        print(f"TTFT of a ~{tokens}-token conversation's next turn (large model, HTTP, median):")
        print(f"  with the prompt cache {cached * 1000:9.1f} ms")
        print(
            f"  without it            {uncached * 1000:9.1f} ms   speed-up {uncached / cached:.2f}x"
        )
    if "single" not in args.skip:
        tokens = 64 if args.quick else 200
        walls = single_client(work, large, tokens, 2 if args.quick else 3)
        base, _ = walls["in-process stream_generate"]
        print(f"single client, {tokens} tokens, large model: wall (median), tokens, speed ratio")
        for label, (wall, count) in walls.items():
            print(f"  {label:<28} {wall * 1000:9.1f} ms  {count:4d} tok  {base / wall:.3f}")
    print(f"bench took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
