"""PCGrad: the Gram-matrix form against the paper's algorithm, a hand-computed example, task-specific parameters,
protection, and exactness under data parallelism (2 ranks on halves of a batch == 1 rank on the whole batch)."""

import random

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from hepml_dist.train.pcgrad import PCGrad, pcgrad_weights, task_orders


def paper_pcgrad(grads: list[torch.Tensor], orders: list[list[int]]) -> torch.Tensor:
    """The algorithm as written in Yu et al. (projection onto the original g_j), on explicit vectors."""
    projected = []
    for i, g in enumerate(grads):
        gi = g.clone().double()
        for j in orders[i]:
            gj = grads[j].double()
            dot = gi @ gj
            if dot < 0 and gj @ gj > 0:
                gi = gi - dot / (gj @ gj) * gj
        projected.append(gi)
    return torch.stack(projected).sum(0)


def test_hand_computed_two_tasks():
    # g1 = (1, 0), g2 = (-1, 1): conflicting (g1.g2 = -1).
    # g1' = g1 - (-1 / 2) g2 = (0.5, 0.5);  g2' = g2 - (-1 / 1) g1 = (0, 1);  sum = (0.5, 1.5).
    theta = nn.Parameter(torch.zeros(2))
    losses = {"a": theta @ torch.tensor([1.0, 0.0]), "b": theta @ torch.tensor([-1.0, 1.0])}
    pc = PCGrad([("theta", theta)], ["a", "b"], order="fixed")
    pc.accumulate(losses)
    weights = pc.apply(step=0)
    assert torch.allclose(theta.grad, torch.tensor([0.5, 1.5]))
    # In the basis of the original gradients: g1' = g1 + 0.5 g2, g2' = g1 + g2, so w = (2, 1.5).
    assert torch.allclose(weights, torch.tensor([2.0, 1.5]))


def test_no_conflict_is_plain_sum():
    theta = nn.Parameter(torch.zeros(3))
    losses = {"a": theta @ torch.tensor([1.0, 2.0, 0.0]), "b": theta @ torch.tensor([0.5, 0.0, 1.0])}
    pc = PCGrad([("theta", theta)], ["a", "b"])
    pc.accumulate(losses)
    pc.apply(step=3)
    assert torch.allclose(theta.grad, torch.tensor([1.5, 2.0, 1.0]))


@pytest.mark.parametrize("seed", range(5))
def test_gram_form_equals_paper_algorithm(seed):
    gen = torch.Generator().manual_seed(seed)
    t, p = 4, 7
    grads = [torch.randn(p, generator=gen) for _ in range(t)]
    grads[2] = torch.zeros(p)  # a task without examples in this batch
    orders = task_orders(t, "seeded", seed=seed, step=11)
    gram = torch.stack(grads).double() @ torch.stack(grads).double().T
    weights = pcgrad_weights(gram, orders)
    merged = weights @ torch.stack(grads).double()
    assert torch.allclose(merged, paper_pcgrad(grads, orders), atol=1e-10)


def test_seeded_orders_are_reproducible_and_vary_with_step():
    assert task_orders(5, "seeded", 1, 7) == task_orders(5, "seeded", 1, 7)
    assert any(task_orders(5, "seeded", 1, s) != task_orders(5, "seeded", 1, 7) for s in range(8, 20))
    for i, order in enumerate(task_orders(5, "seeded", 1, 7)):
        assert sorted(order) == [j for j in range(5) if j != i]


def test_protected_task_is_never_projected():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    gram = torch.stack([g1, g2]) @ torch.stack([g1, g2]).T
    weights = pcgrad_weights(gram, [[1], [0]], protected=[True, False])
    # g1 stays; g2' = (0, 1) = g2 + g1  ->  merged = g1 + g2 + g1 = 2 g1 + g2
    assert torch.allclose(weights.float(), torch.tensor([2.0, 1.0]))


class TwoHeads(nn.Module):
    """A shared trunk and one head per task, named as the model contract requires (heads.<task>.*)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(3, 4)
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 1), "b": nn.Linear(4, 1)})
        # Equal heads and opposite targets: the two tasks pull the trunk in conflicting directions.
        self.heads["b"].load_state_dict(self.heads["a"].state_dict())

    def losses(self, x, ya, yb):
        h = torch.tanh(self.trunk(x))
        return {
            "a": ((self.heads["a"](h)[:, 0] - ya) ** 2).mean(),
            "b": ((self.heads["b"](h)[:, 0] - yb) ** 2).mean(),
        }


def global_batch(n: int = 16):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, 3, generator=gen)
    return x, x[:, 0] * 2.0 + 1.0, -x[:, 0] * 2.0 - 1.0


def test_task_heads_get_their_own_gradient():
    model = TwoHeads()
    x, ya, yb = global_batch()
    losses = model.losses(x, ya, yb)
    own = torch.autograd.grad(losses["a"], list(model.heads["a"].parameters()), retain_graph=True)
    pc = PCGrad(list(model.named_parameters()), ["a", "b"])
    pc.accumulate(losses)
    pc.apply(step=0)
    for param, expected in zip(model.heads["a"].parameters(), own):
        assert torch.allclose(param.grad, expected)


def test_accumulating_micro_batches_equals_one_batch():
    x, ya, yb = global_batch()
    whole, parts = TwoHeads(), TwoHeads()
    pc_whole = PCGrad(list(whole.named_parameters()), ["a", "b"])
    pc_whole.accumulate(whole.losses(x, ya, yb))
    pc_whole.apply(step=2)
    pc_parts = PCGrad(list(parts.named_parameters()), ["a", "b"])
    for sl in (slice(0, 8), slice(8, 16)):
        pc_parts.accumulate(parts.losses(x[sl], ya[sl], yb[sl]), scale=0.5)
    pc_parts.apply(step=2)
    for p, q in zip(whole.parameters(), parts.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6)


def _rank_worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = TwoHeads()
    x, ya, yb = global_batch()
    half = slice(rank * 8, rank * 8 + 8)
    pc = PCGrad(list(model.named_parameters()), ["a", "b"], mode=mode, order="seeded", seed=3)
    pc.accumulate(model.losses(x[half], ya[half], yb[half]))
    pc.apply(step=4)
    if rank == 0:
        torch.save([p.grad for p in model.parameters()], out)
    dist.destroy_process_group()


def test_two_ranks_equal_one_rank_on_the_global_batch(tmp_path):
    model = TwoHeads()
    x, ya, yb = global_batch()
    pc = PCGrad(list(model.named_parameters()), ["a", "b"], mode="global", order="seeded", seed=3)
    pc.accumulate(model.losses(x, ya, yb))
    pc.apply(step=4)
    expected = [p.grad for p in model.parameters()]

    out = tmp_path / "grads.pt"
    port = random.randint(20000, 40000)
    mp.spawn(_rank_worker, args=(2, port, str(out), "global"), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    for e, g in zip(expected, got):
        assert torch.allclose(e, g, atol=1e-6)
    # The batch conflicts between the tasks on the trunk, so the projection really changed something.
    plain = TwoHeads()
    sum(plain.losses(x, ya, yb).values()).backward()
    assert not torch.allclose(plain.trunk.weight.grad, expected[0], atol=1e-4)
