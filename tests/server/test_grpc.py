"""The gRPC front end (kiln.serve.grpc) with a real grpcio client against a real server on the tiny engine:
parity with REST, streaming, errors, cancellation and deadlines freeing the engine, health, reflection, keys."""

from __future__ import annotations

import contextlib
import io
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from server_harness import REPO, LiveServer, run_live_server, start_cli_server, wait_for

from kiln.clients.thread import AsyncEngine
from kiln.serve.grpc import kiln_pb2 as pb
from kiln.serve.grpc import kiln_pb2_grpc as pb_grpc

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
LONG = pb.ChatRequest(
    messages=[pb.ChatMessage(role="user", content="Tell me a long story")],
    sampling=pb.Sampling(max_tokens=900, ignore_eos=True),
)


@pytest.fixture(scope="module")
def live(tiny_engine: AsyncEngine) -> Iterator[LiveServer]:
    with run_live_server(tiny_engine, served_model_name="tiny", grpc_port=0) as server:
        yield server


def grpc_target(server: LiveServer) -> str:
    return f"127.0.0.1:{server.server.config.app.state.kiln_grpc.port}"


@pytest.fixture(scope="module")
def channel(live: LiveServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(grpc_target(live)) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> pb_grpc.GenerationStub:
    return pb_grpc.GenerationStub(channel)


def metric(url: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples on /metrics whose labels include `labels`."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def engine_idle(url: str) -> bool:
    return (
        metric(url, "kiln_num_requests_running") == 0
        and metric(url, "kiln_num_requests_waiting") == 0
        and metric(url, "kiln_kv_cache_usage_ratio") == 0
    )


def test_generated_modules_are_current() -> None:
    # An edit of kiln.proto without `python scripts/gen_grpc.py` fails here.
    check = subprocess.run(
        [sys.executable, "scripts/gen_grpc.py", "--check"], cwd=REPO, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stderr


def test_chat_matches_rest_for_the_same_seed(live: LiveServer, stub: pb_grpc.GenerationStub) -> None:
    rest = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={
            "model": "tiny",
            "messages": CHAT,
            "max_tokens": 12,
            "temperature": 0.9,
            "seed": 7,
            "top_k": 20,
        },
        timeout=60,
    ).json()
    request = pb.ChatRequest(
        model="tiny",
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT],
        sampling=pb.Sampling(max_tokens=12, temperature=0.9, seed=7, top_k=20),
    )
    responses = list(stub.Chat(request, timeout=60))
    assert responses[0].choices[0].role == "assistant"
    assert all(r.id == responses[0].id and r.model == "tiny" for r in responses)
    text = "".join(c.content for r in responses for c in r.choices)
    finish = [c.finish_reason for r in responses for c in r.choices if c.HasField("finish_reason")]
    assert text == rest["choices"][0]["message"]["content"]
    assert finish == [rest["choices"][0]["finish_reason"]]
    last = responses[-1]
    assert not last.choices and last.HasField("usage")
    assert not any(r.HasField("usage") for r in responses[:-1])
    usage = rest["usage"]
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )


def test_completion_matches_rest_with_n_logprobs_and_stop(
    live: LiveServer, stub: pb_grpc.GenerationStub
) -> None:
    fields: dict[str, Any] = {"max_tokens": 10, "temperature": 1.0, "seed": 3, "n": 2, "stop": ["zz"]}
    rest = httpx.post(
        f"{live.url}/v1/completions",
        json={"prompt": "Once upon a time", "logprobs": 2, "ignore_eos": True, **fields},
        timeout=60,
    ).json()
    request = pb.CompletionRequest(
        prompt=[pb.Prompt(text="Once upon a time")],
        logprobs=2,
        sampling=pb.Sampling(ignore_eos=True, **fields),
    )
    responses = list(stub.Complete(request, timeout=60))
    assert len(responses) > 3  # streamed in pieces, not one message at the end
    for choice in rest["choices"]:
        pieces = [c for r in responses for c in r.choices if c.index == choice["index"]]
        assert "".join(c.text for c in pieces) == choice["text"]
        tokens = [t for c in pieces for t in c.logprobs]
        assert [t.token for t in tokens] == choice["logprobs"]["tokens"]
        assert [t.logprob for t in tokens] == pytest.approx(choice["logprobs"]["token_logprobs"])
        assert [t.text_offset for t in tokens] == choice["logprobs"]["text_offset"]
        tops = [{a.token: pytest.approx(a.logprob) for a in t.top_logprobs} for t in tokens]
        assert tops == choice["logprobs"]["top_logprobs"]
        assert [c.finish_reason for c in pieces if c.HasField("finish_reason")] == [choice["finish_reason"]]
    usage = responses[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        rest["usage"]["prompt_tokens"],
        rest["usage"]["completion_tokens"],
    )


