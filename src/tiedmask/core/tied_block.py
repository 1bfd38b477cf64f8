"""The parts of a tied run of blocks that live in the model (made by `tiedmask.core.tie`).

`TiedBlocks` replaces the run; its `Application` items call the one shared block with an
application index set (`ApplicationIndex`). The shared block's parameters are read through
`torch.nn.utils.parametrize` parametrizations that look at that index: `SharedWeight` (the
weight under the application's mask, plus its relaxation) and `PerApplication` (one stacked
value per application); norms are kept per application whole (`PerApplicationModule`).
`tie_summary` counts a tied model's parameters by role.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..errors import TiedmaskError
from .lora import MaskedFactor
from .masks import MaskBank, mask_index


class ApplicationIndex:
    """Which application of the shared block is running; read by its parametrizations."""

    def __init__(self):
        self.index: int | None = None

    def current(self) -> int:
        if self.index is None:
            raise TiedmaskError("a tied block's weights were read outside an application; call "
                                "the tied container (or one of its items), not the shared block")
        return self.index

    @contextlib.contextmanager
    def applying(self, index: int):
        previous, self.index = self.index, index
        try:
            yield
        finally:
            self.index = previous


class SharedWeight(nn.Module):
    """Parametrization: the shared weight under application i's mask, plus i's relaxation."""

    def __init__(self, state: ApplicationIndex, scope: str, mask_bank: MaskBank | None,
                 relaxation: nn.Module | None):
        super().__init__()
        self.state, self.scope, self.mask_bank, self.relaxation = state, scope, mask_bank, relaxation

    def density(self) -> float:
        """The kept share of the weight in the running application."""
        which = mask_index(self.scope, self.state.current())
        return 1.0 if self.mask_bank is None or which is None else self.mask_bank.density(which)

    def masked(self, shared: torch.Tensor, i: int) -> torch.Tensor:
        """The shared weight under application i's mask (no relaxation)."""
        which = mask_index(self.scope, i)
        return shared if self.mask_bank is None or which is None else self.mask_bank.apply(shared, which)

    def forward(self, shared: torch.Tensor) -> torch.Tensor:
        if self.state.index is None:  # read outside any position: its shape, dtype and device
            return shared.detach().as_subclass(OutsidePosition)  # (peft wrapping the layer), no values
        i = self.state.index
        weight = self.masked(shared, i)
        if self.relaxation is not None:
            weight = weight + self.relaxation.delta(i).view_as(weight).to(weight.dtype)
        return weight


class OutsidePosition(torch.Tensor):
    """A tied weight read outside any position: its shape, dtype and device can be read (peft
    reads them to wrap a tied layer), but any computation with it raises. A position's weight
    is `layers[i]....weight`; the stored shared tensor is the parametrization's `original`."""

    METADATA = {"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_meta", "layout",
                "is_sparse", "is_quantized", "is_leaf", "grad_fn"}
    METHODS = {"size", "dim", "numel", "is_floating_point", "is_complex", "element_size", "__len__"}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        attribute = getattr(getattr(func, "__self__", None), "__name__", None) if name == "__get__" else None
        if attribute in cls.METADATA or name in cls.METHODS:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        raise TiedmaskError(
            f"a tied weight was used outside any position ({attribute or name}): call the tied container or "
            "one of its items (layers[i]), read layers[i]....weight for position i's weight, or untie() first "
            "(to merge adapters, export or edit weights)")


def shared_weight(module: nn.Module) -> SharedWeight | None:
    """The `SharedWeight` parametrization of `module.weight`, if `tie` put one there."""
    chains = getattr(module, "parametrizations", {})
    chain = chains["weight"] if "weight" in chains else []
    return next((p for p in chain if isinstance(p, SharedWeight)), None)


class PerApplication(nn.Module):
    """Parametrization: one value per application, stacked on a leading axis."""

    def __init__(self, state: ApplicationIndex, count: int):
        super().__init__()
        self.state, self.count = state, count

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        return stacked[self.state.current()]

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value.unsqueeze(0).repeat(self.count, *([1] * value.dim()))


class PerApplicationModule(nn.Module):
    """A module (a norm layer, with its running statistics) kept once per application."""

    def __init__(self, state: ApplicationIndex, copies: list[nn.Module]):
        super().__init__()
        self.state = state
        self.copies = nn.ModuleList(copies)

    def forward(self, *args, **kwargs):
        return self.copies[self.state.current()](*args, **kwargs)

    def __getattr__(self, name: str):  # e.g. `norm.eps` read by the surrounding code
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):  # copy/pickle protocols look these up: never lend them
                raise
            return getattr(self.copies[self.state.index or 0], name)  # the running position's


