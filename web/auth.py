"""People and rights: users bound to an area subtree, roles, bearer tokens, login limits.

Every API call is made by a `Principal` (a user, through a bearer token) and is scoped to the
subtree of the user's area. Passwords are argon2 hashes; tokens are stored only as SHA-256 hashes,
expire, and are revoked by deleting them. The right to issue `emergency` is granted explicitly.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from loa.streamer.areas import AreaTree
from loa.streamer.messages import say
from loa.streamer.state.store import Conflict, Record, Store


class Role(StrEnum):
    admin = "admin"  # everything in its subtree: users, areas, devices, airing, approval
    approver = "approver"  # approves or rejects programmes; airs
    editor = "editor"  # uploads media, writes programmes, submits them for approval
    operator = "operator"  # runs a station: airs, schedules, goes live
    viewer = "viewer"  # reads


ROLE_RIGHTS: dict[Role, frozenset[str]] = {
    Role.admin: frozenset({"read", "edit", "air", "approve", "admin", "direct"}),
    Role.approver: frozenset({"read", "edit", "air", "approve", "direct"}),
    Role.operator: frozenset({"read", "edit", "air"}),  # airs approved programmes and live
    Role.editor: frozenset({"read", "edit"}),
    Role.viewer: frozenset({"read"}),
}

_hasher = PasswordHasher()
TOKEN_TTL = 12 * 3600.0
LOGIN_WINDOW = 300.0
LOGIN_MAX_FAILURES = 5


class AuthError(Exception):
    """401: who are you?"""


class Forbidden(Exception):
    """403: you may not."""


class RateLimited(Exception):
    def __init__(self, retry_after: float) -> None:
        super().__init__(say("auth.too_many_failures"))
        self.retry_after = retry_after


@dataclass(frozen=True)
class Principal:
    id: str
    username: str
    role: Role
    area: str
    emergency: bool
    direct: bool = False  # granted: may air content that has not been approved

    def can(self, right: str) -> bool:
        if right == "direct" and (self.direct or self.emergency) and self.can("air"):
            return True
        return right in ROLE_RIGHTS[self.role]

    def require(self, right: str) -> None:
        if not self.can(right):
            raise Forbidden(say("auth.role_may_not", role=self.role, right=right))

    def inside(self, tree: AreaTree, code: object) -> bool:
        """The area lies in this user's subtree (an area the tree no longer knows does not)."""
        return isinstance(code, str) and code in tree and tree.contains(self.area, code)

    def require_area(self, tree: AreaTree, code: str) -> None:
        """The area must lie inside this user's subtree."""
        if not self.inside(tree, code):
            raise Forbidden(say("auth.area_outside", area=code, own=self.area))

    def related(self, tree: AreaTree, code: object) -> bool:
        """The area lies in this user's subtree or above it: what concerns them and they may
        read (media handed down, broadcasts of their district), not what they may change."""
        return isinstance(code, str) and code in tree and (
            tree.contains(self.area, code) or tree.contains(code, self.area))

    @staticmethod
    def of(user: Record) -> Principal:
        return Principal(user["id"], user["username"], Role(user["role"]), user["area"],
                         bool(user.get("emergency")), bool(user.get("direct")))


def hash_password(password: str) -> str:
    return _hasher.hash(password)


# argon2 takes ~100 ms and 64 MiB by design: never on the event loop, two at a time at most
# (more would not log anyone in faster on two cores, only starve the streams).
# A thread semaphore, taken inside the worker thread: valid whatever event loop calls.
_argon_slots = threading.BoundedSemaphore(2)


async def hash_password_async(password: str) -> str:
    def work() -> str:
        with _argon_slots:
            return hash_password(password)

    return await asyncio.to_thread(work)


async def _verify(hashed: str, password: str) -> bool:
    def check() -> bool:
        with _argon_slots:
            try:
                return bool(_hasher.verify(hashed, password))
            except (VerificationError, InvalidHashError):
                return False

    return await asyncio.to_thread(check)


