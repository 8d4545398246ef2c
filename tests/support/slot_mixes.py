"""Adapter popularity mixes for the kernel tests: a slot per token."""

import torch

RANK_CHOICES = [1, 2, 5, 8, 16, 17, 32, 64, 100, 128]


def token_slots(mix: str, num_tokens: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """[T] int32 slot per token for an adapter popularity mix."""
    if mix == "identical":
        s = torch.full((num_tokens,), num_slots // 2)
    elif mix == "distinct":  # one token per adapter (decode), cycling when T > S
        s = torch.randperm(num_slots, generator=gen).repeat(num_tokens // num_slots + 1)[:num_tokens]
    elif mix == "zipf":
        w = 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float64) ** 1.2
        s = torch.multinomial(w, num_tokens, replacement=True, generator=gen)
    elif mix == "base25":  # uniform over adapters, 25% base-only rows
        s = torch.randint(0, num_slots, (num_tokens,), generator=gen)
        s[torch.rand(num_tokens, generator=gen) < 0.25] = -1
    elif mix == "sparse":  # few slots used: most segments empty
        s = torch.tensor([1, num_slots - 2, -1])[torch.randint(0, 3, (num_tokens,), generator=gen)]
    else:
        raise ValueError(mix)
    return s.to(torch.int32)
