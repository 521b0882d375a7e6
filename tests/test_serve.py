"""HTTP serving: endpoints, one-line errors, batching (and its per-request fallback), and a real
uvicorn process started, queried and stopped by a signal."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from athwe.errors import AthweError, UnknownTokenError
from athwe.retrieval.index import Recommendation, Request
from athwe.serving import Batcher, create_app

ROOT = Path(__file__).resolve().parents[1]


class FakeRetriever:
    """The Retriever methods the app calls, answering from a fixed table and recording batch sizes."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.batches: list[int] = []
        self.threads: set[str] = set()
        self.catalogue = {"a": {"item_id": 1, "item": "a"}, "b": {"item_id": 2, "item": "b"}}

    def recommend_batch(self, requests: list[Request]) -> list[list[Recommendation]]:
        self.batches.append(len(requests))
        self.threads.add(threading.current_thread().name)
        self.faiss_threads = faiss.omp_get_max_threads()
        time.sleep(self.delay)
        out = []
        for r in requests:
            if r.user == "crash":
                raise RuntimeError("the fake broke\nsecond line")
            if r.user == "mute":  # one answer short: that request fails, and none waits for ever
                return out
            if r.user is not None and not r.user.startswith("u"):
                raise UnknownTokenError(f"unknown user {r.user!r} in dataset fake")
            # the score tells which request this answer belongs to
            score = float(r.user[1:]) if r.user else float(len(r.items))
            out.append([Recommendation(i + 1, i + 1, f"i{i + 1}", None, score) for i in range(r.k)])
        return out

    def add_items(self, records: list[dict]) -> list[str]:
        if any(r["item"] in self.catalogue for r in records):
            raise AthweError("item 'a' is already in the catalogue")
        return [r["item"] for r in records]

    def item(self, token: str) -> dict:
        if token not in self.catalogue:
            raise UnknownTokenError(f"unknown item {token!r}")
        return self.catalogue[token]

    def info(self) -> dict:
        return {"model": "Fake", "n_items": 2}


def post(client: TestClient, path: str, body: str | bytes, content_type: str = "application/json") -> httpx.Response:
    return client.post(path, content=body, headers={"content-type": content_type})


@pytest.fixture
def fake_client():
    fake = FakeRetriever()
    with TestClient(create_app(fake, max_body_bytes=10_000)) as client:
        yield client, fake


def test_endpoints_with_a_fake_retriever(fake_client):
    client, fake = fake_client
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["model"] == "Fake" and info["serving"]["batching"] is True
    r = client.post("/recommend", json={"user": "u7", "k": 3})
    assert r.status_code == 200
    recs = r.json()["recommendations"]
    assert [x["rank"] for x in recs] == [1, 2, 3] and recs[0]["score"] == 7.0
    r = client.post("/recommend", json={"items": ["a", 5, "b"], "timestamps": [1.0, 2.0, 3.0]})
    assert r.status_code == 200 and r.json()["recommendations"][0]["score"] == 3.0  # numbers become tokens
    assert client.get("/items/a").json() == {"item_id": 1, "item": "a"}
    assert client.post("/items", json=[{"item": "n1", "title": "New"}]).json() == {"added": ["n1"]}
    assert client.post("/items", json={"items": [{"item": "n2", "colour": "red"}]}).json() == {"added": ["n2"]}
    assert fake.threads == {"athwe-model_0"}  # one model thread
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()["components"]["schemas"]["RecommendBody"]["properties"]
    assert schema["k"]["maximum"] == 1000 and schema["items"]["anyOf"][0]["maxItems"] == 1000


