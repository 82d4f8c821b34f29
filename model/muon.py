"""Muon, and the DeepSeek-V4 recipe: Muon for the weight matrices, AdamW for everything else.

Layout (the maths apart from the stateful wrapper):
- `flat_ns_coefficients`, `adjusted_lr`, `muon_update`, `muon_step`: pure functions. `muon_update`
  takes one gradient [..., rows, cols] (a matrix or a stack of them), advances its momentum buffer
  and returns the orthogonalised update, with one `torch.ops.dsv4.newton_schulz` call for the stack.
- `Muon`: the `torch.optim.Optimizer` (argument checks, state, `step`).
- `uses_muon` / `split_params` / `muon_param_names`: which parameter goes to which optimizer.
- `HybridOptimizer` and `deepseek_v4_optimizer`: the recipe as one optimizer object.

`Muon` takes torch.optim.Muon's arguments with the same names and defaults and, given only those,
does the same update (momentum as an EMA `buf.lerp_(g, 1 - momentum)`, Nesterov `g.lerp(buf,
momentum)`, decoupled weight decay `p *= 1 - lr * weight_decay`, lr adjusted by the shape, quintic
Newton-Schulz in bfloat16). Extensions: `ns_coefficients` may be a list of triples (one per step),
`adjust_lr_fn` may be a number, and a 3-D parameter [E, rows, cols] is a stack of E matrices.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = [
    "ADJUST_LR_FNS", "DEFAULT_NS_COEFFICIENTS", "DEFAULT_NS_STEPS", "DEFAULT_EPS", "DSV4_ADJUST_LR",
    "DSV4_NS_COEFFICIENTS", "HybridOptimizer", "Muon", "adjusted_lr", "deepseek_v4_optimizer",
    "flat_ns_coefficients", "muon_param_names", "muon_step", "muon_update", "split_params", "uses_muon",
]

# torch.optim.Muon's defaults (Keller Jordan's quintic: the slope at 0 is as high as convergence allows).
DEFAULT_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
DEFAULT_NS_STEPS = 5
DEFAULT_EPS = 1e-7
ADJUST_LR_FNS = ("original", "match_rms_adamw")

# DeepSeek-V4: 8 fast quintic steps drive every singular value into roughly [0.7, 1.2], then 2 steps
# of p(x) = 2x - 1.5x^3 + 0.5x^5 (p(1) = 1, p'(1) = 0) pull them onto 1.
DSV4_NS_COEFFICIENTS: tuple[tuple[float, float, float], ...] = (
    ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2)
# Update RMS matched to AdamW's: lr * 0.18 * sqrt(max(rows, cols)) (torch's "match_rms_adamw" uses 0.2).
DSV4_ADJUST_LR = 0.18


# ================================================================================================
# The maths
# ================================================================================================

def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _is_triple(x: Any) -> bool:
    return isinstance(x, Sequence) and not isinstance(x, str) and len(x) == 3 and all(map(_is_number, x))


def flat_ns_coefficients(ns_coefficients, ns_steps: int = DEFAULT_NS_STEPS) -> list[float]:
    """The flat list a0, b0, c0, a1, ... that `torch.ops.dsv4.newton_schulz` takes.

    ns_coefficients: one (a, b, c) triple, repeated `ns_steps` times, or a non-empty list of triples,
    one per step (then `ns_steps` is ignored).
    """
    if _is_triple(ns_coefficients):
        if isinstance(ns_steps, bool) or not isinstance(ns_steps, int) or not 1 <= ns_steps < 100:
            raise ValueError(f"Muon: ns_steps={ns_steps!r}; accepted: an int in [1, 99]")
        return [float(v) for v in ns_coefficients] * ns_steps
    if (isinstance(ns_coefficients, Sequence) and not isinstance(ns_coefficients, str) and ns_coefficients
            and all(map(_is_triple, ns_coefficients))):
        return [float(v) for triple in ns_coefficients for v in triple]
    raise ValueError(f"Muon: ns_coefficients={ns_coefficients!r}; accepted: one (a, b, c) triple of finite numbers "
                     "or a non-empty list of such triples (one per Newton-Schulz step)")


def adjusted_lr(lr: float, adjust_lr_fn: str | float | None, shape: Sequence[int]) -> float:
    """The learning rate applied to the orthogonalised update of a parameter of `shape` [..., rows, cols].

    None / "original": lr * sqrt(max(1, rows / cols)) (Keller Jordan); "match_rms_adamw":
    lr * 0.2 * sqrt(max(rows, cols)) (Moonshot); a number f: lr * f * sqrt(max(rows, cols)) (V4: 0.18).
    """
    rows, cols = shape[-2], shape[-1]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1.0, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr * float(adjust_lr_fn) * math.sqrt(max(rows, cols))


def muon_update(grad: Tensor, momentum_buffer: Tensor, *, momentum: float, nesterov: bool,
                coefficients: list[float], newton_schulz: Callable[[Tensor, list[float]], Tensor] | None = None) -> Tensor:
    """Momentum, then Newton-Schulz: the direction Muon moves a parameter along (before lr).

    grad, momentum_buffer [..., rows, cols] (one matrix, or a stack orthogonalised matrix by matrix in
    one `newton_schulz` call); the buffer is updated in place: buf <- momentum buf + (1 - momentum) grad.
    The input to Newton-Schulz is grad + momentum (buf - grad) with Nesterov, else buf.
    coefficients: flat a0, b0, c0, a1, ... (see `flat_ns_coefficients`). newton_schulz: what runs the
    op's maths (default: `torch.ops.dsv4.newton_schulz`). Returns grad's dtype and shape.
    """
    momentum_buffer.lerp_(grad, 1 - momentum)
    direction = grad.lerp(momentum_buffer, momentum) if nesterov else momentum_buffer
    return (newton_schulz or torch.ops.dsv4.newton_schulz)(direction, coefficients)


def muon_step(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
              weight_decay: float, momentum: float, nesterov: bool, ns_coefficients, ns_steps: int,
              adjust_lr_fn: str | float | None, newton_schulz: Callable[[Tensor, list[float]], Tensor] | None = None) -> None:
    """One Muon step over parameters [..., rows, cols] in place: p <- p (1 - lr wd) - lr' O, where O is
    `muon_update` (with `newton_schulz`) and lr' = `adjusted_lr(lr, adjust_lr_fn, p.shape)`."""
    coefficients = flat_ns_coefficients(ns_coefficients, ns_steps)
    for param, grad, buf in zip(params, grads, momentum_buffers, strict=True):
        update = muon_update(grad, buf, momentum=momentum, nesterov=nesterov, coefficients=coefficients,
                             newton_schulz=newton_schulz)
        param.mul_(1 - lr * weight_decay)
        param.add_(update, alpha=-adjusted_lr(lr, adjust_lr_fn, param.shape))