class LoRARelaxation(nn.Module):
    """A low-rank update of its own for every application: delta_i = B_i @ A_i."""

    def __init__(self, count: int, rows: int, cols: int, rank: int):
        super().__init__()
        self.A = nn.Parameter(torch.empty(count, rank, cols))
        self.B = nn.Parameter(torch.zeros(count, rows, rank))  # B = 0: starts as the tied block
        for a in self.A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def delta(self, i: int) -> torch.Tensor:
        return self.B[i] @ self.A[i]

    @torch.no_grad()
    def fit(self, residuals: list[torch.Tensor]) -> None:
        """Start each update at the best rank-r approximation of what tying lost (its SVD)."""
        rank = self.A.shape[1]
        for i, residual in enumerate(residuals):
            u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
            root = s[:rank].sqrt()
            self.B[i].zero_()[:, : len(root)] = (u[:, :rank] * root).to(self.B.dtype)
            self.A[i].zero_()[: len(root)] = (root[:, None] * vh[:rank]).to(self.A.dtype)


class MultiMaskLoRARelaxation(nn.Module):
    """One low-rank pair shared by every application, under a distinct mask per application:
    delta_i = (B * M_B^i) @ (A * M_A^i), the parameters of one LoRA (CapaBoost)."""

    def __init__(self, count: int, rows: int, cols: int, rank: int, kind: str, density: float,
                 seed: int, name: str):
        super().__init__()
        self.A = MaskedFactor((rank, cols), 0, count, kind, density, seed, f"{name}.relax_A")
        self.B = MaskedFactor((rows, rank), 1, count, kind, density, seed, f"{name}.relax_B")
        nn.init.kaiming_uniform_(self.A.shared, a=math.sqrt(5))  # B = 0: starts as the tied block

    def delta(self, i: int) -> torch.Tensor:
        return self.B.masked(i) @ self.A.masked(i)


class Application(nn.Module):
    """Position p of a tied run: calls its shared block as application `index` of that block,
    with block p's positional attributes (the `layer_idx` that picks a KV-cache slot) in place.

    It owns nothing (the shared block is registered once, in `TiedBlocks`). Reading through it
    sees position p: ``layers[2].self_attn.q_proj.weight`` is position 2's masked, relaxed weight.
    """

    def __init__(self, owner: "TiedBlocks", block: int, index: int, positional: dict):
        super().__init__()
        object.__setattr__(self, "owner", owner)
        self.block, self.index = block, index
        object.__setattr__(self, "positional", positional)  # {(module path, attribute): value}

    def shared_block(self) -> nn.Module:
        return self.owner.loop_blocks()[self.block]

    @contextlib.contextmanager
    def entered(self):
        """While inside: the shared block reads this position's weights, norms and indices."""
        block = self.shared_block()
        saved = []
        for (path, attr), value in self.positional.items():
            module = block.get_submodule(path)
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)
        try:
            with self.owner.states[self.block].applying(self.index), contextlib.ExitStack() as stack:
                if block.training and torch.is_grad_enabled():  # only then can a layer checkpoint itself
                    for module in block.modules():  # each such layer's replay re-enters this position
                        stack.enter_context(_checkpointing_in(module, self))
                yield block
        finally:
            for module, attr, value in reversed(saved):
                setattr(module, attr, value)

    def forward(self, *args, **kwargs):
        with self.entered() as block:
            return block(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in ("owner", "positional"):  # copy/pickle protocols
                raise
            return AtPosition(self, self.shared_block()).__getattr__(name)


class AtPosition:
    """A shared (sub)module as one position sees it: attributes are read, and calls made, with
    that position entered. Lent by `Application` so that code reading ``layers[i].attn.weight``
    or ``layers[i].attn.layer_idx`` outside a forward pass gets position i's value."""

    def __init__(self, application: Application, module: nn.Module):
        object.__setattr__(self, "_application", application)
        object.__setattr__(self, "_module", module)

    def __getattr__(self, name: str):
        with self._application.entered():
            value = getattr(self._module, name)
        return AtPosition(self._application, value) if isinstance(value, nn.Module) else value

    def __call__(self, *args, **kwargs):
        with self._application.entered():
            return self._module(*args, **kwargs)

    def __setattr__(self, name: str, value) -> None:  # a write here would land nowhere
        raise TiedmaskError(f"layers[i].{name} is a read-only view of the shared block as one position sees "
                            "it; set it on the tied container's `shared` block (all positions), or untie() first")

    def __repr__(self) -> str:
        return f"AtPosition({self._application.index}, {self._module!r})"


@contextlib.contextmanager
def _checkpointing_in(block: nn.Module, application: "Application"):
    """Gradient checkpointing that runs inside the block (Hugging Face's layers call
    `_gradient_checkpointing_func(forward, ...)` and replay `forward` in the backward pass,
    after the application has been left): the replay re-enters the application."""
    func = block.__dict__.get("_gradient_checkpointing_func")
    if func is None or hasattr(func, "tiedmask_original"):
        yield
        return

    def replayed(forward, *args, **kwargs):
        def run(*inner, **inner_kwargs):
            if application.owner.states[application.block].index == application.index:
                return forward(*inner, **inner_kwargs)  # the first pass: already entered
            with application.entered():
                return forward(*inner, **inner_kwargs)
        return func(run, *args, **kwargs)

    replayed.tiedmask_original = func
    block._gradient_checkpointing_func = replayed
    try:
        yield
    finally:
        block._gradient_checkpointing_func = func


class TiedBlocks(nn.Module):
    """What replaces the run of blocks: untouched blocks `before`, the tied positions, untouched
    blocks `after`. The tied positions loop `group` shared blocks: with one, `shared` is that
    block; with several, `shared` is their ModuleList and `strategy` orders them (cycle: 0 1 2
    0 1 2; sequence: 0 0 1 1 2 2). Iterate it like the ModuleList it replaces, or call it like
    the Sequential."""

    def __init__(self, shared: list[nn.Module], states: list[ApplicationIndex], positions: list[tuple[int, int]],
                 positional: list[dict], before: list[nn.Module], after: list[nn.Module], settings: dict):
        super().__init__()
        self.shared = shared[0] if len(shared) == 1 else nn.ModuleList(shared)
        self.before, self.after = nn.ModuleList(before), nn.ModuleList(after)
        self.states, self.settings = states, settings
        # a list: not registered, so each shared block is stored once
        self.applications = [Application(self, b, i, pos) for (b, i), pos in zip(positions, positional)]
        for block, state in zip(shared, states):  # the shared block called alone has no position
            block._tiedmask_state = state  # an attribute, not a closure: deepcopy keeps it paired
            block.register_forward_pre_hook(_require_position)

    @property
    def state(self) -> ApplicationIndex:  # one shared block: its index (as before groups)
        return self.states[0]

    def loop_blocks(self) -> list[nn.Module]:
        return [self.shared] if len(self.states) == 1 else list(self.shared)

    def _items(self) -> list[nn.Module]:
        return [*self.before, *self.applications, *self.after]

    def __iter__(self):
        return iter(self._items())

    def __len__(self) -> int:
        return len(self.before) + len(self.applications) + len(self.after)

    def __getitem__(self, index):
        items = self._items()
        return nn.ModuleList(items[index]) if isinstance(index, slice) else items[index]

    def forward(self, x):
        for block in self:
            x = block(x)
        return x


def _require_position(block: nn.Module, args) -> None:
    block._tiedmask_state.current()  # raises outside an application


def tied_containers(model: nn.Module) -> list[tuple[str, TiedBlocks]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TiedBlocks)]


