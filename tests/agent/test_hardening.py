"""Issue 13, agent side: attacks and faults run on loopback against the real agent.

Scrapers cannot make the training thread render or hold threads, the registered
consumers keep their peaks under a crowd of scrapers, an unreadable command does not
block the queue, close() does not wait on the watchdog, observe() never raises.
"""

import logging
import math
import select
import socket
import threading
import time
import urllib.request

import pytest
import torch

from gradwatch.agent import telemetry
from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.conftest import SECRET
from tests.agent.models import MLP, loss_of

WATCHDOG_UA = "gradwatch-watchdog/0.1.0"  # what watchdog/sources/scrape.py sends



def trainer(model, opt, agent, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)

    def step(loss_value=None):
        opt.zero_grad()
        loss = loss_of(model, model.example(gen))
        loss.backward()
        agent.observe(loss=loss if loss_value is None else loss_value)
        opt.step()

    return step


def scrape(agent, user_agent: str = "curl/8") -> str:
    request = urllib.request.Request(agent.url, headers={"User-Agent": user_agent})
    return urllib.request.urlopen(request, timeout=10).read().decode()


def value_of(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{labels} not in the exposition")


def host_port(agent) -> tuple[str, int]:
    host, port = agent.url.split("//")[1].split("/")[0].rsplit(":", 1)
    return host, int(port)


# -- scrapes cannot slow the training thread -----------------------------------------------


def test_the_exposition_is_rendered_once_per_change_off_the_training_thread(attach, monkeypatch):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, every=5)
    step = trainer(model, opt, agent)
    for _ in range(5):
        step()
    renders: list[str] = []
    layer_families = agent.collector._layer_families

    def counted(view):
        renders.append(threading.current_thread().name)
        return layer_families(view)

    monkeypatch.setattr(agent.collector, "_layer_families", counted)
    first = scrape(agent)
    for _ in range(20):
        assert scrape(agent) == first  # no step in between: the same text, from the cache
    assert len(renders) == 1
    for _ in range(5):  # step 10 is sampled: new per-layer values
        step()
    layer, values = next(iter(agent.telemetry.read().layers.items()))
    want = values.grad_norm
    deadline = time.monotonic() + 20
    while value_of(scrape(agent), m.GRAD_NORM, layer=layer) != want:
        assert time.monotonic() < deadline, "the new per-layer values never reached the exposition"
        time.sleep(0.02)
    for _ in range(20):
        scrape(agent)
    assert len(renders) == 2  # once per change of the layer tables, however many scrapes
    assert set(renders) == {"gradwatch-metrics"}  # never the training thread, never a thread per client


def test_idle_connections_take_no_threads_and_scrapes_still_answer(attach):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt)
    trainer(model, opt, agent)()
    before = threading.active_count()
    idle = []
    try:
        for _ in range(200):
            idle.append(socket.create_connection(host_port(agent), timeout=5))
        time.sleep(0.5)
        assert threading.active_count() <= before  # 200 idle clients, not 200 threads
        assert m.STEP in scrape(agent)  # an idle client gives its place to one that asks
    finally:
        for s in idle:
            s.close()


