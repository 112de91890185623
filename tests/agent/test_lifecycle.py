"""watch() / close() / state_dict(), bad input, and failures that must not reach the trainer."""

import socket
import urllib.error
import urllib.request

import pytest
import torch

import gradwatch.agent
from gradwatch.agent import probe
from gradwatch.watchdog import metric_names as m
from tests.agent.conftest import sample
from tests.agent.models import MLP, loss_of


def train(model, opt, agent, steps: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_of(model, model.example(gen))
        loss.backward()
        agent.observe(loss=loss)
        opt.step()
    return loss


def test_close_removes_hooks_and_stops_the_endpoint(attach):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre, post = dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)
    agent = attach(model, opt)
    assert len(opt._optimizer_step_pre_hooks) == len(pre) + 1
    url = agent.url
    assert urllib.request.urlopen(url).status == 200
    agent.close()
    assert dict(opt._optimizer_step_pre_hooks) == pre and dict(opt._optimizer_step_post_hooks) == post
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=2)
    agent.close()  # idempotent
    gradwatch.agent.watch(model, opt, run="again", port=0).close()  # the optimizer can be watched again


def test_endpoint_binds_loopback_and_serves_the_contract(attach):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, every=1, run="run-a")
    train(model, opt, agent)
    assert agent.url.startswith("http://127.0.0.1:")
    text = urllib.request.urlopen(agent.url).read().decode()
    for name in (m.STEP, m.LOSS, m.GRAD_GLOBAL_NORM, m.GRAD_NORM, m.LEARNING_RATE, m.LR_SCALE):
        assert f'{name}{{' in text
    assert 'run="run-a"' in text and 'rank="0"' in text
    assert "job=" not in text and "step=" not in text


def test_two_agents_in_one_process_do_not_collide(attach):
    a_model, b_model = MLP(), MLP()
    a_opt, b_opt = torch.optim.SGD(a_model.parameters(), lr=0.1), torch.optim.SGD(b_model.parameters(), lr=0.2)
    a = attach(a_model, a_opt, run="a")
    b = attach(b_model, b_opt, run="b")
    train(a_model, a_opt, a, steps=2)
    assert sample(a, m.STEP) == 2 and sample(b, m.STEP) == 0
    assert sample(b, m.LEARNING_RATE, group="0") is None  # b never stepped
    assert a.url != b.url


def test_state_dict_resumes_the_step_count(attach):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt)
    train(model, opt, agent, steps=4)
    state = agent.state_dict()
    agent.close()
    resumed = attach(model, opt)
    resumed.load_state_dict(state)
    train(model, opt, resumed, steps=1)
    assert sample(resumed, m.STEP) == 5
    with pytest.raises(ValueError, match="version"):
        resumed.load_state_dict({"version": 99})


def test_peaks_are_kept_per_scraper(attach):
    """A spike between two scrapes is seen by every scraper, whichever scrapes first."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    agent = attach(model, opt, every=1)

    def scrape(who: str) -> float:
        req = urllib.request.Request(agent.url, headers={"User-Agent": who})
        for line in urllib.request.urlopen(req).read().decode().splitlines():
            if line.startswith(m.LOSS_MAX + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError("no loss max")

    def train_step(loss_value: float) -> None:
        opt.zero_grad()
        loss_of(model, model.example(torch.Generator())).backward()
        agent.observe(loss=loss_value)
        opt.step()

    for who in ("prometheus", "watchdog"):
        train_step(1.0)
        scrape(who)  # first contact: latest value
    train_step(50.0)  # the spike
    train_step(2.0)
    assert scrape("prometheus") == 50.0
    train_step(3.0)
    assert scrape("watchdog") == 50.0  # not stolen by Prometheus's scrape
    assert scrape("prometheus") == 3.0


@pytest.mark.parametrize(
    "kwargs, field",
    [({"every": 0}, "every"), ({"port": 70000}, "port"), ({"layers": "rows"}, "layers"), ({"bogus": 1}, "bogus")],
)
def test_invalid_settings_name_the_field(kwargs, field):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=field):
        gradwatch.agent.watch(model, opt, run="x", **kwargs)
    with pytest.raises(ValueError, match="run"):
        gradwatch.agent.watch(model, opt, run="bad name with spaces", port=0)
    assert not opt._optimizer_step_pre_hooks  # nothing attached


def test_bad_model_or_optimizer_is_refused():
    with pytest.raises(ValueError, match="no parameters"):
        gradwatch.agent.watch(torch.nn.ReLU(), torch.optim.SGD(MLP().parameters(), lr=0.1), run="x", port=0)
    with pytest.raises(ValueError, match="none of the model's parameters"):
        gradwatch.agent.watch(MLP(), torch.optim.SGD(MLP().parameters(), lr=0.1), run="x", port=0)


def test_port_in_use_falls_back_to_a_free_one_and_says_so(caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        agent = gradwatch.agent.watch(model, opt, run="x", port=port)
        try:
            served = int(agent.url.rsplit(":", 1)[1].split("/")[0])
            assert served != port
            assert f"port {port}" in caplog.text and f"port {served} instead" in caplog.text
            assert urllib.request.urlopen(agent.url).status == 200
        finally:
            agent.close()


def test_monitor_failure_never_reaches_the_training_loop(attach, monkeypatch, caplog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt, every=1)

    def broken(*args, **kwargs):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(probe, "grad_stats", broken)
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, agent, steps=2)
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # steps were applied
    assert "probe exploded" in caplog.text


def test_exporter_failure_never_reaches_the_training_loop(attach, monkeypatch, caplog):
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    agent = attach(model, opt)
    monkeypatch.setattr(agent.telemetry, "read", lambda scraper=None: 1 / 0)
    assert urllib.request.urlopen(agent.url).status == 200  # an empty but valid exposition
    train(model, opt, agent, steps=2)
    assert "rendering metrics failed" in caplog.text