def test_echoed_prompt_scores_leave_the_first_logprob_unset(
    live: LiveServer, stub: pb_grpc.GenerationStub
) -> None:
    body = {"prompt": [5, 17, 42, 99], "max_tokens": 2, "temperature": 0, "ignore_eos": True}
    rest = httpx.post(
        f"{live.url}/v1/completions", json={**body, "echo": True, "logprobs": 1}, timeout=60
    ).json()
    request = pb.CompletionRequest(
        prompt=[pb.Prompt(token_ids=pb.TokenIds(ids=body["prompt"]))],
        echo=True,
        logprobs=1,
        sampling=pb.Sampling(max_tokens=2, temperature=0, ignore_eos=True),
    )
    tokens = [t for r in stub.Complete(request, timeout=60) for c in r.choices for t in c.logprobs]
    expected = rest["choices"][0]["logprobs"]["token_logprobs"]
    assert len(tokens) == len(expected) == 6 and expected[0] is None
    assert not tokens[0].HasField("logprob") and all(t.HasField("logprob") for t in tokens[1:])
    assert [t.logprob for t in tokens[1:]] == pytest.approx(expected[1:])


def test_token_id_prompts_and_structured_outputs_reach_rest(
    live: LiveServer, stub: pb_grpc.GenerationStub
) -> None:
    request = pb.CompletionRequest(
        prompt=[
            pb.Prompt(token_ids=pb.TokenIds(ids=[5, 6, 7])),
            pb.Prompt(token_ids=pb.TokenIds(ids=[8, 9])),
        ],
        sampling=pb.Sampling(
            max_tokens=8, temperature=0, structured_outputs=pb.StructuredOutputs(choice=["yes", "no"])
        ),
    )
    responses = list(stub.Complete(request, timeout=60))
    texts = {i: "".join(c.text for r in responses for c in r.choices if c.index == i) for i in (0, 1)}
    assert set(texts.values()) <= {"yes", "no"}
    assert responses[-1].usage.prompt_tokens == 3 + 2


@pytest.mark.parametrize(
    ("path", "body", "request_", "param"),
    [
        (
            "/v1/chat/completions",
            {"messages": CHAT, "temperature": -1},
            pb.ChatRequest(
                messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in CHAT],
                sampling=pb.Sampling(temperature=-1),
            ),
            "temperature",
        ),
        (
            "/v1/completions",
            {"prompt": "Hi", "max_tokens": 100000},
            pb.CompletionRequest(prompt=[pb.Prompt(text="Hi")], sampling=pb.Sampling(max_tokens=100000)),
            "max_tokens",
        ),
        ("/v1/chat/completions", {"messages": []}, pb.ChatRequest(), "messages"),
    ],
)
def test_invalid_requests_get_invalid_argument_with_the_rest_message(
    live: LiveServer, stub: pb_grpc.GenerationStub, path: str, body: dict[str, Any], request_: Any, param: str
) -> None:
    rest = httpx.post(f"{live.url}{path}", json=body, timeout=30)
    assert rest.status_code == 400
    call = stub.Chat if path.endswith("chat/completions") else stub.Complete
    with pytest.raises(grpc.RpcError) as caught:
        list(call(request_, timeout=30))
    error = caught.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == rest.json()["error"]["message"]
    trailers = dict(error.trailing_metadata())
    assert trailers["kiln-error-param"] == param == rest.json()["error"]["param"]
    assert trailers["kiln-error-code"] == rest.json()["error"]["code"]