def test_a_client_trickling_its_request_is_dropped(attach):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt)
    with socket.create_connection(host_port(agent), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ")
        deadline = time.monotonic() + 30
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                s.send(b"a")  # one byte at a time of one header, never the end of the head
            except OSError:
                closed = True
                break
            if select.select([s], [], [], 0.2)[0]:
                try:
                    closed = s.recv(4096) == b""
                except OSError:
                    closed = True
        assert closed, "the server kept a trickling client for 30 s"
    assert m.STEP in scrape(agent)


def test_consumers_keep_their_peaks_whatever_other_scrapers_do(attach):
    """With 12 other scrapers between two of its scrapes, the watchdog (and Prometheus) sees every spike."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    agent = attach(model, opt)
    step = trainer(model, opt, agent)
    consumers = (WATCHDOG_UA, "Prometheus/2.45.0")
    others = [f"scraper-{i}/1.0" for i in range(12)]
    step(1.0)
    for who in consumers + tuple(others):
        scrape(agent, who)
    seen = {who: [] for who in consumers}
    spikes = [100.0 + i for i in range(10)]
    for spike in spikes:
        step(spike)
        step(1.0)
        for who in others:
            scrape(agent, who)
        for who in consumers:
            seen[who].append(value_of(scrape(agent, who), m.LOSS_MAX))
    assert seen == {who: spikes for who in consumers}
    assert len(others) > telemetry.MAX_SCRAPERS  # the others did evict one another


# -- commands ---------------------------------------------------------------------------------


def test_an_unreadable_command_is_rejected_and_the_rest_of_the_batch_applied(attach, watchdog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    step = trainer(model, opt, agent)
    zero = watchdog.send_raw({"spec": {"action": "lower_lr", "factor": 0}})
    nan = watchdog.send_raw({"spec": {"action": "lower_lr", "factor": float("nan")}})
    newer = watchdog.send_raw({"spec": {"action": "quantum_leap"}})
    mode = watchdog.send_raw({"spec": {"action": "enable_clipping", "mode": "clip_by_vibes", "threshold": 1.0}})
    good = watchdog.send("test", {"action": "lower_lr", "factor": 0.5})
    acks = {a.command_id: a for a in watchdog.wait_for_acks(5, step)}
    for bad in (zero, nan, newer, mode):
        ack = acks[bad["command"]["id"]]
        assert ack.status == "rejected" and "cannot read the command" in ack.detail
    assert "factor" in acks[zero["command"]["id"]].detail and "action" in acks[newer["command"]["id"]].detail
    assert acks[good.command.id].status == "applied"
    assert sample(agent, m.LR_SCALE) == 0.5
    polls = watchdog.polls
    while watchdog.polls < polls + 5:  # the bad entries are behind it: no re-registration, no new acks
        step()
        time.sleep(0.01)
    assert len(watchdog.registrations) == 1 and len(watchdog.acks) == 5


def test_a_poll_answered_404_registers_again_with_the_same_instance(attach, watchdog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    step = trainer(model, opt, agent)
    deadline = time.monotonic() + 10
    while not watchdog.registrations:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    watchdog.known = False  # e.g. an anonymous DELETE, or a watchdog that lost its state
    while len(watchdog.registrations) < 2:
        assert time.monotonic() < deadline, "the agent did not register again"
        step()
        time.sleep(0.01)
    first, again = watchdog.registrations[:2]
    assert first.instance and len(first.instance) == 32 and again.instance == first.instance
    assert str(first.metrics_url) == agent.url


def test_the_registered_url_is_the_port_actually_served(attach, watchdog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        model = MLP()
        agent = attach(model, torch.optim.SGD(model.parameters(), lr=0.1), port=port, watchdog_url=watchdog.url)
        other = MLP()
        second = attach(other, torch.optim.SGD(other.parameters(), lr=0.1), port=port, run="second")  # same preference (one run per optimizer)
        assert len({agent.url, second.url}) == 2 and f":{port}/" not in agent.url + second.url
        deadline = time.monotonic() + 10
        while not watchdog.registrations:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert str(watchdog.registrations[0].metrics_url) == agent.url
        assert m.STEP in scrape(agent) and m.STEP in scrape(second)


def test_an_explicit_poll_interval_wins_over_the_watchdogs(attach, watchdog):
    watchdog.poll_interval_s = 1e9  # at that, the agent would never poll again
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(model, opt, watchdog_url=watchdog.url, poll_interval_s=0.05)
    deadline = time.monotonic() + 10
    while watchdog.polls < 5:
        assert time.monotonic() < deadline, f"{watchdog.polls} polls"
        time.sleep(0.01)


@pytest.mark.parametrize("sent, used", [(1e9, 60.0), (1e-4, 0.1), (float("nan"), 1.0), (2.5, 2.5)])
def test_the_watchdogs_poll_interval_is_clamped(attach, watchdog, sent, used):
    watchdog.poll_interval_s = sent
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, watchdog_url=watchdog.url)
    deadline = time.monotonic() + 10
    while watchdog.polls < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.05)  # the answer is read
    assert agent.control.watchdog_interval_s == used


# -- close() never waits on the watchdog ------------------------------------------------------


class _BadWatchdog:
    """Accepts connections, then never answers (black hole) or answers one byte per 0.2 s (trickle)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.conns.append(conn)
            if self.kind == "trickle":
                threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        answer = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 10_000
        for byte in answer:
            if self.stop.wait(0.2):
                return
            try:
                conn.send(bytes([byte]))
            except OSError:
                return

    def close(self) -> None:
        self.stop.set()
        for c in self.conns:
            c.close()
        self.listener.close()


@pytest.mark.parametrize("kind", ["black_hole", "trickle"])
def test_close_returns_promptly_whatever_the_watchdog_does(kind, monkeypatch):
    import gradwatch.agent

    monkeypatch.setenv("GRADWATCH_SECRET", SECRET.decode())
    bad = _BadWatchdog(kind)
    try:
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        agent = gradwatch.agent.watch(model, opt, run="test", port=0, watchdog_url=bad.url, poll_interval_s=0.05)
        step = trainer(model, opt, agent)
        for _ in range(3):
            step()
        time.sleep(0.5)  # the control thread is inside its registration, waiting on the watchdog
        started = time.monotonic()
        agent.close()
        took = time.monotonic() - started
        assert took < 2.0, f"close() took {took:.1f} s"  # a bound on blocking, not a speed figure
    finally:
        bad.close()


# -- observe() never raises into the training loop ---------------------------------------------


@pytest.mark.parametrize(
    "loss, exported",
    [
        (torch.tensor([1.0, 2.0, 3.0, 6.0]), 3.0),  # unreduced: its mean
        (10**400, math.inf),  # an int too big for a float
        (-(10**400), -math.inf),
        (torch.tensor(2.5, dtype=torch.float64), 2.5),
        ("1.5", None),  # not a number: dropped
        (None, None),
        (torch.tensor([]), None),
        (torch.tensor(1 + 2j), None),
    ],
    ids=["1-D", "10**400", "-10**400", "float64", "string", "None", "empty", "complex"],
)
def test_observe_never_raises_and_logs_once(attach, caplog, loss, exported):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt)
    gen = torch.Generator().manual_seed(0)
    before = [p.detach().clone() for p in model.parameters()]
    with caplog.at_level(logging.WARNING, logger="gradwatch.agent"):
        for _ in range(5):
            opt.zero_grad()
            loss_of(model, model.example(gen)).backward()
            agent.observe(loss=loss)
            opt.step()
    assert sample(agent, m.STEP) == 5
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # training went on
    assert sample(agent, m.LOSS) == exported
    lines = [r for r in caplog.records if r.name == "gradwatch.agent"]
    if exported is None or isinstance(loss, torch.Tensor) and loss.dim():
        assert len(lines) == 1, [r.getMessage() for r in lines]  # once, not once per step
    else:
        assert not lines


