"""Small real models of the kinds the agent must handle, and a reference training step."""

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()
        self.layers = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.layers(x)).squeeze(-1)

    def example(self, gen: torch.Generator, batch: int = 8):
        return (torch.randn(batch, self.head.in_features, generator=gen),)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 1)

    def forward(self, x):
        return self.head(torch.relu(self.conv2(torch.relu(self.conv1(x)))).flatten(1)).squeeze(-1)

    def example(self, gen, batch: int = 4):
        return (torch.randn(batch, 3, 8, 8, generator=gen),)


class SeqModel(nn.Module):
    """Embedding + 2-layer LSTM, plus a parameter the forward pass never uses (gets no gradient)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 12, num_layers=2, batch_first=True)
        self.head = nn.Linear(12, 1)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, tokens):
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1]).squeeze(-1)

    def example(self, gen, batch: int = 4):
        return (torch.randint(0, 20, (batch, 7), generator=gen),)


class Stacked(nn.Module):
    """Many same-shape layers (the probe stacks them on CPU) and a large head (read on its own)."""

    def __init__(self, width: int = 64, depth: int = 40, out: int = 300):
        super().__init__()
        self.blocks = nn.Sequential(*[m for _ in range(depth) for m in (nn.Linear(width, width), nn.Tanh())])
        self.head = nn.Linear(width, out)

    def forward(self, x):
        return self.head(self.blocks(x))

    def example(self, gen: torch.Generator, batch: int = 8):
        return (torch.randn(batch, self.head.in_features, generator=gen),)


class WithEmptyParameter(MLP):
    """An MLP that also holds a parameter with no elements (which still gets an empty gradient)."""

    def __init__(self):
        super().__init__()
        self.empty = nn.Parameter(torch.zeros(0))

    def forward(self, x):
        return super().forward(x) + self.empty.sum()


def loss_of(model: nn.Module, inputs) -> torch.Tensor:
    return model(*inputs).float().square().mean()