# ================================================================================================
# The optimizer
# ================================================================================================

def _check_group(group: Mapping[str, Any]) -> None:
    """Raise ValueError with one clear line for the first bad hyperparameter of a param group."""
    lr = group["lr"]
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not bool(lr >= 0):
            raise ValueError(f"Muon: lr={lr!r}; accepted: a number >= 0 or a 1-element tensor >= 0")
    elif not _is_number(lr) or lr < 0:
        raise ValueError(f"Muon: lr={lr!r}; accepted: a finite number >= 0")
    for key in ("weight_decay", "momentum", "eps"):
        if not _is_number(group[key]) or group[key] < 0:
            raise ValueError(f"Muon: {key}={group[key]!r}; accepted: a finite number >= 0")
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"Muon: nesterov={group['nesterov']!r}; accepted: True or False")
    flat_ns_coefficients(group["ns_coefficients"], group["ns_steps"])
    fn = group["adjust_lr_fn"]
    if not (fn is None or fn in ADJUST_LR_FNS or (_is_number(fn) and fn > 0)):
        raise ValueError(f"Muon: adjust_lr_fn={fn!r}; accepted: None, 'original', 'match_rms_adamw' or a number "
                         "f > 0 (lr * f * sqrt(max(rows, cols)); DeepSeek-V4 uses 0.18)")
    names = group.get("param_names") or [f"#{i}" for i in range(len(group["params"]))]
    for name, p in zip(names, group["params"]):
        if p.ndim not in (2, 3):
            raise ValueError(f"Muon: parameter {name} has shape {tuple(p.shape)}; accepted: 2-D [rows, cols] or "
                             "3-D [experts, rows, cols]; optimise the others with AdamW")
        if torch.is_complex(p):
            raise ValueError(f"Muon: parameter {name} is {p.dtype}; complex parameters are not supported")


