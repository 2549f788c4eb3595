"""Passwords: argon2id hashes (``argon2-cffi``; an unknown name costs as much time as a known one), what a
new password may be, and how wrong passwords slow a sign-in down: the tries that are free, the wait after
them, how many failures one address may have, and which addresses many users share."""

from __future__ import annotations

from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

HASHER = PasswordHasher()  # argon2id, the library's (RFC 9106 "low memory") parameters
_DUMMY_HASH = HASHER.hash("not a password anyone has")  # unknown users cost as much time as known ones

MIN_PASSWORD, MAX_PASSWORD = 8, 1024  # characters; a longer one is refused before it is hashed
FREE_TRIES = 3  # wrong passwords in a row before each further try waits
MAX_WAIT = timedelta(minutes=5)
ADDRESS_WINDOW, ADDRESS_TRIES = timedelta(minutes=5), 20  # failed sign-ins from one address, any user


def check_new_password(password: str, username: str = "") -> str:
    if not password:
        raise ValueError("Enter a password.")
    if len(password) < MIN_PASSWORD:
        raise ValueError(f"A password has at least {MIN_PASSWORD} characters.")
    if len(password) > MAX_PASSWORD:
        raise ValueError(f"A password has at most {MAX_PASSWORD} characters.")
    if username and password.lower() == username.lower():
        raise ValueError("The password cannot be the user name.")
    return password


def verify_password(stored: str | None, password: str) -> bool:
    try:
        return HASHER.verify(stored or _DUMMY_HASH, password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def shared_address(address: str) -> bool:
    """An address many users share as far as the server can tell: none, or the loopback (everyone on the
    server itself, or behind a proxy that does not say who). Failures from it count per user name."""
    address = (address or "").strip().lower()
    return address in ("", "localhost", "::1", "0:0:0:0:0:0:0:1") or address.startswith(("127.", "::ffff:127."))


def wait_after(failures: int) -> timedelta:
    """How long an account waits after ``failures`` wrong passwords in a row: nothing for the first few,
    then 2, 4, 8 … seconds, at most five minutes."""
    if failures < FREE_TRIES:
        return timedelta(0)
    return min(timedelta(seconds=2 ** (failures - FREE_TRIES + 1)), MAX_WAIT)
