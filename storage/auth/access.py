"""Who may do what: the roles and the ownership rule, checked by the service (:mod:`storage.service`) on
every call, whatever a page shows or hides.

- ``viewer``: look at everything and export it;
- ``annotator``: also upload, annotate, train, predict and run live sessions; rename, delete, cancel or
  resume only what they own;
- ``admin``: everything, and the users, their roles and the audit trail.
"""

from __future__ import annotations

from storage.auth.accounts import Actor

RIGHTS: dict[str, set[str]] = {
    "viewer": {"look", "export"},
    "annotator": {"look", "export", "create", "annotate", "train", "predict"},
    "admin": {"look", "export", "create", "annotate", "train", "predict", "admin"},
}
WHAT = {  # a right, as the refusal says it
    "export": "export", "create": "upload or load datasets", "annotate": "save or restore masks",
    "train": "train or run a live session", "predict": "predict", "admin": "manage users and see the audit trail",
}


class Denied(PermissionError):
    """A refusal, with what to tell the user."""


def allow(actor: Actor, right: str, owner_id: int | None = None, owner_name: str = "", target: str = "") -> None:
    """Raise :class:`Denied` unless ``actor`` may use ``right``; with ``owner_id`` given (renaming,
    deleting, cancelling, resuming), only the owner or an admin may. A signed-in user who must still
    change the one-time password may do nothing else."""
    if actor.must_change_password:
        raise Denied("Change your one-time password first.")
    if actor.role not in RIGHTS:
        raise Denied(f"Your account has no valid role ({actor.role!r}): ask an admin.")
    if right == "manage":
        if actor.role == "admin":
            return
        if actor.role != "annotator":
            raise Denied(f"Your role ({actor.role}) can look and export only: changing or deleting "
                         f"{target or 'this'} needs the annotator role. Ask an admin.")
        if owner_id is None or owner_id != actor.user_id:
            whose = f"belongs to {owner_name}" if owner_name else "is not yours"
            raise Denied(f"{(target or 'This').capitalize()} {whose}: only its owner or an admin can change "
                         "or delete it.")
        return
    if right not in RIGHTS[actor.role]:
        needed = "admin" if right == "admin" else "annotator"
        raise Denied(f"Your role ({actor.role}) cannot {WHAT.get(right, right)}: that needs the {needed} role. "
                     "Ask an admin.")
