"""The CA holder's check of a joiner's secret against the invites it issued (pure)."""

from __future__ import annotations

import hmac
from collections.abc import Mapping

from exod.cluster.invite import secret_digest
from exod.errors import ExoError
from exod.eventlog.fold import InviteView

_NEW = "ask a member for a new one with `exoctl cluster invite`"


def admit(invites: Mapping[str, InviteView], secret: bytes, now: float) -> InviteView:
    """The invite behind `secret`, when it is unused and unexpired; ExoError("invite_refused")
    saying which of those it is not. Every digest is compared in constant time, so the time
    taken tells nothing about how close a guess came."""
    digest = secret_digest(secret)
    found = None
    for invite in invites.values():
        if hmac.compare_digest(invite.digest, digest):
            found = invite
    if found is None:
        raise ExoError(
            "invite_refused",
            f"the invite was not issued by this cluster's CA node, or expired long ago: {_NEW}",
        )
    if found.used_by:
        raise ExoError(
            "invite_refused",
            f"the invite was used already (by {found.used_by}); an invite admits one node: {_NEW}",
        )
    if now >= found.expires:
        raise ExoError("invite_refused", f"the invite has expired: {_NEW}")
    return found