@pytest.mark.parametrize("path,body,status,needle", [
    ("/recommend", '{"user": "u1", ', 400, "malformed JSON body: Expecting"),
    ("/recommend", "[1, 2]", 422, "request body: Input should be a valid dictionary"),
    ("/recommend", "", 422, "request body: a JSON body is required"),
    ("/recommend", '{"user": "u1", "k": "ten"}', 422, "k: Input should be a valid integer"),
    ("/recommend", '{"user": "u1", "k": 0}', 422, "k: Input should be greater than or equal to 1"),
    ("/recommend", '{"user": "u1", "k": 1001}', 422, "k: Input should be less than or equal to 1000"),
    ("/recommend", '{"user": "u1", "k": 2.5}', 422, "k: Input should be a valid integer"),
    ("/recommend", '{"items": ["a", ["b"]]}', 422, "items[1]: Input should be a valid string"),
    ("/recommend", json.dumps({"items": ["a"] * 1001}), 422, "items: List should have at most 1000 items"),
    ("/recommend", json.dumps({"user": "u1", "exclude": ["a"] * 1001}), 422, "exclude: List should have at most"),
    ("/recommend", '{"k": 5}', 422, "request body: pass exactly one of `user` (a known user) or `items`"),
    ("/recommend", '{"user": "u1", "items": ["a"]}', 422, "request body: pass exactly one of `user`"),
    ("/recommend", '{"user": "u1", "timestamps": [1]}', 422, "`timestamps` go with `items`"),
    ("/recommend", '{"items": []}', 422, "items: List should have at least 1 item"),
    ("/recommend", '{"items": ["a"], "timestamps": [1, 2]}', 422, "`timestamps` needs one value per history item"),
    ("/recommend", '{"items": ["a"], "timestamps": [NaN]}', 422, "timestamps[0]: Input should be a finite number"),
    ("/recommend", '{"user": "u1", "kk": 5}', 422, "kk: unknown field"),
    ("/recommend", '{"user": "u1", "exclude_history": "no"}', 422, "exclude_history: Input should be a valid boolean"),
    ("/recommend", '{"user": "nobody"}', 404, "unknown user 'nobody' in dataset fake"),
    ("/items", "[]", 422, "items: List should have at least 1 item"),
    ("/items", '[{"title": "x"}]', 422, "items[0].item: Field required"),
    ("/items", json.dumps([{"item": str(i)} for i in range(1001)]), 413, "larger than 10,000 bytes"),
    ("/items", '[{"item": "a"}]', 400, "item 'a' is already in the catalogue"),
    ("/items", '[{"item": "n", "image": "/etc/passwd"}]', 422, "items[0].image: must be an http(s) URL"),
    ("/items", '[{"item": "n", "colour": ["red"]}]', 422, "items[0].colour: Input should be a valid string"),
    ("/items", '{"items": [{"item": "n"}], "more": 1}', 422, "more: unknown field"),
])
def test_bad_requests_get_one_line_json_errors(fake_client, path, body, status, needle):
    client, _ = fake_client
    r = post(client, path, body)
    assert r.status_code == status, r.text
    assert r.json() == {"error": r.json()["error"]} and needle in r.json()["error"] and "\n" not in r.text


def test_other_bad_requests(fake_client):
    client, _ = fake_client
    r = post(client, "/recommend", '{"user": "u1"}', "text/plain")
    assert r.status_code == 422 and r.json()["error"] == "request body: must be JSON (Content-Type: application/json)"
    big = b'{"user": "u1", "exclude": [' + b'"x",' * 5000 + b'"x"]}'
    r = post(client, "/recommend", big)
    assert r.status_code == 413 and r.json() == {"error": "request body is larger than 10,000 bytes"}
    r = client.post("/recommend", content=iter([b'{"user": ', b'"u1", "exclude": ["' + b"x" * 20_000 + b'"]}']),
                    headers={"content-type": "application/json"})  # chunked, no Content-Length
    assert r.status_code == 413
    assert client.get("/items/zzz").status_code == 404
    assert client.get("/items/zzz").json() == {"error": "unknown item 'zzz'"}
    assert client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/recommend").status_code == 405
    r = client.post("/recommend", json={"user": "crash"})  # unexpected: 500 with one line, and serving goes on
    assert r.status_code == 500 and r.json() == {"error": "internal error: RuntimeError: the fake broke"}
    assert client.post("/recommend", json={"user": "u2"}).status_code == 200


def test_batches_form_and_a_bad_request_does_not_fail_the_others():
    fake = FakeRetriever(delay=0.05)
    users = [f"u{i}" for i in range(40)] + ["nobody", "crash", "mute"]
    with TestClient(create_app(fake, max_batch=8, max_wait_ms=20)) as client:
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda u: client.post("/recommend", json={"user": u, "k": 2}), users))
        stats = client.get("/info").json()["serving"]
    for u, r in zip(users, replies):
        if u == "nobody":
            assert r.status_code == 404
        elif u in ("crash", "mute"):
            assert r.status_code == 500
        else:
            assert r.status_code == 200 and r.json()["recommendations"][0]["score"] == float(u[1:])
    assert stats["requests"] == len(users) and stats["largest_batch"] > 1 and stats["batched_requests"] > 1
    assert max(fake.batches) <= 8
    assert stats["fallbacks"] >= 1  # the batches holding "nobody", "crash" and "mute" were rerun request by request


def test_threads_setting_reaches_the_model_thread():
    """FAISS's OpenMP thread count is per thread: it must be set on the model thread itself."""
    fake, before = FakeRetriever(), torch.get_num_threads()
    try:
        with TestClient(create_app(fake, threads=1)) as client:
            assert client.post("/recommend", json={"user": "u1"}).status_code == 200
    finally:
        torch.set_num_threads(before)
    assert fake.faiss_threads == 1