class Muon(torch.optim.Optimizer):
    r"""Muon: momentum, then an approximate orthogonalisation of the update by Newton-Schulz.

    Per parameter P [rows, cols] or [E, rows, cols] with gradient G, momentum mu, lr, weight decay wd:
        B <- mu B + (1 - mu) G;   U <- G + mu (B - G) if nesterov else B
        O <- NS(U)  (per matrix: U / (||U||_F + 1e-7) in bf16, transposed if tall, then for each
                     (a, b, c): X <- a X + (b A + c A A) X with A = X X^T)
        P <- P (1 - lr wd) - adjusted_lr(lr, adjust_lr_fn, P.shape) O

    Arguments as torch.optim.Muon (same names and defaults), plus:
    - ns_coefficients: one (a, b, c) triple used `ns_steps` times, or a list of triples, one per step
      (then `ns_steps` is ignored); e.g. `DSV4_NS_COEFFICIENTS`.
    - adjust_lr_fn: None / "original" (lr sqrt(max(1, rows/cols))), "match_rms_adamw"
      (lr 0.2 sqrt(max(rows, cols))), or a number f (lr f sqrt(max(rows, cols)); V4: 0.18).
    - 3-D parameters [E, rows, cols]: E matrices (MoE experts stacked), orthogonalised independently
      in one `newton_schulz` call; the lr adjustment uses (rows, cols).
    1-D and 4-D+ parameters are refused: give them to AdamW.

    Differences from torch.optim.Muon, all within bf16 rounding:
    - Newton-Schulz is `torch.ops.dsv4.newton_schulz` (so compile passes can swap in a kernel): it
      divides by ||U||_F + 1e-7 where torch divides by max(||U||_F, eps). The two differ by a relative
      1e-7 / ||U||_F, i.e. not at all in bf16, unless ||U||_F is below ~1e-5; a zero U gives a zero update
      in both. `eps` is therefore checked and kept in the param group (state dicts interchange with
      torch's) but the op's fixed 1e-7 is what is used.
    - Otherwise the op rounds where torch's addmm does (b A + c A A and a X + B X fused): on CPU the
      updates are bit-identical to torch.optim.Muon's; tests/model/test_muon.py allows 1e-2 relative
      RMS for other backends.
    - Checks are stricter and happen at construction (and in `add_param_group`): ns_steps in [1, 99],
      finite numbers, nesterov a bool; torch refuses ns_steps >= 100 only at the first step.
    State: `momentum_buffer` per parameter, as torch's, so a torch.optim.Muon state dict loads here.
    """

    def __init__(self, params, lr: float | Tensor = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=DEFAULT_NS_COEFFICIENTS, eps: float = DEFAULT_EPS,
                 ns_steps: int = DEFAULT_NS_STEPS, adjust_lr_fn: str | float | None = None) -> None:
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn)
        _check_group({**defaults, "params": []})
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, then the group's hyperparameters and parameter shapes are checked (ValueError)."""
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Muon step for every parameter that has a gradient; returns closure()'s loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Muon: sparse gradients are not supported")
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            self._step_group(params, grads, bufs, group)
        return loss

    def _step_group(self, params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                    group: Mapping[str, Any]) -> None:
        """`muon_step` of one group's parameters that have gradients, with the group's hyperparameters
        (dsv4_compile.Muon fuses CUDA ones into the Newton-Schulz kernels)."""
        lr = group["lr"]
        muon_step(params, grads, momentum_buffers, lr=float(lr) if isinstance(lr, Tensor) else lr,
                  weight_decay=group["weight_decay"], momentum=group["momentum"], nesterov=group["nesterov"],
                  ns_coefficients=group["ns_coefficients"], ns_steps=group["ns_steps"],
                  adjust_lr_fn=group["adjust_lr_fn"], newton_schulz=self._newton_schulz)

    def _newton_schulz(self, direction: Tensor, coefficients: list[float]) -> Tensor:
        """The Newton-Schulz of one update [..., rows, cols]: the plain op here (dsv4_compile.Muon
        routes CUDA updates to the Triton kernel)."""
        return torch.ops.dsv4.newton_schulz(direction, coefficients)


# ================================================================================================
# The DeepSeek-V4 recipe
# ================================================================================================

# Module names (a component of the parameter's dotted name) whose parameters go to AdamW.
EMBEDDING_AND_HEAD_MODULES = frozenset({"embed", "head", "embed_tokens", "tok_embeddings", "wte", "lm_head"})
# Parameter names (the last component) that are biases / gates, not weight matrices.
NON_MATRIX_PARAM_NAMES = frozenset({"bias", "ape", "attn_sink"})


def uses_muon(name: str, param: Tensor, module: nn.Module | None = None) -> bool:
    """True for the parameters the DeepSeek-V4 recipe gives to Muon, False for AdamW's.

    Muon: 2-D weight matrices (projections, the router `ffn.gate.weight`, shared experts) and 3-D
    stacked experts [E, out, in]. AdamW: everything that is not 2-D/3-D; and, whatever its shape,
    a parameter of an `nn.Embedding` (`module`, if given) or of a module named embed/head (the
    embedding and the output head), any name with a component containing "hc_" (mHC) or "norm"
    (RMSNorm weights), and a last component in bias / ape (the compressor's positional bias) /
    attn_sink.
    """
    if param.ndim not in (2, 3) or isinstance(module, nn.Embedding):
        return False
    *modules, leaf = name.split(".")
    if any(m in EMBEDDING_AND_HEAD_MODULES for m in modules):
        return False
    if any("hc_" in part or "norm" in part for part in (*modules, leaf)):
        return False
    return leaf not in NON_MATRIX_PARAM_NAMES


