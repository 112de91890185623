"""A real exposition passes Debian's `promtool check metrics`."""

import shutil
import subprocess
import urllib.request

import pytest
import torch

from tests.agent.models import SeqModel, loss_of


@pytest.mark.integration
def test_promtool_finds_nothing_to_complain_about(attach):
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    model = SeqModel()
    opt = torch.optim.Adam(model.parameters())
    agent = attach(model, opt, every=1, detail_every=1)
    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        opt.zero_grad()
        loss = loss_of(model, model.example(gen))
        loss.backward()
        if i == 1:
            model.head.weight.grad[0, 0] = float("nan")  # counters with labels appear too
        agent.observe(loss=loss)
        opt.step()
    exposition = urllib.request.urlopen(agent.url).read()
    assert b"gradwatch_nonfinite_grads_total{" in exposition
    result = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result