@pytest.mark.parametrize("settings,needle", [
    ({"max_batch": 0}, "--max-batch must be between 1 and 4,096, got 0"),
    ({"max_wait_ms": -1}, "--max-wait-ms must be between 0 and 1000, got -1"),
    ({"max_wait_ms": 5000}, "--max-wait-ms must be between 0 and 1000, got 5000"),
    ({"max_body_bytes": 0}, "--max-body-bytes must be at least 1, got 0"),
    ({"threads": 0}, "--threads must be at least 1, got 0"),
])
def test_bad_settings_are_one_line_errors(settings, needle):
    with pytest.raises(AthweError, match=needle):
        create_app(FakeRetriever(), **settings)


def test_batcher_gathers_queued_requests_up_to_max_batch():
    async def go() -> tuple[list[list[Recommendation]], list[int]]:
        fake = FakeRetriever()
        batcher = Batcher(fake, max_batch=4, max_wait_ms=50)
        await batcher.start()
        try:
            got = await asyncio.gather(*(batcher.recommend(Request(user=f"u{i}", items=None, timestamps=None, k=1))
                                         for i in range(10)))
        finally:
            await batcher.stop()
        return got, fake.batches

    got, batches = asyncio.run(go())
    assert [r[0].score for r in got] == [float(i) for i in range(10)]
    assert batches == [4, 4, 2]


def test_batching_off_runs_each_request_alone():
    fake = FakeRetriever(delay=0.02)
    with TestClient(create_app(fake, batching=False)) as client:
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda i: client.post("/recommend", json={"user": f"u{i}"}), range(16)))
        assert client.get("/info").json()["serving"]["largest_batch"] == 1
    assert all(r.status_code == 200 for r in replies) and fake.batches == [1] * 16


# -- a real run ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    """A tiny trained SASRec run (ID only) and ATHWE run (reads timestamps), shared by the tests below."""
    from test_retrieval import trained_run

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATHWE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        mp.setattr("athwe.training.trainer.busy_cpus_elsewhere", lambda window=0.1: None)
        root = tmp_path_factory.mktemp("serve")
        yield {"sasrec": trained_run(root / "sasrec", "sasrec"), "athwe": trained_run(root / "athwe", "athwe")}


def as_json(recs) -> list[dict]:
    return [r.__dict__ for r in recs]


def same(got: list[dict], want: list[dict]) -> bool:
    """Equal recommendations, scores to float32 precision (JSON round-trips them)."""
    return ([(r["rank"], r["item_id"], r["item"], r["title"]) for r in got]
            == [(r["rank"], r["item_id"], r["item"], r["title"]) for r in want]
            and all(abs(a["score"] - b["score"]) <= 1e-6 * max(1.0, abs(b["score"])) for a, b in zip(got, want)))


def test_real_run_answers_as_the_retriever_does(real_runs):
    from athwe.retrieval import Retriever

    r = Retriever(real_runs["sasrec"])
    with TestClient(create_app(r, max_batch=8, max_wait_ms=50)) as client:
        assert client.get("/health").json() == {"status": "ok"}
        info = client.get("/info").json()
        assert info["model"] == "sasrec" and info["trained_items"] == 50 and info["accepts_new_items"] is False
        for user in ("u0", "u3", "u79"):
            got = client.post("/recommend", json={"user": user, "k": 5}).json()["recommendations"]
            assert same(got, as_json(r.recommend(user, k=5)))
        body = {"items": ["i3", "i4", "i6"], "timestamps": [1.6e9, 1.6e9 + 60, 1.6e9 + 120], "k": 7,
                "exclude": ["i7"], "exclude_history": False}
        got = client.post("/recommend", json=body).json()["recommendations"]
        want = r.recommend(items=body["items"], timestamps=body["timestamps"], k=7, exclude=["i7"],
                           exclude_history=False)
        assert same(got, as_json(want)) and "i7" not in [x["item"] for x in got]
        assert client.get("/items/i3").json()["id"] == r.token_index["i3"]
        for path, body, status, needle in [
            ("/recommend", {"user": "nobody"}, 404, "unknown user 'nobody' in dataset tiny"),
            ("/recommend", {"items": ["i3", "zz"]}, 404, "unknown item 'zz' in items"),
            ("/recommend", {"user": "u1", "exclude": ["zz"]}, 404, "unknown item 'zz' in exclude"),
            ("/recommend", {"user": "u1", "k": 51}, 400, "-k 51 is more than the 50 items of the catalogue"),
            ("/recommend", {"items": ["i3", "i4"], "timestamps": [2.0, 1.0]}, 400, "timestamps must not decrease"),
            ("/items", [{"item": "new1", "title": "A lamp"}], 400, "cannot take new items"),
        ]:
            res = client.post(path, json=body)
            assert res.status_code == status and needle in res.json()["error"], (body, res.text)
        res = client.get("/items/zz")
        assert res.status_code == 404 and res.json()["error"].startswith("unknown item 'zz'")

        # concurrent clients: batches form, and every answer is that request's own
        users = [f"u{i}" for i in range(0, 80, 2)]
        want = {u: as_json(r.recommend(u, k=4)) for u in users}
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda u: client.post("/recommend", json={"user": u, "k": 4}), users))
        assert all(res.status_code == 200 and same(res.json()["recommendations"], want[u])
                   for u, res in zip(users, replies))
        stats = client.get("/info").json()["serving"]
        assert stats["largest_batch"] > 1 and stats["batched_requests"] > 1, stats


