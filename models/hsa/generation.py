"""`generate` with semantic roles.

`model.generate` refuses keyword arguments that the model's forward does not name, and
`semantic_ids` travels through `**kwargs`. So the roles ride in a context variable for the duration
of one `generate` call (per thread: several threads may generate with different roles), and a
forward pre-hook on the model adds them to each forward call of that generation."""
from __future__ import annotations

import contextvars

import torch

_ACTIVE = contextvars.ContextVar("hsa_generation", default=None)
_HOOKED_ATTR = "_hsa_generation_hook"


def _add_roles(module, args, kwargs):
    active = _ACTIVE.get()
    if active is None or kwargs.get("semantic_ids") is not None:
        return None
    roles, generation_role = active
    ids = kwargs.get("input_ids")
    batch = (ids if ids is not None else kwargs["inputs_embeds"]).shape[0]
    if roles.shape[0] != batch:  # beam search / num_return_sequences expand each row in place
        roles = roles.repeat_interleave(batch // roles.shape[0], dim=0)
    kwargs = dict(kwargs, semantic_ids=roles)
    if generation_role is not None:
        kwargs["hsa_generation_role"] = generation_role
    return args, kwargs


def _transformers_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def generate(model, *, semantic_ids: torch.Tensor | None = None, generation_role=None, **generate_kwargs):
    """`model.generate(**generate_kwargs)` where every forward pass sees `semantic_ids` (the roles of
    the prompt; generated tokens take the generation role)."""
    if semantic_ids is None:
        return model.generate(**generate_kwargs)
    target = _transformers_model(model)
    if not getattr(target, _HOOKED_ATTR, False):
        target.register_forward_pre_hook(_add_roles, with_kwargs=True)
        setattr(target, _HOOKED_ATTR, True)
    token = _ACTIVE.set((semantic_ids, generation_role))
    try:
        return model.generate(**generate_kwargs)
    finally:
        _ACTIVE.reset(token)
