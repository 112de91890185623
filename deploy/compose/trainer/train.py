"""Example trainer for the compose stack: a small network trained with the gradwatch agent attached.

    GRADWATCH_URL=http://watchdog:9400 GRADWATCH_SECRET=... python train.py

The agent registers with the watchdog at $GRADWATCH_URL, authenticates commands with
$GRADWATCH_SECRET, and serves /metrics on $GRADWATCH_METRICS_HOST:$GRADWATCH_METRICS_PORT
for Prometheus. To show the whole loop — alert, Alertmanager, watchdog, command — the
script trains healthily, then from step $EXPLODE_AT a mis-set schedule raises the learning
rate by 0.5 % a step: within some 600 steps (about 15 s) it passes what SGD can take and the
gradient norm grows until it turns NaN, unless the watchdog's remediation (lower the LR,
enable clipping) arrives first. The agent's LR scale multiplies whatever the scheduler sets. It then keeps training, so the
dashboards have something to show, until $STEPS steps (0: forever).
"""

from __future__ import annotations

import logging
import os
import time

import torch

import gradwatch.agent


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    steps, explode_at = env_int("STEPS", 0), env_int("EXPLODE_AT", 3000)

    model = torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.Tanh(),
        torch.nn.Linear(128, 128), torch.nn.Tanh(),
        torch.nn.Linear(128, 128), torch.nn.Tanh(),
        torch.nn.Linear(128, 1),
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    # A deliberate divergence: the LR multiplier grows 0.5 % a step from EXPLODE_AT on.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 1.0 if s < explode_at else 1.005 ** (s - explode_at)
    )
    # GRADWATCH_URL and GRADWATCH_SECRET are read by the agent itself.
    agent = gradwatch.agent.watch(
        model, optimizer,
        run=os.environ.get("RUN", "compose-example"),
        host=os.environ.get("GRADWATCH_METRICS_HOST", "127.0.0.1"),
        port=env_int("GRADWATCH_METRICS_PORT", 9465),
        every=1,
        detail_every=10,
    )
    logging.info("metrics at %s", agent.url)

    x = torch.randn(4096, 32)
    y = torch.sin(x[:, :4].sum(1, keepdim=True))
    step = 0
    try:
        while steps == 0 or step < steps:
            step += 1
            if step == explode_at:
                logging.info("step %d: the learning rate starts growing 0.5 %% a step (a deliberate divergence)", step)
            batch = torch.randint(0, len(x), (64,))
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
            loss.backward()
            agent.observe(loss=loss)
            optimizer.step()  # the agent guards (skips NaN/Inf steps) and measures here
            scheduler.step()
            if step % 500 == 0:
                logging.info("step %d loss %.4f", step, loss.item())
            time.sleep(0.02)  # a demo: slow enough to watch
    finally:
        agent.close()


if __name__ == "__main__":
    main()
