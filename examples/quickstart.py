"""A short training run with the gradwatch agent attached; prints where its metrics are.

    python examples/quickstart.py [--steps N] [--port P]
"""

import argparse
import urllib.request

import torch

import gradwatch.agent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--port", type=int, default=0, help="metrics port (0: ephemeral)")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    agent = gradwatch.agent.watch(model, optimizer, run="quickstart", port=args.port)
    print(f"gradwatch metrics at {agent.url}")
    x = torch.randn(512, 16)
    y = (x[:, :4].sum(1, keepdim=True)).tanh()
    for step in range(1, args.steps + 1):
        batch = torch.randint(0, len(x), (64,))
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        loss.backward()
        if step == args.steps // 2:  # one poisoned batch: the guard skips it
            model[0].weight.grad[0, 0] = float("nan")
        agent.observe(loss=loss)
        optimizer.step()
        if step % 100 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}")
    exposition = urllib.request.urlopen(agent.url).read().decode()
    wanted = ("gradwatch_step", "gradwatch_loss", "gradwatch_grad_global_norm", "gradwatch_skipped_steps_total")
    print("\n".join(line for line in exposition.splitlines() if line.startswith(wanted)))
    agent.close()


if __name__ == "__main__":
    main()
