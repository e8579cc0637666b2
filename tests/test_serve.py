"""./run_serve.sh: a real server process on 127.0.0.1 and a real HTTP client; every answer is the Tagger's."""

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from qloraner import QloranerError
from qloraner.conll import read_split
from qloraner.serve import ServeConfig
from qloraner.tag import Tagger
from tests.conftest import ROOT

MAX_NEW = 24  # as tests/test_tag.py: enough for the tiny adapter's answers, short CPU decodes
LIMITS = ("--max-body-bytes", "4096", "--max-texts", "4", "--max-chars", "2000")
STARTUP_S = 300  # loading the tiny model on a shared 2-core machine
ANSWER_S = 120


@dataclass
class Server:
    proc: subprocess.Popen
    url: str = ""
    stderr: list[str] = field(default_factory=list)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout=60)


def start_server(adapter: Path, *args: str) -> Server:
    """./run_serve.sh on a free port of 127.0.0.1 (port 0; its startup line names the port), as a user runs it in
    this interpreter's environment (env.sh's container mode)."""
    env = {
        **os.environ,
        "QLORANER_IN_CONTAINER": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = [str(ROOT / "run_serve.sh"), "--adapter", str(adapter), "--port", "0", "--max-new-tokens", str(MAX_NEW)]
    server = Server(subprocess.Popen([*command, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env))
    found: queue.Queue = queue.Queue()

    def pump() -> None:  # reads stderr to its end, so that the server never blocks on a full pipe
        for raw in server.proc.stderr:
            line = raw.decode(errors="replace")
            server.stderr.append(line)
            if m := re.match(r"qloraner serve: listening on (http://\S+) \(adapter (.*)\)$", line.rstrip("\n")):
                found.put(m[1])
        found.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        server.url = found.get(timeout=STARTUP_S) or ""
    except queue.Empty:
        pass
    if not server.url:
        server.stop()
        pytest.fail("the server did not start:\n" + "".join(server.stderr)[-3000:])
    return server


def request(url: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """Status and JSON answer of GET (no body) or POST; raises OSError where no answer comes."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=ANSWER_S) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def tagger(tiny_adapter) -> Tagger:
    return Tagger.load(tiny_adapter, "cpu", max_new_tokens=MAX_NEW, progress=False)


@pytest.fixture(scope="module")
def train_sentences(conll_dir) -> list[str]:
    """Sentences the tiny adapter learned, as plain text: it finds entities in them."""
    return [" ".join(s.tokens) for s in read_split(conll_dir, "train")[:8]]


@pytest.fixture(scope="module")
def expected(tagger, train_sentences) -> dict[str, list[dict]]:
    """Per text, the one-request answer: Tagger.tag on that text alone, in this process."""
    texts = [*train_sentences, "\n".join(train_sentences), ""]
    return {t: [asdict(e) for e in tagger.tag([t])[0]] for t in texts}


@pytest.fixture(scope="module")
def server(tiny_adapter):
    running = start_server(tiny_adapter, *LIMITS)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def good(expected, train_sentences) -> tuple[str, list[dict]]:
    """A good request's text and its entities."""
    return train_sentences[0], expected[train_sentences[0]]


def client_body(i: int, sentences: list[str]) -> dict:
    """Client i's request: one text, or a list of texts (an empty one among them)."""
    if i % 3 == 0:
        return {"texts": [sentences[i % 8], "", sentences[(i + 3) % 8]]}
    return {"text": sentences[i % 8]}


def test_concurrent_clients_each_get_their_own_answer(server, train_sentences, expected):
    """32 clients post at once; each gets exactly its own texts' entities, equal to the one-request answer (none
    lost, none mixed up), and the server decoded requests together: some batch held more than one."""
    answers: dict[int, tuple[int, dict]] = {}
    start = threading.Barrier(32)

    def client(i: int) -> None:
        start.wait(timeout=ANSWER_S)
        answers[i] = request(server.url, "/tag", client_body(i, train_sentences))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=ANSWER_S)
    assert sorted(answers) == list(range(32))
    for i, (status, answer) in answers.items():
        body = client_body(i, train_sentences)
        if "text" in body:
            assert (status, answer) == (200, {"entities": expected[body["text"]]}), i
        else:
            assert (status, answer) == (200, {"results": [{"entities": expected[t]} for t in body["texts"]]}), i
    assert any(expected[s] for s in train_sentences)  # answers with entities: a mix-up would show
    status, health = request(server.url, "/health")
    assert status == 200 and health["status"] == "serving"
    assert health["max_batch_requests"] > 1 and health["batches"] < health["requests"]


def test_startup_is_one_line_on_localhost(server, tiny_adapter):
    """By default the server listens on 127.0.0.1 only, and says so (and which adapter) in one stderr line."""
    assert server.url.startswith("http://127.0.0.1:")
    lines = [line for line in server.stderr if line.startswith("qloraner serve:")]
    assert lines == [f"qloraner serve: listening on {server.url} (adapter {tiny_adapter})\n"]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        (b'{"text": "' + b"x" * 5000 + b'"}', 413, r"body of \d+ bytes; at most 4096"),
        ({"texts": ["a"] * 5}, 413, "5 texts; at most 4 per request"),
        ({"text": "y" * 2001}, 413, "text 0 has 2001 characters; at most 2000"),
        (b'{"text": "Peter', 400, "body is not JSON"),
        (b"[" * 3000, 400, "body is not JSON"),
        (b'{"text": "\xff\xfe"}', 400, "body is not UTF-8"),
        (b'["Peter"]', 422, 'expected a JSON object with "text"'),
        ({"text": "a", "texts": ["b"]}, 422, 'expected a JSON object with "text"'),
        ({"text": 3}, 422, '"text" must be a string'),
        ({"texts": "Peter"}, 422, '"texts" must be a list of strings'),
        ({"texts": ["a", None]}, 422, '"texts" must be a list of strings'),
        ({"text": "a", "lang": "en"}, 422, 'unknown field\\(s\\): "lang"'),
        (b'{"text": "\\ud800"}', 422, "text 0 holds a lone surrogate"),
    ],
)
def test_bad_request_gets_its_status_and_the_server_keeps_serving(server, good, body, status, reason):
    """Each class of bad request gets its status and a one-line {"error": ...} reason; the next good request is
    answered as before."""
    got, answer = request(server.url, "/tag", body)
    assert got == status and list(answer) == ["error"], answer
    assert re.match(reason, answer["error"]) and "\n" not in answer["error"], answer
    assert request(server.url, "/tag", {"text": good[0]}) == (200, {"entities": good[1]})


