"""The architecture gradient of the bi-level search (what DARTS's ``architect.py`` holds):
the gradient of the A-split loss with respect to the architecture parameters α, first
order (at the current weights) or second order (through the SGD step the weights are
about to take, with a finite-difference Hessian-vector product). Pure torch; nothing
here changes a parameter or an optimiser: the search loop takes the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from maenas_ray.engines.common import frozen
from maenas_ray.engines.hessian import exact_fp32
from maenas_ray.mae import masked_mse


def parameter_names(model: nn.Module, params: Iterable[torch.Tensor]) -> list[str]:
    """The names under which ``model`` holds ``params`` (their state-dict keys), in order:
    e.g. of ``Supernet.arch_parameters()`` inside a masked autoencoder."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params]


def momentum_buffers(
    optimizer: torch.optim.Optimizer, names: Sequence[str], params: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The SGD momentum buffers of ``params`` by name (none before the first step)."""
    return {
        n: optimizer.state[p]["momentum_buffer"]
        for n, p in zip(names, params, strict=True)
        if "momentum_buffer" in optimizer.state.get(p, {})
    }


def first_order_arch_gradients(
    loss_fn: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    alphas: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """First-order DARTS: the gradient of ``loss_fn()`` (the A-loss and the reconstruction,
    under whatever autocast it applies) with respect to ``alphas`` at the current weights.
    Returns the gradients, the loss and the reconstruction.

    The weights are frozen for the pass, so the backward does no weight-gradient work.
    Under bf16 the gradient is ~10% from fp32's, a tenth of what the next batch changes
    (docs/performance.md).
    """
    with frozen(weights):
        loss, pred = loss_fn()
    return list(torch.autograd.grad(loss, alphas)), loss, pred


def unrolled_arch_gradients(
    model: nn.Module,
    arch_names: Sequence[str],
    x_w: torch.Tensor,
    mask_w: torch.Tensor,
    x_a: torch.Tensor,
    mask_a: torch.Tensor,
    lr: float,
    weight_decay: float,
    momentum_buffers: dict[str, torch.Tensor],
    momentum: float,
    norm_pix: bool = False,
    fd_radius: float = 0.01,
    reduce: Callable[[Sequence[torch.Tensor]], None] | None = None,
) -> list[torch.Tensor]:
    """Second-order DARTS gradient of the A-loss with respect to α, in full fp32.

    ``w' = w - lr * (momentum * buf + ∇w L_W(w, α) + weight_decay * w)`` (the SGD step the
    weights are about to take), then ``∇α L_A(w', α) - lr * H`` where ``H`` is the
    finite-difference Hessian-vector product ``(∇α L_W(w+, α) - ∇α L_W(w-, α)) / 2ε`` with
    ``w± = w ± ε ∇w' L_A(w', α)`` and ``ε = fd_radius / ‖∇w' L_A‖``. Returns the α
    gradients, in ``arch_names`` order (see :func:`parameter_names`).
    ``reduce`` (data parallel) averages the two weight gradients in place over the ranks,
    so ``w'`` and ``w±`` are the same everywhere; the caller averages the result.

    Every pass runs without autocast and with TF32 off (:func:`exact_fp32`): the
    perturbation ``ε ∇w'`` is about 1e-5 of the weights, far below bf16's resolution (8
    bits) and TF32's (10 bits), which would leave the Hessian-vector product mostly noise.
    """
    with exact_fp32(x_a.device):
        return _unrolled(
            model, arch_names, x_w, mask_w, x_a, mask_a, lr, weight_decay, momentum_buffers,
            momentum, norm_pix, fd_radius, reduce,
        )  # fmt: skip


def _unrolled(
    model: nn.Module,
    arch_names: Sequence[str],
    x_w: torch.Tensor,
    mask_w: torch.Tensor,
    x_a: torch.Tensor,
    mask_a: torch.Tensor,
    lr: float,
    weight_decay: float,
    momentum_buffers: dict[str, torch.Tensor],
    momentum: float,
    norm_pix: bool,
    fd_radius: float,
    reduce: Callable[[Sequence[torch.Tensor]], None] | None,
) -> list[torch.Tensor]:
    params = dict(model.named_parameters())
    alphas = {n: params[n] for n in arch_names}
    weights = {n: p for n, p in params.items() if n not in alphas}

    def loss_at(w: Mapping[str, torch.Tensor], x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mse(functional_call(model, {**w, **alphas}, (x, mask)), x, mask, norm_pix)

    names = list(weights)
    g_w = list(torch.autograd.grad(loss_at(weights, x_w, mask_w), [weights[n] for n in names]))
    if reduce is not None:
        reduce(g_w)
    unrolled = {}
    with torch.no_grad():
        for n, g in zip(names, g_w, strict=True):
            p = weights[n]
            step = g + weight_decay * p
            if n in momentum_buffers:
                step = step + momentum * momentum_buffers[n]
            unrolled[n] = (p - lr * step).requires_grad_()
    grads = torch.autograd.grad(
        loss_at(unrolled, x_a, mask_a), [*alphas.values(), *unrolled.values()]
    )
    d_alpha, d_w = grads[: len(alphas)], list(grads[len(alphas) :])
    if reduce is not None:
        reduce(d_w)
    with torch.no_grad():
        eps = fd_radius / torch.cat([g.flatten() for g in d_w]).norm()
        w_plus = {n: weights[n] + eps * d for n, d in zip(names, d_w, strict=True)}
        w_minus = {n: weights[n] - eps * d for n, d in zip(names, d_w, strict=True)}
    g_plus = torch.autograd.grad(loss_at(w_plus, x_w, mask_w), list(alphas.values()))
    g_minus = torch.autograd.grad(loss_at(w_minus, x_w, mask_w), list(alphas.values()))
    return [
        da - lr * (gp - gm) / (2 * eps) for da, gp, gm in zip(d_alpha, g_plus, g_minus, strict=True)
    ]
