"""Random weights that make a mapping slip visible: norm gains and biases off their 1 / 0 defaults."""
import torch


@torch.no_grad()
def randomize_gains_and_biases(module: torch.nn.Module) -> torch.nn.Module:
    """RMS gammas ~ 1 + 0.3 N(0, 1), biases ~ 0.1 N(0, 1); conv and linear weights keep their fan-in scaled init,
    which keeps activations O(1) through deep stacks."""
    for name, p in module.named_parameters():
        if name.endswith("gamma"):
            p.copy_(1.0 + 0.3 * torch.randn_like(p))
        elif name.endswith("bias"):
            p.copy_(0.1 * torch.randn_like(p))
    return module