def tie_summary(model: nn.Module) -> dict:
    """Parameter counts of a tied model: now, before tying, and per tied run of blocks."""
    total = sum(p.numel() for p in model.parameters())
    runs, saved = [], 0
    for name, tied in tied_containers(model):
        parts = _parameter_parts(tied.shared)
        count = {part: sum(p.numel() for p in params) for part, params in parts.items()}
        before = tied.settings["parameters_before"]
        saved += before - sum(count.values())
        shared_ids = {id(p) for p in parts["shared"]}
        unmasked = [n for n, p in tied.shared.named_parameters()
                    if p.dim() >= 2 and id(p) in shared_ids and "lora_" not in n and ".parametrizations." not in n]
        loop = {"group": len(tied.states), "strategy": tied.settings["tie"].get("strategy", "cycle"),
                "loop": [a.block for a in tied.applications]} if len(tied.states) > 1 else {}
        runs.append({"blocks": name, "applications": len(tied.applications), **loop, **count, "parameters_before": before,
                     "masks": tied.settings["masks"]["scope"], "density": tied.settings["masks"]["density"],
                     "masked_weights": sum(isinstance(step, SharedWeight) for m in tied.shared.modules()
                                           for chain in getattr(m, "parametrizations", {}).values() for step in chain),
                     "unmasked_weights": unmasked})
    return {"parameters": total, "parameters_before": total + saved, "runs": runs}


def _parameter_parts(shared: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The shared block's parameters by role: shared, per_application, relaxation."""
    role: dict[int, str] = {}
    for module in shared.modules():
        if isinstance(module, PerApplicationModule):
            role.update((id(p), "per_application") for p in module.parameters())
        for attr, chain in getattr(module, "parametrizations", {}).items():
            for step in chain:
                if isinstance(step, PerApplication):
                    role[id(chain.original)] = "per_application"
                elif isinstance(step, SharedWeight) and step.relaxation is not None:
                    role.update((id(p), "relaxation") for p in step.relaxation.parameters())
    parts = {"shared": [], "per_application": [], "relaxation": []}
    for p in shared.parameters():
        parts[role.get(id(p), "shared")].append(p)
    return parts
