"""The fastest training loss in one call: ``GPTModel.compile_loss`` (this module's ``compile_loss``).

The recipe, each part measured alone on the H200 (2026-12-04, README "Results"):

- the model's kernels: ``kernels="auto"`` (the default) runs the Triton ones on CUDA, fused
  LayerNorm / residual add + LayerNorm and flash attention (with its dropout);
- the fused loss: ``GPTModel.loss`` projects onto the vocabulary and takes the cross-entropy in one
  op (``gptfast.kernels.linear_cross_entropy``), which never holds the (tokens x vocab) logits, and
  reads no target back (``check_targets=False``: the caller's data was validated, as
  ``gptfast.dataset.TokenData`` does; see ``check_targets`` below);
- torch.compile of the whole loss, embeddings to the fused head, as one graph
  (``fullgraph=True``: a graph break is an error, not a silent fallback), its backward compiled
  with it (AOTAutograd); the kernels are ``gptfast::`` custom ops, one graph node each, and
  Inductor fuses the rest (matmul epilogues, GELU, dropout, the embedding sum);
- with ``mode="reduce-overhead"`` on CUDA, the compiled forward and backward each replay as one
  CUDA graph: the attention dropout's seed is drawn and read on the GPU and nothing reads a value
  back, so the whole step captures, each replay with fresh dropout masks.

The model itself is not changed: ``model(ids)``, ``model.loss``, evaluation and generation stay
eager, so they cost the compiled loss no recompile (eval mode, no_grad and KV-cache shapes would
each be one).
"""

import torch
from torch import nn


class TrainingLoss(nn.Module):
    """``model.loss(ids, targets)`` as a module, so that DDP's hooks and torch.compile see the
    training step; the loss is the mean cross-entropy over targets other than -100.

    The targets' values are not read (``GPTModel.loss(check_targets=False)``): a target out of
    range gives a NaN loss (and NaN gradients) on both paths, never a device-side assert.
    ``check_targets=True`` checks them before each call, outside any compiled graph, with
    ``GPTModel.loss``'s ValueError (on CUDA one flag read back: a host sync per call).
    """

    def __init__(self, model: nn.Module, check_targets: bool = False, cuda_graphs: bool = False):
        super().__init__()
        if not isinstance(check_targets, bool):
            raise TypeError(f"check_targets must be True or False, got {check_targets!r}")
        self.model, self.check_targets, self.cuda_graphs = model, check_targets, cuda_graphs

    def forward(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(ids, targets, check_targets=False)

    def __call__(self, ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.check_targets:
            self.model._check_targets(ids, targets, -100)  # raises on a bad one
        if self.cuda_graphs and isinstance(ids, torch.Tensor) and ids.is_cuda:
            self._refuse_accumulation()
        return super().__call__(ids, targets)

    def _refuse_accumulation(self) -> None:
        """Under CUDA graphs a backward's gradients live in the graphs' memory, which the next
        replay overwrites: gradients kept from an earlier step are lost (PyTorch issue 169545:
        an error on access; issue 96693 reports silently wrong accumulated gradients), so a call
        in grad mode with gradients already there is refused."""
        if torch.is_grad_enabled() and any(p.grad is not None for p in self.model.parameters()):
            raise RuntimeError(
                "compile_loss(mode with CUDA graphs): the parameters hold gradients from an "
                "earlier backward, which CUDA graph replays cannot accumulate into; call "
                "optimizer.zero_grad(set_to_none=True) after each step (one backward per step), "
                "or use mode='default' for gradient accumulation")


def compile_loss(model: nn.Module, mode: str = "default", *, fullgraph: bool = True,
                 dynamic: bool | None = None, backend="inductor",
                 check_targets: bool = False) -> TrainingLoss:
    """``model.loss`` compiled as this module's docstring describes: a ``TrainingLoss`` whose
    call ``loss = step(ids, targets)`` is the training loss, ``loss.backward()`` its compiled
    backward.

    ``mode``: one of torch.compile's Inductor modes (``torch._inductor.list_mode_options()``:
    "default", "reduce-overhead" for CUDA graphs, "max-autotune", ...); with CUDA graphs, zero the
    gradients after each step (``set_to_none=True``): they cannot accumulate across calls
    (refused with a RuntimeError). ``fullgraph``: a graph break is an error (False: allowed, as
    FSDP's hooks need). ``dynamic``: torch.compile's (None: the first shapes specialise, a second
    sequence length compiles once more with a dynamic length). ``backend``: "inductor", or
    another torch.compile backend (e.g. "aot_eager", to tell an Inductor problem from a
    tracing one), which takes mode="default" only. ``check_targets``: see ``TrainingLoss``.
    """
    from torch._inductor import list_mode_options

    modes = list_mode_options()
    if not isinstance(mode, str) or mode not in modes:
        raise ValueError(f"mode must be one of {tuple(modes)}, got {mode!r}")
    if mode != "default" and backend != "inductor":
        raise ValueError(f"mode={mode!r} is an Inductor mode; backend {backend!r} takes mode='default'")
    if not isinstance(fullgraph, bool):
        raise TypeError(f"fullgraph must be True or False, got {fullgraph!r}")
    if dynamic is not None and not isinstance(dynamic, bool):
        raise TypeError(f"dynamic must be None, True or False, got {dynamic!r}")
    loss = TrainingLoss(model, check_targets, cuda_graphs=modes[mode].get("triton.cudagraphs", False))
    loss.compile(mode=mode, fullgraph=fullgraph, dynamic=dynamic, backend=backend)
    return loss
