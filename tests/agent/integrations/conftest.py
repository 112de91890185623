"""Shared by the adapter tests: a fake watchdog with the shared secret, and waiting for its commands."""

import time

import torch





def send(watchdog, agent, specs: list[dict], timeout: float = 10.0) -> None:
    """From inside a framework hook: queue signed commands and block the training thread until the
    agent's control thread has received them, so they apply at the very next optimizer step."""
    for spec in specs:
        watchdog.send(agent.config.run, spec)
    n = len(specs)
    deadline = time.monotonic() + timeout
    while len(agent.control.inbox) < n:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(agent.control.inbox)} of {n} commands reached the agent")
        time.sleep(0.01)


def global_norm(params) -> float:
    """The L2 norm of all present gradients together (float64 reference)."""
    grads = [p.grad.detach().double().flatten() for p in params if p.grad is not None]
    return torch.cat(grads).norm().item() if grads else 0.0