def test_time_routed_run_needs_timestamps(real_runs):
    from athwe.retrieval import Retriever

    r = Retriever(real_runs["athwe"])
    assert r.model.uses_timestamps
    with TestClient(create_app(r)) as client:
        res = client.post("/recommend", json={"items": ["i3", "i4"]})
        assert res.status_code == 400 and res.json()["error"].startswith("timestamps are required")
        body = {"items": ["i3", "i4", "i5"], "timestamps": [1.6e9, 1.6e9 + 3600, 1.6e9 + 86_400 * 9], "k": 5}
        got = client.post("/recommend", json=body).json()["recommendations"]
        assert same(got, as_json(r.recommend(items=body["items"], timestamps=body["timestamps"], k=5)))
        assert same(client.post("/recommend", json={"user": "u5"}).json()["recommendations"],
                    as_json(r.recommend("u5")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(run: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "athwe.cli", "serve", "--run", str(run), "--port", str(port),
                             "--threads", "1", "--log-level", "warning", *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not answer /health within 120 s")


def stop_server(proc: subprocess.Popen, sig: int) -> tuple[float, str]:
    """Send `sig`; the seconds until the process exited, and its stderr. It must exit 0."""
    t0 = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the server did not stop within 30 s of the signal") from None
    assert proc.returncode == 0, err.decode()[-2000:]
    return time.monotonic() - t0, err.decode()


def test_uvicorn_process_serves_and_stops_on_sigint(real_runs):
    from athwe.retrieval import Retriever

    run = real_runs["sasrec"]
    want = as_json(Retriever(run).recommend("u3", k=5))
    proc, url = start_server(run, "--max-wait-ms", "20")
    try:
        with httpx.Client(base_url=url, timeout=30) as client:  # one keep-alive connection
            assert same(client.post("/recommend", json={"user": "u3", "k": 5}).json()["recommendations"], want)
            bad = client.post("/recommend", content=b'{"user": ', headers={"content-type": "application/json"})
            assert bad.status_code == 400 and bad.json()["error"].startswith("malformed JSON body")
            bad = client.post("/recommend", json={"user": "u3", "k": "many"})
            assert bad.status_code == 422 and bad.json() == {"error": "k: Input should be a valid integer"}
            big = client.post("/recommend", content=b"[" + b"1," * 600_000 + b"1]",
                              headers={"content-type": "application/json"})
            assert big.status_code == 413 and big.json() == {"error": "request body is larger than 1,000,000 bytes"}
            assert client.get("/items/nothing-here").status_code == 404
            assert same(client.post("/recommend", json={"user": "u3", "k": 5}).json()["recommendations"], want)

            def ask(i: int) -> httpx.Response:
                with httpx.Client(base_url=url, timeout=30) as own:
                    return own.post("/recommend", json={"user": f"u{i}", "k": 3})

            with ThreadPoolExecutor(8) as pool:
                assert all(res.status_code == 200 for res in pool.map(ask, range(24)))
            assert client.get("/info").json()["serving"]["requests"] == 26
            seconds, err = stop_server(proc, signal.SIGINT)  # with the keep-alive connection still open
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seconds < 15 and "Traceback" not in err, err


def test_uvicorn_process_without_batching_stops_on_sigterm(real_runs):
    proc, url = start_server(real_runs["sasrec"], "--no-batching")
    try:
        res = httpx.post(url + "/recommend", json={"items": ["i1", "i2"], "k": 2}, timeout=30)
        assert res.status_code == 200 and len(res.json()["recommendations"]) == 2
        assert httpx.get(url + "/info", timeout=30).json()["serving"]["batching"] is False
        seconds, err = stop_server(proc, signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert seconds < 15 and "Traceback" not in err, err


def test_serve_reports_a_port_in_use(real_runs):
    from athwe.serving import serve

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)  # SIGINT is ignored under nohup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(AthweError, match=r"cannot serve on 127.0.0.1:\d+"):
            serve(real_runs["sasrec"], port=s.getsockname()[1], log_level="critical")
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers put back