def test_unknown_path_is_a_json_404(server):
    """A path the API lacks is a 404 with a JSON error, like every other refusal."""
    assert request(server.url, "/nope") == (404, {"error": "Not Found"})


def _burst(url: str, n: int, body: dict) -> list[tuple[int, dict]]:
    """n clients posting `body` at once; each one's status and answer, or the error it got instead."""
    answers: list = [None] * n
    start = threading.Barrier(n)

    def client(i: int) -> None:
        start.wait(timeout=ANSWER_S)
        try:
            answers[i] = request(url, "/tag", body)
        except OSError as err:  # the test judges it
            answers[i] = (None, {"error": repr(err)})

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=ANSWER_S)
    return answers


def test_full_queue_answers_429(tiny_adapter, expected, train_sentences):
    """With room for one waiting request, a burst of 12 gets 429 (with its reason) for those beyond the room and
    the right answer for the others; afterwards the server serves as before."""
    running = start_server(tiny_adapter, "--max-queue", "1")
    try:
        long = "\n".join(train_sentences)
        answers = _burst(running.url, 12, {"texts": [long, long]})
        assert {status for status, _ in answers} == {200, 429}, answers
        for status, answer in answers:
            want = {"results": [{"entities": expected[long]}] * 2}
            assert answer == want if status == 200 else re.match(r"1 requests already wait", answer["error"])
        assert request(running.url, "/tag", {"text": long}) == (200, {"entities": expected[long]})
    finally:
        assert running.stop() == 0


def test_sigterm_answers_requests_in_flight_and_exits_0(tiny_adapter, expected, train_sentences):
    """SIGTERM while requests decode or wait: every accepted request gets its right answer, new work is refused,
    and the process exits 0 without a traceback."""
    running = start_server(tiny_adapter)
    long = "\n".join(train_sentences)
    result: list = []
    burst = threading.Thread(target=lambda: result.extend(_burst(running.url, 8, {"texts": [long, long]})))
    burst.start()
    deadline = time.monotonic() + ANSWER_S
    while (health := request(running.url, "/health")[1])["accepted"] < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert health["accepted"] == 8 and health["requests"] < 8, health  # some still wait for their answer
    running.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    try:
        refused = request(running.url, "/tag", {"text": long})[0]
    except OSError:  # it no longer accepts connections
        refused = None
    assert refused in (None, 503)
    burst.join(timeout=ANSWER_S)
    assert result == [(200, {"results": [{"entities": expected[long]}] * 2})] * 8
    assert running.proc.wait(timeout=ANSWER_S) == 0
    assert "Traceback" not in "".join(running.stderr)


def test_settings_are_checked_together():
    """A request must fit one decode, and an adapter is required: both are reported at once."""
    with pytest.raises(QloranerError, match=r"--adapter: .*; --max-texts: must be <= --max-batch-texts"):
        ServeConfig(max_texts=10, max_batch_texts=5)