# -- the cached, piecewise exposition is still one valid exposition ---------------------------

OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


@pytest.mark.parametrize("accept", ["", OPENMETRICS])
def test_the_pieced_exposition_parses_and_matches_the_registry(attach, accept):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
    from prometheus_client.parser import text_string_to_metric_families as parse_text

    model = MLP(depth=12)  # 26 tensors: each per-layer family is rendered in two pieces
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, every=1)
    step = trainer(model, opt, agent)
    for _ in range(3):
        step()
    request = urllib.request.Request(agent.url, headers={"Accept": accept, "User-Agent": "test/1"})
    with urllib.request.urlopen(request, timeout=10) as response:
        text, content_type = response.read().decode(), response.headers["Content-Type"]
    assert content_type.startswith("application/openmetrics-text" if accept else "text/plain")
    families = list((parse_openmetrics if accept else parse_text)(text))  # one EOF, each family once
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    grad_norms = {s.labels["layer"]: s.value for f in families if f.name == m.GRAD_NORM for s in f.samples}
    assert len(grad_norms) == 26
    for layer, value in grad_norms.items():
        assert value == sample(agent, m.GRAD_NORM, layer=layer)


def test_requests_the_endpoint_does_not_serve_get_a_status_not_a_hang(attach):
    model = MLP()
    agent = attach(model, torch.optim.SGD(model.parameters(), lr=0.1))

    def status(raw: bytes) -> bytes:
        with socket.create_connection(host_port(agent), timeout=10) as s:
            s.sendall(raw)
            return s.recv(4096).split(b"\r\n", 1)[0]

    assert status(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n") == b"HTTP/1.1 404 Not Found"
    assert status(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n") == b"HTTP/1.1 405 Method Not Allowed"
    assert status(b"nonsense\r\n\r\n") == b"HTTP/1.1 400 Bad Request"
    assert status(b"GET /metrics HTTP/1.1\r\nX-Big: " + b"a" * 8_500) == b"HTTP/1.1 431 Request Header Fields Too Large"
