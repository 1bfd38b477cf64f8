"""Whether a run's training steps run compiled: `compile: false | true | auto`.

    false  eager steps (the default)
    true   torch.compile the forward pass; compilation runs inside the run's clock
    auto   a trial inside the run: its first steps run eager and compiled, alternating and
           timed, and it keeps the faster (compiled only from MIN_GAIN)

Why a trial of the run's own steps and not a rule: on one AMX CPU compiling made the recipe's
bf16 step 0.89x as fast and a GroupNorm ResNet's 1.49x (docs/results.md §9), and no property of
the model that we know of tells which. Why inside training, not before it like the precision
check: compiling costs 20-75 s there, and the trial's steps are training steps, so a trial that
keeps eager costs one compilation and nothing else. That cost is why `auto` is not the default:
the recipe would pay ~30 s of a 15-minute budget for no gain.

The choice and why are kept in the run's state (checkpoint, result): a resumed run compiles, or
does not, as decided, without a second trial.
"""

from __future__ import annotations

import statistics
import warnings
from typing import Callable

import torch
from torch import nn

from ..errors import TiedmaskError
from .distributed import Dist
from .rundir import RunState

MIN_GAIN = 1.05  # a compiled step must beat eager by this much to be kept (it can also recompile)
TIMED_PAIRS = 6  # eager and compiled steps timed, alternating, after the warm-up steps
# The trial's first steps, not timed: one eager (allocations), two compiled (the compilation,
# and the first run of the compiled graph).
OPENING = ("eager", "compiled", "compiled")


class CompileChoice:
    """The forward pass each training step runs (`runner()`), eager or compiled, and under
    `auto` the trial that picks one (`record(seconds)` after every step, its time until the
    loss is known). `state.compile_choice` holds the outcome: "eager" or "compiled" ("" while
    a trial runs)."""

    def __init__(self, eager: nn.Module, mode: str, state: RunState, ctx: Dist = Dist(),
                 log: Callable[[str], None] = lambda line: None, compiler: Callable | None = None):
        self.eager, self.mode, self.state, self.ctx, self.log = eager, mode, state, ctx, log
        self.compiled = None
        self._last = ""  # what the last step ran: eager | compiled
        self._compiled_steps = 0  # compiled steps that finished
        self._compiler = compiler or torch.compile  # looked up now: a test may stand in for it
        self._trial: list[str] = []  # the runner of each trial step so far
        self._times: dict[str, list[float]] = {"eager": [], "compiled": []}
        self._compile_s = 0.0
        if mode != "auto":
            state.compile_choice, state.compile_why = ("compiled" if mode == "true" else "eager"), "set"
        elif not state.compile_why.startswith("auto"):  # a resumed run keeps what its trial decided
            state.compile_choice, state.compile_why = "", ""  # a trial runs

    @property
    def deciding(self) -> bool:
        return not self.state.compile_choice

    def runner(self) -> nn.Module:
        """What the next training step runs."""
        if self.deciding:
            self._last = self._next_in_trial()
            self._trial.append(self._last)
        else:
            self._last = self.state.compile_choice
        if self._last == "compiled" and self.compiled is None:  # here, so a failure is a step's (`failed`)
            self.compiled = self._compiler(self.eager)
        return self.compiled if self._last == "compiled" else self.eager

    def _next_in_trial(self) -> str:
        done = len(self._trial)
        if done < len(OPENING):
            return OPENING[done]
        return ("eager", "compiled")[(done - len(OPENING)) % 2]

    def record(self, seconds: float) -> None:
        """The step `runner()` last gave took `seconds`; decides once the trial has its steps."""
        self._compiled_steps += self._last == "compiled"
        if not self.deciding or not self._trial:
            return
        step = len(self._trial) - 1
        if step == 1:  # the compiling step
            self._compile_s = seconds
        if step >= len(OPENING):
            self._times[self._trial[-1]].append(seconds)
        if len(self._times["compiled"]) == TIMED_PAIRS:
            self._decide()

    def failed(self, exc: Exception) -> bool:
        """A step raised `exc`. Under `auto`, a compiled step that fails in the trial, or before
        any compiled step ran in this process (a resumed run), makes the run train eager from
        here (True: run the step again). Under `true`, the first compiled step failing (no C++
        compiler, an operation the compiler does not support) is one error line. Anything else
        is the caller's to raise (False)."""
        if self._last != "compiled":
            return False
        what = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
        if self.mode == "true" and self._compiled_steps == 0:
            raise TiedmaskError(f"the compiled training step failed ({what}); train eager with --compile "
                                "false, or let --compile auto fall back to eager steps") from exc
        if self.mode != "auto" or not (self.deciding or self._compiled_steps == 0):
            return False
        warnings.warn(f"compile auto: the compiled step failed ({what}); training eager", stacklevel=2)
        self._settle("eager", f"auto: the compiled step failed ({type(exc).__name__})")
        return True

    def end(self) -> None:
        """Training stopped: a trial still open is said in the record (its steps ran both ways)."""
        if self.deciding and self._trial:
            self.state.compile_why = f"auto: the run ended during the trial ({len(self._trial)} steps, both ways)"

    def _decide(self) -> None:
        eager, compiled = (statistics.median(self._times[k]) for k in ("eager", "compiled"))
        # Rank 0's measurement on every process: the timed steps could tip differently on each.
        gain = self.ctx.from_main(eager / compiled)
        chosen = "compiled" if gain >= MIN_GAIN else "eager"
        compile_s = max(0.0, self._compile_s - eager)
        self._settle(chosen, f"auto: a compiled step ran {gain:.2f}x as fast as eager (kept from "
                             f"{MIN_GAIN}x); compiling took {compile_s:.0f} s")

    def _settle(self, chosen: str, why: str) -> None:
        self.state.compile_choice, self.state.compile_why = chosen, why
        if chosen == "eager":
            self.compiled = None  # its graphs and buffers are not needed again
        self.log(f"training steps run {chosen} ({why})")