def split_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(Muon's, AdamW's) (name, parameter) pairs of `model`, each parameter exactly once (shared
    parameters under their first name, as `named_parameters` gives them), in model order."""
    owner = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)
    muon, adamw = [], []
    for name, p in model.named_parameters():
        (muon if uses_muon(name, p, owner.get(id(p))) else adamw).append((name, p))
    return muon, adamw


def muon_param_names(model: nn.Module) -> list[str]:
    """Names of the parameters the DeepSeek-V4 recipe gives to Muon (see `uses_muon`)."""
    return [name for name, _ in split_params(model)[0]]


class HybridOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameters, used as one.

    `param_groups` is the concatenation of the children's groups (the same dicts), so LR schedulers
    and code that edits `group["lr"]` reach the children; `step`, `zero_grad`, `state_dict` and
    `load_state_dict` go to every child. Per-parameter state lives in the children
    (`optimizers[name].state`); `add_param_group` is refused: add groups to a child.
    """

    def __init__(self, optimizers: Mapping[str, torch.optim.Optimizer]) -> None:
        if not optimizers or not all(isinstance(o, torch.optim.Optimizer) for o in optimizers.values()):
            raise ValueError(f"HybridOptimizer: optimizers={optimizers!r}; accepted: a non-empty mapping of name "
                             "to torch.optim.Optimizer")
        self.optimizers = dict(optimizers)
        self._building = True
        super().__init__(self._child_groups(), defaults={})
        self._building = False

    def _child_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not self._building:
            raise RuntimeError("HybridOptimizer.add_param_group: add the group to one of "
                               f"optimizers[{', '.join(map(repr, self.optimizers))}] instead")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Evaluate closure() once (if given), then step every child; returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.optimizers.values():
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"HybridOptimizer.load_state_dict: keys {sorted(state_dict)}; accepted: exactly "
                             f"{sorted(self.optimizers)}")
        for name, o in self.optimizers.items():
            o.load_state_dict(state_dict[name])
        # Optimizer.load_state_dict replaces the children's group dicts: share the new ones.
        self.param_groups = self._child_groups()

    def __repr__(self) -> str:
        return "HybridOptimizer(\n" + "".join(f"  {k}: {o!r}\n" for k, o in self.optimizers.items()) + ")"


def deepseek_v4_optimizer(model: nn.Module, lr: float, *, weight_decay: float = 0.1, momentum: float = 0.95,
                          adamw_lr: float | None = None, adamw_betas: tuple[float, float] = (0.9, 0.95),
                          adamw_eps: float = 1e-8, adamw_weight_decay: float = 0.1,
                          ns_coefficients=DSV4_NS_COEFFICIENTS,
                          adjust_lr_fn: str | float | None = DSV4_ADJUST_LR,
                          muon_class: type[Muon] = Muon) -> HybridOptimizer:
    """The DeepSeek-V4 optimizer for `model`: a `HybridOptimizer` with children "muon" and "adamw".

    Muon (Nesterov, `momentum`, `weight_decay`, the 10-step `DSV4_NS_COEFFICIENTS`, update RMS matched
    to AdamW by lr * 0.18 * sqrt(max(rows, cols))) for the parameters `uses_muon` picks: 2-D weight
    matrices and 3-D stacked experts. torch.optim.AdamW (`adamw_lr`, default `lr` since the updates'
    RMS match; `adamw_betas`, `adamw_eps`, `adamw_weight_decay`) for the rest: embeddings, output head,
    mHC parameters, norms, biases, the compressor's `ape`, attention sinks. Parameters with
    requires_grad=False are left out; a child with no parameters is left out. Groups are built from
    (name, parameter) pairs, so each group carries `param_names`. `muon_class`: Muon or a subclass
    (dsv4_compile.Muon runs the Triton Newton-Schulz on CUDA).
    """
    muon, adamw = ([(n, p) for n, p in part if p.requires_grad] for part in split_params(model))
    optimizers = {}
    if muon:
        optimizers["muon"] = muon_class(muon, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=True,
                                  ns_coefficients=ns_coefficients, adjust_lr_fn=adjust_lr_fn)
    if adamw:
        optimizers["adamw"] = torch.optim.AdamW(adamw, lr=lr if adamw_lr is None else adamw_lr, betas=adamw_betas,
                                                eps=adamw_eps, weight_decay=adamw_weight_decay)
    if not optimizers:
        raise ValueError("deepseek_v4_optimizer: the model has no parameters with requires_grad=True")
    return HybridOptimizer(optimizers)
