"""Probe routing: how memory-based editors (IKE, SERAC) change what a probe feeds, not the weights.

A weight edit changes the network, so the evaluator can score the edited
model as it is. IKE and SERAC change no weight: IKE puts the new fact (and
demonstrations) in front of the prompt, SERAC sends in-scope prompts to a
counterfactual model. Both are expressed here as one capability, so the one
shared evaluator scores them through the same metrics:

* a :class:`ProbeRouter` maps a batch of probe prompts to one :class:`Route`
  each: the text actually fed (before ``" " + answer``) and the network that
  scores it (``None``: the base model itself);
* a model carries at most one router, in a weak per-model registry
  (:func:`attach_router`, :func:`detach_router`, :func:`router_of`); the
  method's edit handle attaches it and its restore detaches it;
* the evaluator (:meth:`lmedit.evaluation.Evaluator.run_probes`) and the CLI's
  greedy answers (:func:`generate_routed`) route every prompt of a call in one
  ``route`` call, group the probes by route model and score each group in
  batches exactly as an unrouted model is scored.

A router must never change its own state while routing (evaluation is side
effect free); only the method's ``apply`` and the handles' ``restore`` do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

from torch import nn

from lmedit.forward import generate_greedy
from lmedit import model_state
__all__ = [
    "Route",
    "RouteGroup",
    "ProbeRouter",
    "RoutingError",
    "attach_router",
    "detach_router",
    "router_of",
    "router_kind",
    "route_prompts",
    "generate_routed",
]


class RoutingError(ValueError):
    """A router was attached, detached or answered wrongly; the message says what to do instead."""


@dataclass(frozen=True)
class Route:
    """Where one probe prompt goes.

    ``prompt`` is the text fed in place of the probe's prompt (teacher forcing
    scores ``prompt + " " + answer`` with the answer span sliced as usual;
    generation continues ``prompt``). ``model`` is the network that scores it;
    ``None`` means the base model the router is attached to. ``name`` labels
    the route for logs and displays (e.g. ``"base"``, ``"ike"``, ``"counterfactual"``).
    """

    prompt: str
    model: nn.Module | None = None
    name: str = "base"


@runtime_checkable
class ProbeRouter(Protocol):
    """Maps probe prompts to routes, all at once (a router may classify the whole batch in one pass).

    ``route`` must return exactly one :class:`Route` per prompt, in order, and
    must not change the router's state.
    """

    def route(self, model: nn.Module, tok: Any, prompts: Sequence[str]) -> list[Route]: ...


@dataclass(frozen=True)
class RouteGroup:
    """The probes of one call that go to the same network: their positions and their routed prompts."""

    model: nn.Module
    indices: tuple[int, ...]
    prompts: tuple[str, ...]
    names: tuple[str, ...]


# --------------------------------------------------------------------------- the per-model registry

_OWNER = "router"  # this module's slot in lmedit.model_state


def router_kind(router: Any) -> str:
    """A router's kind: its ``kind`` attribute when it has one, else its class name."""
    return str(getattr(router, "kind", "") or type(router).__name__)


def router_of(model: nn.Module) -> ProbeRouter | None:
    """The router attached to ``model``, or None when the model answers probes itself."""
    return model_state.slot(model, _OWNER)


def attach_router(model: nn.Module, router: ProbeRouter) -> None:
    """Make ``router`` decide what ``model``'s probes feed. Attaching the same router again does nothing.

    A model holds at most one router: a second one is refused, because the
    handles of the first would no longer describe what the model does. A
    method that edits sequentially finds its router with :func:`router_of`
    and adds to it instead.
    """
    if not isinstance(router, ProbeRouter):
        raise RoutingError(f"{type(router).__name__} is not a probe router: it needs route(model, tok, prompts)")
    current = model_state.slot(model, _OWNER)
    if current is router:
        return
    if current is not None:
        if router_kind(current) == router_kind(router):
            raise RoutingError(
                f"the model already carries a {router_kind(current)} router; add the new edits to it "
                "(lmedit.routing.router_of(model)) instead of attaching a second one"
            )
        raise RoutingError(
            f"the model already carries a {router_kind(current)} router, so a {router_kind(router)} router "
            f"cannot be attached; restore the {router_kind(current)} edits first (a model holds one router)"
        )
    model_state.put(model, _OWNER, router)


def detach_router(model: nn.Module, router: ProbeRouter) -> None:
    """Remove ``router`` from ``model`` (nothing to do when no router is attached)."""
    current = model_state.slot(model, _OWNER)
    if current is None:
        return
    if current is not router:
        raise RoutingError(
            f"the model carries a different {router_kind(current)} router than the one being detached; "
            "restore edits with the handles that made them"
        )
    model_state.drop(model, _OWNER)


# --------------------------------------------------------------------------- routing a batch


def route_prompts(model: nn.Module, tok: Any, prompts: Sequence[str]) -> list[RouteGroup] | None:
    """Route ``prompts`` in one call and group them by the network that scores them.

    Returns None when ``model`` has no router (score it as it is). Groups
    come in the order their network first appears; within a group the
    prompts keep their original order.
    """
    router = router_of(model)
    if router is None:
        return None
    prompts = list(prompts)
    routes = router.route(model, tok, prompts) if prompts else []
    if len(routes) != len(prompts):
        raise RoutingError(
            f"the {router_kind(router)} router returned {len(routes)} routes for {len(prompts)} prompts; "
            "route must return exactly one Route per prompt"
        )
    groups: dict[int, tuple[nn.Module, list[int], list[str], list[str]]] = {}
    for index, route in enumerate(routes):
        if not isinstance(route, Route) or not isinstance(route.prompt, str):
            raise RoutingError(f"the {router_kind(router)} router returned {route!r} for prompt {index}; expected a Route")
        target = model if route.model is None else route.model
        entry = groups.setdefault(id(target), (target, [], [], []))
        entry[1].append(index)
        entry[2].append(route.prompt)
        entry[3].append(route.name)
    return [RouteGroup(target, tuple(i), tuple(p), tuple(n)) for target, i, p, n in groups.values()]


def generate_routed(
    model: nn.Module,
    tok: Any,
    prompts: Sequence[str],
    max_new_tokens: Sequence[int],
    *,
    batch_size: int = 32,
    progress: Any = None,
    **decoding: Any,
) -> list[tuple[int, ...]]:
    """:func:`lmedit.forward.generate_greedy` on what ``model`` would really be fed.

    Without a router this is ``generate_greedy`` itself; with one, each prompt
    is continued from its routed prompt by its route's network. ``decoding``
    (``use_cache``, ``stop``) goes to ``generate_greedy`` as it is.
    """
    groups = route_prompts(model, tok, prompts)
    if groups is None:
        return generate_greedy(model, tok, prompts, max_new_tokens, batch_size=batch_size, progress=progress, **decoding)
    outputs: list[tuple[int, ...]] = [()] * len(prompts)
    for group in groups:
        lengths = [max_new_tokens[i] for i in group.indices]
        generated = generate_greedy(group.model, tok, group.prompts, lengths, batch_size=batch_size, progress=progress,
                                    **decoding)
        for index, tokens in zip(group.indices, generated):
            outputs[index] = tokens
    return outputs