def token_id(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def validate_password(password: str) -> None:
    if len(password) < 8:
        raise ValueError(say("auth.password_short"))


async def add_user(store: Store, tree: AreaTree, username: str, role: str, area: str,
                   password: str | None = None, emergency: bool = False,
                   direct: bool = False) -> tuple[Record, str]:
    """Create a user; returns the record and the password (generated when not given)."""
    username = username.strip()
    if not username or len(username) > 64 or any(c.isspace() for c in username):
        raise ValueError(say("auth.username_invalid"))
    try:
        role_v = Role(role)
    except ValueError:
        raise ValueError(say("auth.role_unknown", role=repr(role),
                             roles=", ".join(r.value for r in Role))) from None
    tree.get(area)
    password = password or secrets.token_urlsafe(12)
    validate_password(password)
    record: Record = {
        "id": uuid.uuid4().hex[:12],
        "username": username,
        "role": role_v.value,
        "area": area,
        "emergency": bool(emergency),
        "direct": bool(direct),
        "password": await hash_password_async(password),
        "created": time.time(),
        "disabled": False,
    }
    try:
        await store.create("user", record)
    except Conflict:
        raise ValueError(say("auth.username_exists", username=username)) from None
    return record, password


def public_user(user: Record) -> Record:
    return {k: v for k, v in user.items() if k != "password"}


class LoginGuard:
    """Failed logins are counted in the store (shared by every node); at the limit, the name and
    the address are refused for the rest of the window without even checking the password."""

    def __init__(self, store: Store, max_failures: int = LOGIN_MAX_FAILURES,
                 window: float = LOGIN_WINDOW) -> None:
        self.store = store
        self.max = max_failures
        self.window = window
        self.blocked: dict[str, float] = {}

    def check(self, keys: list[str]) -> None:
        now = time.time()
        for k in keys:
            until = self.blocked.get(k)
            if until is not None:
                if until > now:
                    raise RateLimited(until - now)
                del self.blocked[k]

    async def failed(self, keys: list[str]) -> None:
        for k in keys:
            if await self.store.hit(k, self.window) >= self.max:
                self.blocked[k] = time.time() + self.window


async def login(store: Store, guard: LoginGuard, username: str, password: str, ip: str,
                ttl: float = TOKEN_TTL, csrf: str | None = None) -> tuple[str, Record]:
    """Password -> bearer token (a session cookie's token when `csrf` is given: the token
    record holds the value every unsafe request of that session must repeat)."""
    user = await check_password(store, guard, username, password, ip)
    token = secrets.token_urlsafe(32)
    now = time.time()
    await store.put("token", {"id": token_id(token), "user": user["id"], "created": now,
                              "expires": now + ttl, "ip": ip,
                              **({"csrf": csrf} if csrf else {})})
    return token, user


async def check_password(store: Store, guard: LoginGuard, username: str, password: str,
                         ip: str) -> Record:
    """The enabled user with this name and password, or AuthError; failures are counted per
    name and address (RateLimited at the limit). Logins and encoders pushing audio use it."""
    keys = [f"login:u:{username}", f"login:ip:{ip}"]
    guard.check(keys)
    users = await store.find("user", username=username)
    user = users[0] if users else None
    ok = False
    if user is not None and not user.get("disabled"):
        ok = await _verify(user["password"], password)
    else:
        await hash_password_async(password)  # the same time spent: no probing names by timing
    if not ok or user is None:
        await guard.failed(keys)
        raise AuthError(say("auth.wrong_password"))
    return user


async def authenticate(store: Store, header: str | None) -> tuple[Principal, str]:
    """`Authorization: Bearer <token>` -> the principal and the token's id."""
    if not header or not header.startswith("Bearer "):
        raise AuthError(say("auth.required"))
    principal, tid, _ = await authenticate_token(store, header[7:].strip())
    return principal, tid


async def authenticate_token(store: Store, token: str) -> tuple[Principal, str, str | None]:
    """A bearer or session token -> the principal, the token's id and the session's csrf value
    (None for a bearer token)."""
    tid = token_id(token)
    tok = await store.get("token", tid)
    if tok is None or tok["expires"] < time.time():
        raise AuthError(say("auth.token_invalid"))
    user = await store.get("user", tok["user"])
    if user is None or user.get("disabled"):
        raise AuthError(say("auth.account_disabled"))
    return Principal.of(user), tid, tok.get("csrf")


def new_csrf() -> str:
    return secrets.token_urlsafe(24)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    if not expected or given is None:
        return False
    return secrets.compare_digest(expected.encode(), given.encode())


def rights(p: Principal) -> list[str]:
    """The words `Principal.can` accepts for this user, plus "emergency" when granted."""
    words = set(ROLE_RIGHTS[p.role]) | ({"direct"} if p.can("direct") else set())
    return sorted(words | ({"emergency"} if p.emergency else set()))


def area_out(tree: AreaTree, code: str) -> Record:
    """An area with its path from the tree's root (the console's breadcrumb)."""
    def brief(c: str) -> Record:
        a = tree.get(c)
        return {"code": a.code, "name": a.name, "level": a.level}

    return {**brief(code), "path": [brief(c) for c in reversed(tree.ancestors(code))]}


async def change_password(store: Store, p: Principal, keep_tid: str, current: str,
                          new: str) -> None:
    """Check the current password, set the new one, end every other token of the user."""
    user = await store.get("user", p.id)
    if user is None or not await _verify(user["password"], current):
        raise Forbidden(say("auth.current_wrong"))
    validate_password(new)
    await store.update("user", p.id, {"password": await hash_password_async(new)})
    for tok in await store.find("token", user=p.id):
        if tok["id"] != keep_tid:
            await store.delete("token", tok["id"])
