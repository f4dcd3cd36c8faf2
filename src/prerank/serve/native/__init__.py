"""An optional serving backend: IntTower's and RankTower's whole request (user fields, user tower, and the scorer
over the cached item rows) as one call of a hand-written C kernel, compiled on this machine.

On one thread at 1,000 candidates the fused request measured 4.5x faster than the best standard runtime for
IntTower and 7.7x for RankTower; for the other models onnxruntime is as fast or faster, so they have no kernel here.
The models never import this package: it reads their modules and parameters from outside
(:mod:`prerank.serve.native.request`).

:func:`open_native` gives a :class:`NativeRuntime` (an :class:`~prerank.serve.runtime.EagerRuntime` whose
``request`` is the fused call) or None, with a warning naming the reason, where there is none: a model without a
kernel, a configuration the kernels do not compute, ``PRERANK_NATIVE=0``, no C compiler, a kernel directory that is
not private, or a failed compile (:mod:`prerank.serve.native.build`).
"""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor

from torch import Tensor

from prerank.models.base import PreRanker
from prerank.serve.graphs import Signature
from prerank.serve.native.build import NativeUnavailable, enabled, secure_dir, status
from prerank.serve.native.build import compiler as _compiler
from prerank.serve.native.request import BoundRequest, ModelPlan, int_tower_plan, rank_tower_plan
from prerank.serve.runtime import EagerRuntime

__all__ = ["NativeRuntime", "open_native", "read_plan", "status"]

_warned: set[str] = set()


def _warn_once(reason: str) -> None:
    """Warn, once per process and reason, that serving runs in PyTorch."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"prerank: no native runtime ({reason}); serving in PyTorch", RuntimeWarning, stacklevel=3)


def read_plan(model: PreRanker, signature: Signature) -> ModelPlan | None:
    """The native request's reading of ``model`` (IntTower or RankTower, in eval mode), or None where its
    configuration has no native form."""
    from prerank.models.int_tower import IntTower
    from prerank.models.rank_tower import RankTower

    if isinstance(model, IntTower):
        return int_tower_plan(model, signature.user_features)
    if isinstance(model, RankTower):
        return rank_tower_plan(model, signature.user_features)
    return None


def _unavailable(model: PreRanker, signature: Signature) -> tuple[str | None, ModelPlan | None]:
    """``(None, plan)``, or ``(why not, None)``."""
    from prerank.models.int_tower import IntTower
    from prerank.models.rank_tower import RankTower

    name = type(model).__name__
    if not isinstance(model, IntTower | RankTower):
        return f"{name} has no native kernel; IntTower and RankTower have", None
    if not enabled():
        return "PRERANK_NATIVE=0", None
    if _compiler() is None:
        return status()[len("off (") : -1], None
    try:
        secure_dir()
    except NativeUnavailable as e:
        return str(e), None
    plan = read_plan(model.eval(), signature)
    if plan is None:
        return f"this {name} configuration has no native form", None
    return None, plan


def open_native(model: PreRanker, signature: Signature, threads: int = 1) -> NativeRuntime | None:
    """The native runtime of ``model`` (signature: :func:`prerank.serve.graphs.signature`), its kernel compiled for
    a float32 cache of the configured shape; None, with a one-time warning naming the reason, where it has none. Puts
    ``model`` in eval mode. ``threads`` > 1 splits large requests over that many concurrent kernel calls."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    reason, plan = _unavailable(model, signature)
    if plan is None:
        _warn_once(reason or "unknown")
        return None
    try:
        plan.warm()
    except NativeUnavailable as e:
        _warn_once(str(e))
        return None
    return NativeRuntime(model, signature, plan, threads=threads)


class NativeRuntime(EagerRuntime):
    """:class:`~prerank.serve.runtime.EagerRuntime` whose :meth:`request` is one fused native call; ``user``,
    ``item`` and ``score`` (and any request the kernel cannot take) run the model in PyTorch.

    The kernel is bound to an item cache on the first request that passes it and re-used while the same cache
    dict, holding the same tensors, is passed (binding a bfloat16 cache compiles its own kernel, once per machine).
    It serves the parameters as they were when opened (see :mod:`prerank.serve.native.request`). Built by
    :func:`open_native`, which checks that a kernel can be had.
    """

    name = "native"

    def __init__(self, model: PreRanker, signature: Signature, plan: ModelPlan, *, threads: int = 1):
        super().__init__(model, signature)
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.plan, self.threads = plan, threads
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="prerank-native") if threads > 1 else None
        # (cache dict, its tensors the kernel reads, the request bound to them or None): held, so the ids stay unique
        self._bound: tuple[dict[str, Tensor], tuple[object, ...], BoundRequest | None] | None = None

    def bind(self, cache: dict[str, Tensor]) -> BoundRequest | None:
        """The request bound to ``cache`` (built on first use, then kept while the same dict and tensors are
        passed), or None where the cache is not of the kernel's form or the kernel for it cannot be had."""
        tensors = tuple(cache.get(k) for k in self.plan.item_keys)
        held = self._bound
        if held is not None and held[0] is cache and all(a is b for a, b in zip(held[1], tensors, strict=True)):
            return held[2]
        try:
            bound = self.plan.bind(cache)
        except NativeUnavailable as e:
            _warn_once(str(e))
            bound = None
        self._bound = (cache, tensors, bound)
        return bound

    def request(self, user: list[Tensor], cache: dict[str, Tensor], rows: Tensor, cross: list[Tensor]) -> Tensor:
        """Logits ``[N]`` of item-cache ``rows`` for one user's features, in one native call; the eager path where
        the kernel cannot take the inputs. An id outside its table or a row outside the cache raises IndexError."""
        bound = self.bind(cache)
        out = bound(user, rows, self._pool, self.threads) if bound is not None else None
        return out if out is not None else super().request(user, cache, rows, cross)
