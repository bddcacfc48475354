"""Collapse signals from curvature (RobustDARTS; docs/method.md §1.4): the dominant
eigenvalue of the Hessian of a loss, and DARTS-ES, the early stop it drives. Pure torch.

The eigenvalue is measured by power iteration on exact Hessian-vector products (double
backward), in full fp32 (:func:`exact_fp32`): bf16 and TF32 lose the small differences
these products are made of.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

#: The fp32 precision settings of the backends that may otherwise run fp32 math in
#: TF32 (CUDA matmul, cuDNN) or bf16 (oneDNN on CPUs that have it), RNN knobs with the
#: rest. Inside, PyTorch refuses to read the legacy ``torch.backends.cudnn.allow_tf32``
#: (it was set through the new API); only torch.compile's Inductor reads it, and the
#: search does not compile.
_FP32_KNOBS = (
    ("cuda", "matmul"),
    ("cudnn", "conv"),
    ("cudnn", "rnn"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)


@contextmanager
def exact_fp32(device: torch.device | str | None = None) -> Iterator[None]:
    """Inside: no autocast on ``device`` (default: CPU and, where present, CUDA), and fp32
    matmuls and convolutions computed in full IEEE fp32 (no TF32, no bf16 math modes).
    The backends' settings are restored on exit."""
    saved = []
    for backend, op in _FP32_KNOBS:
        knob = getattr(getattr(torch.backends, backend, None), op, None)
        if knob is not None and hasattr(knob, "fp32_precision"):
            saved.append((knob, knob.fp32_precision))
            knob.fp32_precision = "ieee"
    types = {torch.device(device).type} if device is not None else {"cpu"}
    if device is None and torch.cuda.is_available():
        types.add("cuda")
    try:
        with _no_autocast(sorted(types)):
            yield
    finally:
        for knob, value in reversed(saved):
            knob.fp32_precision = value


@contextmanager
def _no_autocast(device_types: Sequence[str]) -> Iterator[None]:
    if not device_types:
        yield
        return
    with torch.autocast(device_types[0], enabled=False), _no_autocast(device_types[1:]):
        yield


def dominant_eigenvalue(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    iters: int = 20,
    generator: torch.Generator | None = None,
    *,
    reduce: Callable[[list[torch.Tensor]], None] | None = None,
) -> float:
    """The largest-magnitude eigenvalue of the Hessian of ``loss_fn()`` with respect to all
    of ``params`` jointly (signed), by ``iters`` steps of power iteration on exact
    Hessian-vector products (double backward), in full fp32.

    ``loss_fn`` takes no argument and returns a scalar tensor; it is called once. The start
    vector is drawn from ``generator`` (on the CPU). ``reduce`` (data parallel) averages
    each Hessian-vector product over the ranks in place, so every rank computes the
    eigenvalue of the mean loss.
    """
    if iters < 1:
        raise ValueError(f"iters = {iters}: must be >= 1")
    params = list(params)
    if not params or not all(p.requires_grad for p in params):
        raise ValueError("dominant_eigenvalue: every parameter must require gradients")
    with exact_fp32(params[0].device):
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        # a gradient that does not depend on the parameters adds nothing to H v
        live = [i for i, g in enumerate(grads) if g.requires_grad]
        if not live:
            return 0.0  # the loss is linear in the parameters: the Hessian is zero
        v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
        v = _normalised(v)
        eigenvalue = 0.0
        for step in range(iters):
            hv = [
                torch.zeros_like(p) if h is None else h
                for p, h in zip(
                    params,
                    torch.autograd.grad(
                        [grads[i] for i in live], params, grad_outputs=[v[i] for i in live],
                        retain_graph=step < iters - 1, allow_unused=True,
                    ),
                    strict=True,
                )
            ]  # fmt: skip
            if reduce is not None:
                reduce(hv)
            # the Rayleigh quotient v·Hv (|v| = 1): the eigenvalue, with its sign
            eigenvalue = float(sum((h * x).sum() for h, x in zip(hv, v, strict=True)))
            if _norm(hv) == 0.0:
                return 0.0  # the Hessian is zero along v
            v = _normalised(hv)
    return eigenvalue


def _norm(tensors: Sequence[torch.Tensor]) -> float:
    return math.sqrt(float(sum(t.detach().double().square().sum() for t in tensors)))


def _normalised(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    norm = _norm(tensors)
    return [t.detach() / norm for t in tensors] if norm > 0 else [t.detach() for t in tensors]


def collapse_stop(
    eigenvalues: Sequence[tuple[int, float]], epoch: int, window: int, ratio: float
) -> tuple[int, str] | None:
    """RobustDARTS' DARTS-ES rule at the end of ``epoch`` (i): with λ̄(j) the mean of the
    eigenvalues measured in epochs j−k+1 … j (``eigenvalues``: ``(epoch, λ)`` pairs, k =
    ``window``), stop when λ̄(i−k) / λ̄(i) < ``ratio``, i.e. the curvature grew by more
    than 1/ratio over k epochs. Returns ``(i − k, reason)`` — the epoch whose architecture
    to keep — or None. Needs both windows measured (i ≥ 2k) and λ̄(i) > 0."""
    if epoch < 2 * window:
        return None

    def mean_up_to(j: int) -> float | None:
        values = [lam for e, lam in eigenvalues if j - window < e <= j]
        return sum(values) / len(values) if values else None

    before, now = mean_up_to(epoch - window), mean_up_to(epoch)
    if before is None or now is None or now <= 0 or before / now >= ratio:
        return None
    kept = epoch - window
    reason = (
        f"the Hessian eigenvalue grew: mean {before:.4g} over epochs "
        f"{kept - window + 1}-{kept}, {now:.4g} over epochs {kept + 1}-{epoch} "
        f"(ratio {before / now:.2f} < {ratio:g})"
    )
    return kept, reason
