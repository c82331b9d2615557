"""Semantic roles of tokens, and the one rule HSA adds on top of causal attention."""
from __future__ import annotations

import numbers

GLOBAL, LANDMARK, NOISE = 0, 1, 2
ROLES = (GLOBAL, LANDMARK, NOISE)
ROLE_NAMES = {GLOBAL: "global", LANDMARK: "landmark", NOISE: "noise"}
# The names ShareGPT-style HSA data uses in a turn's `semantic_type`.
SHAREGPT_NAMES = {GLOBAL: "GLOBAL_CONDITION", LANDMARK: "LANDMARK", NOISE: "NOISE"}

_BY_NAME = {
    **{name: role for role, name in ROLE_NAMES.items()},
    **{name: role for role, name in SHAREGPT_NAMES.items()},
    "GLOBAL": GLOBAL,
}


def parse_role(value) -> int:
    """The role id for 0/1/2, 'GLOBAL_CONDITION'/'LANDMARK'/'NOISE' or 'global'/'landmark'/'noise'.

    Anything else raises ValueError naming the bad value.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        if int(value) in ROLES:
            return int(value)
    elif isinstance(value, str) and value in _BY_NAME:
        return _BY_NAME[value]
    raise ValueError(
        f"unknown semantic role {value!r}: expected one of 0/1/2, "
        "GLOBAL_CONDITION/LANDMARK/NOISE or global/landmark/noise"
    )


def sharegpt_name(role) -> str:
    return SHAREGPT_NAMES[parse_role(role)]


def role_name(role) -> str:
    return ROLE_NAMES[parse_role(role)]


def query_may_see_key(query_role: int, key_role: int) -> bool:
    """The HSA rule for one pair, causality aside: GLOBAL/LANDMARK queries never see NOISE keys."""
    return not (query_role != NOISE and key_role == NOISE)