def test_unknown_model_is_not_found(stub: pb_grpc.GenerationStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Complete(pb.CompletionRequest(model="other", prompt=[pb.Prompt(text="Hi")]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "model 'other' does not exist" in caught.value.details()


def test_cancelling_the_call_frees_the_engine_request(live: LiveServer, stub: pb_grpc.GenerationStub) -> None:
    before = metric(live.url, "kiln_requests_total", outcome="cancelled")
    call = stub.Chat(LONG, timeout=60)
    received = 0
    for response in call:
        received += sum(bool(c.content) for c in response.choices)
        if received >= 3:
            break
    assert live.engine.stats().kv_blocks_used > 0  # still generating
    call.cancel()
    assert wait_for(lambda: engine_idle(live.url))
    assert wait_for(lambda: metric(live.url, "kiln_requests_total", outcome="cancelled") == before + 1)
    assert live.engine.stats().kv_blocks_used == 0


def test_the_client_deadline_stops_the_request_in_the_engine(
    live: LiveServer, stub: pb_grpc.GenerationStub
) -> None:
    before = metric(live.url, "kiln_requests_total", outcome="timeout")
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Chat(LONG, timeout=0.4))  # 900 tokens take the tiny engine over a second on CPU
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_for(lambda: engine_idle(live.url))
    # Stopped by the REST request's own deadline (X-Request-Timeout), not only by the call's cancellation.
    assert wait_for(lambda: metric(live.url, "kiln_requests_total", outcome="timeout") == before + 1)


def test_health_follows_readiness_and_drain(tiny_engine: AsyncEngine) -> None:
    with (
        run_live_server(tiny_engine, grpc_port=0) as server,
        grpc.insecure_channel(grpc_target(server)) as ch,
    ):
        health = health_pb2_grpc.HealthStub(ch)

        def status(service: str = "") -> int:
            return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status

        assert status() == status("kiln.v1.Generation") == health_pb2.HealthCheckResponse.SERVING
        admission = server.state.admission
        server.state.loop.call_soon_threadsafe(setattr, admission, "draining", True)
        assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert httpx.get(f"{server.url}/ready").json()["status"] == "draining"
        with pytest.raises(grpc.RpcError) as caught:  # new work is refused as over REST: 503
            list(pb_grpc.GenerationStub(ch).Chat(LONG, timeout=10))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(caught.value.trailing_metadata())["kiln-error-code"] == "draining"
        server.state.loop.call_soon_threadsafe(setattr, admission, "draining", False)
        assert wait_for(lambda: status("kiln.v1.Generation") == health_pb2.HealthCheckResponse.SERVING)


def test_reflection_lists_and_describes_the_services(channel: grpc.Channel) -> None:
    database = ProtoReflectionDescriptorDatabase(channel)
    services = set(database.get_services())
    assert {"kiln.v1.Generation", "grpc.health.v1.Health"} <= services
    found = database.FindFileContainingSymbol("kiln.v1.Generation")
    assert found.package == "kiln.v1"
    assert {m.name for m in found.service[0].method} == {"Chat", "Complete"}


def test_api_key_is_required_in_metadata_when_configured(tiny_engine: AsyncEngine) -> None:
    server_ = run_live_server(tiny_engine, grpc_port=0, api_keys=["s3cret"])
    with server_ as server, grpc.insecure_channel(grpc_target(server)) as ch:
        stub = pb_grpc.GenerationStub(ch)
        request = pb.CompletionRequest(prompt=[pb.Prompt(text="Hi")], sampling=pb.Sampling(max_tokens=2))
        for metadata, message in [
            ((), "missing API key: send `Authorization: Bearer <key>`"),
            ((("authorization", "Bearer wrong"),), "incorrect API key"),
        ]:
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Complete(request, metadata=metadata, timeout=30))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert caught.value.details() == message
        ok = list(stub.Complete(request, metadata=(("authorization", "Bearer s3cret"),), timeout=30))
        assert ok[-1].usage.completion_tokens > 0


def test_concurrent_calls_each_get_their_own_output(live: LiveServer, stub: pb_grpc.GenerationStub) -> None:
    results: dict[int, str] = {}

    def run(seed: int) -> None:
        request = pb.CompletionRequest(
            prompt=[pb.Prompt(text="Once")], sampling=pb.Sampling(max_tokens=8, seed=seed, temperature=1)
        )
        results[seed] = "".join(c.text for r in stub.Complete(request, timeout=60) for c in r.choices)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, text in results.items():
        rest = httpx.post(
            f"{live.url}/v1/completions",
            json={"prompt": "Once", "max_tokens": 8, "seed": seed, "temperature": 1},
            timeout=60,
        ).json()
        assert rest["choices"][0]["text"] == text
    assert len(results) == 4


def test_kiln_serve_grpc_port_flag_serves_and_drains_on_sigterm(tiny_gqa_dir: Path) -> None:
    proc, _url, log = start_cli_server(tiny_gqa_dir, "--grpc-port", "0", "--drain-timeout-seconds", "0")
    try:
        assert wait_for(lambda: any("gRPC (kiln.v1.Generation" in line for line in log))
        port = next(re.search(r"on 127\.0\.0\.1:(\d+)", line) for line in log if "gRPC (" in line).group(1)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.GenerationStub(ch)
            request = pb.CompletionRequest(prompt=[pb.Prompt(text="Hi")], sampling=pb.Sampling(max_tokens=3))
            assert list(stub.Complete(request, timeout=60))[-1].usage.completion_tokens == 3
            # SIGTERM with a call in flight and no drain time: it ends at once, as a REST stream would.
            call = stub.Chat(LONG, timeout=60)
            next(call)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "the server shut down before this request finished" in caught.value.details()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_docs_python_example_runs(live: LiveServer) -> None:
    section = (REPO / "docs" / "server.md").read_text().split("\n## gRPC\n", 1)[1].split("\n## ", 1)[0]
    [example] = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    code = example.replace("127.0.0.1:50051", grpc_target(live))
    assert code != example, "the example's address changed: update this test"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/server.md", "exec"), {"__name__": "__docs__"})
    assert re.search(r"\n\[[1-9]\d* tokens\]\n$", printed.getvalue())


def test_a_grpc_port_in_use_fails_the_startup(tiny_gqa_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "kiln.cli", "serve", str(tiny_gqa_dir), "--port", "0"]
        command += ["--grpc-port", str(port), "--num-kv-blocks", "64"]
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert f"cannot listen for gRPC on 127.0.0.1:{port}" in run.stderr
