"""In-process binding store: dicts, for a single proxy process, tests and small deployments.

Lookups are answered synchronously (`resolve_cached` never returns None) from a precomputed
Resolution per (X, caller), so the hot path is two dict lookups and a float compare.
"""

from __future__ import annotations

import gc
import heapq
import time
from pathlib import Path

from proxy.bindings.files import Problem, read_bindings
from proxy.bindings.model import (
    A_TO_B,
    AXN,
    B_TO_A,
    BOTH,
    Binding,
    BindingConflict,
    Outcome,
    Resolution,
    resolution_for,
    validate_binding,
)
from proxy.numbers import normalize_number


class _XEntry:
    """Everything bound on one X."""

    __slots__ = ("bindings", "one_way", "others", "routes")

    def __init__(self) -> None:
        self.routes: dict[str, Resolution] = {}  # caller -> answer
        self.others: Resolution | None = None  # AXN: the answer for any caller but A
        self.bindings: dict[str, Binding] = {}  # binding.a -> binding
        # B -> its one-way binding (its answer names no callee to find the binding by)
        self.one_way: dict[str, Binding] | None = None

    def binding_of(self, party: str, answer: Resolution) -> Binding:
        """The binding whose answer for `party` is `answer`."""
        found = self.bindings.get(party)
        if found is None and answer.callee is not None:
            found = self.bindings.get(answer.callee)
        if found is None and self.one_way is not None:
            found = self.one_way.get(party)
        assert found is not None
        return found


class MemoryStore:
    """Bindings in dicts. Uniqueness is checked on bind; expiry on every read."""

    def __init__(self) -> None:
        self._by_x: dict[str, _XEntry] = {}
        self._expiry_heap: list[tuple[float, str, str]] = []  # (expires_at, x, a)

    # -- lookups -------------------------------------------------------------------------

    def resolve_cached(self, x: str, caller: str, now: float) -> Resolution:
        """Answer for a call from `caller` to `x` at `now`; always answers."""
        entry = self._by_x.get(x)
        if entry is not None:
            answer = entry.routes.get(caller) or entry.others
            if answer is not None and now < answer.expires_at:
                return answer
        return self._resolve_slow(x, caller, now)

    def _resolve_slow(self, x: str, caller: str, now: float) -> Resolution:
        """The caller is not routed as given: try normalised numbers, then tell 403 from 404."""
        norm_x = normalize_number(x) or x
        norm_caller = normalize_number(caller) or caller
        entry = self._by_x.get(norm_x)
        if entry is None:
            return Resolution(Outcome.NO_BINDING, None, now)
        if (norm_x, norm_caller) != (x, caller):
            answer = entry.routes.get(norm_caller) or entry.others
            if answer is not None and now < answer.expires_at:
                return answer
        self.purge_expired(now)  # what is left in the entry is live
        if entry.bindings:
            return Resolution(Outcome.NOT_PARTY, None, now)
        return Resolution(Outcome.NO_BINDING, None, now)

    async def resolve(self, x: str, caller: str) -> Resolution:
        return self.resolve_cached(x, caller, time.time())

    async def get(self, x: str) -> list[Binding]:
        """Live bindings on X."""
        return self.get_now(x, time.time())

    def get_now(self, x: str, now: float) -> list[Binding]:
        entry = self._by_x.get(normalize_number(x) or x)
        if entry is None:
            return []
        return [b for b in entry.bindings.values() if b.is_live(now)]

    async def list(self, x_prefix: str = "", limit: int = 1000) -> list[Binding]:
        """Live bindings whose X starts with `x_prefix`, at most `limit`."""
        now = time.time()
        self.purge_expired(now)
        out: list[Binding] = []
        for x, entry in self._by_x.items():
            if not x.startswith(x_prefix):
                continue
            for binding in entry.bindings.values():
                if binding.is_live(now):
                    out.append(binding)
                    if len(out) >= limit:
                        return out
        return out

    def __len__(self) -> int:
        return sum(len(e.bindings) for e in self._by_x.values())

    # -- changes ---------------------------------------------------------------------------

    async def bind(self, binding: Binding) -> bool:
        """Store a binding; True if new, False if it renewed the same parties."""
        return self.bind_now(binding, time.time())

    def bind_now(self, binding: Binding, now: float) -> bool:
        """Synchronous bind (the file loader and tests use it)."""
        return self._bind_valid(validate_binding(binding), now, allow_renewal=True)

    def _bind_valid(self, binding: Binding, now: float, allow_renewal: bool) -> bool:
        self.purge_expired(now)  # from here on every binding in the dicts is live
        return self._bind_live(binding, now, allow_renewal)

    def _bind_live(self, binding: Binding, now: float, allow_renewal: bool) -> bool:
        """Bind, assuming purge_expired(now) ran (bulk loads purge once)."""
        entry = self._by_x.get(binding.x)
        if entry is None:
            entry = self._by_x[binding.x] = _XEntry()
        replaced = self._replaced_by(entry, binding)
        for old in replaced:
            if not allow_renewal:
                raise BindingConflict(f"the same binding is listed twice on x {binding.x}")
            self._remove(entry, old)
        self._insert(entry, binding)
        return not replaced

    @staticmethod
    def _replaced_by(entry: _XEntry, binding: Binding) -> list[Binding]:
        """The binding `binding` renews, if any; BindingConflict if it clashes (O(1) for AXB)."""
        if entry.others is not None:
            old = entry.bindings[entry.others.callee]  # type: ignore[index]
            if binding.kind == AXN and old.a == binding.a:
                return [old]
            raise BindingConflict(f"x {binding.x} already carries an axn binding")
        if binding.kind == AXN:
            if entry.bindings:
                raise BindingConflict(f"x {binding.x} already carries axb bindings")
            return []
        replaced: list[Binding] = []
        for party in binding.parties():
            answer = entry.routes.get(party)
            if answer is None:
                continue
            old = entry.binding_of(party, answer)
            if not old.same_parties(binding):
                raise BindingConflict(f"a party is already bound on x {binding.x}")
            if old not in replaced:
                replaced.append(old)
        return replaced

    def can_take(self, x: str, kind: str, parties: tuple[str, ...], cap: int,
                 now: float) -> bool:
        """Whether X can take a new binding of `kind` between `parties`, with at most `cap`
        bindings on X (the binding API's allocation check)."""
        self.purge_expired(now)
        entry = self._by_x.get(x)
        if entry is None:
            return True
        if kind == AXN:
            return not entry.bindings
        if entry.others is not None or len(entry.bindings) >= cap:
            return False
        return not any(p in entry.routes for p in parties)

    async def unbind(self, x: str, number: str) -> bool:
        """Remove the binding on X that `number` is party to; False if there was none."""
        return self.unbind_now(x, number, time.time())

    def unbind_now(self, x: str, number: str, now: float) -> bool:
        norm_x = normalize_number(x) or x
        norm_number = normalize_number(number) or number
        entry = self._by_x.get(norm_x)
        if entry is None:
            return False
        answer = entry.routes.get(norm_number)
        if answer is None:
            return False
        binding = entry.binding_of(norm_number, answer)
        self._remove(entry, binding)
        if not entry.bindings:
            del self._by_x[norm_x]
        return binding.is_live(now)

    async def close(self) -> None:
        return None

    # -- internals -------------------------------------------------------------------------

    def _insert(self, entry: _XEntry, binding: Binding) -> None:
        # The answers are built once here, carrying the binding's optional fields, so a call
        # costs a dict lookup whatever the binding holds.
        entry.bindings[binding.a] = binding
        if binding.kind == AXN:
            own = (
                resolution_for(binding, Outcome.ROUTE, binding.b)
                if binding.b is not None
                else resolution_for(binding, Outcome.NOT_PARTY, None)
            )
            entry.routes[binding.a] = own
            entry.others = resolution_for(binding, Outcome.ROUTE, binding.a)
        else:
            assert binding.b is not None
            restricted = resolution_for(binding, Outcome.DIRECTION_RESTRICTED, None)
            entry.routes[binding.a] = (
                restricted if binding.direction == B_TO_A
                else resolution_for(binding, Outcome.ROUTE, binding.b))
            entry.routes[binding.b] = (
                restricted if binding.direction == A_TO_B
                else resolution_for(binding, Outcome.ROUTE, binding.a))
            if binding.direction != BOTH:
                if entry.one_way is None:
                    entry.one_way = {}
                entry.one_way[binding.b] = binding
        heapq.heappush(self._expiry_heap, (binding.expires_at, binding.x, binding.a))

    def _remove(self, entry: _XEntry, binding: Binding) -> None:
        entry.bindings.pop(binding.a, None)
        if entry.one_way is not None and binding.b is not None:
            entry.one_way.pop(binding.b, None)
        for party in binding.parties():
            entry.routes.pop(party, None)
        if binding.kind == AXN:
            entry.others = None

    def purge_expired(self, now: float) -> int:
        """Forget bindings that expired by `now`; amortised O(log n) per binding."""
        heap = self._expiry_heap
        removed = 0
        while heap and heap[0][0] <= now:
            exp, x, a = heapq.heappop(heap)
            entry = self._by_x.get(x)
            if entry is None:
                continue
            binding = entry.bindings.get(a)
            if binding is not None and binding.expires_at == exp:
                self._remove(entry, binding)
                removed += 1
                if not entry.bindings:
                    del self._by_x[x]
        return removed

    def own_pages(self) -> int:
        """Copy now, in this forked worker, the memory pages a lookup writes to; returns the
        answers touched.

        The supervisor loads the store once and the workers share its pages copy-on-write.
        A lookup only reads the dicts, but the answer it returns (and its callee and expiry
        objects) get their reference counts written: the first call that reaches a page makes
        the kernel copy it, in the call's time. Measured in the harness (100,000 bindings, two
        workers, 200 CPS): about five such page faults a call, on the INVITE's path. Touching
        every answer once at start-up moves those copies out of the calls: each worker then
        holds its own copy of the answers (which calls would copy bit by bit anyway).
        """
        touched = 0
        keep: list[object] = []
        for entry in self._by_x.values():
            answers = list(entry.routes.values())
            if entry.others is not None:
                answers.append(entry.others)
            for answer in answers:
                keep.append(answer.callee)
                keep.append(answer.expires_at)
                keep.append(answer.leg)
            touched += len(answers)
            keep.clear()
        return touched

    # -- loading ---------------------------------------------------------------------------

    def load_file(self, path: Path | str, now: float | None = None) -> tuple[int, list[Problem]]:
        """Add the bindings of a YAML/CSV file; bad rows are skipped and reported."""
        now = time.time() if now is None else now
        # The cyclic GC would rescan every new object many times while 100k+ bindings arrive;
        # nothing built here is cyclic.
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._load_rows(path, now)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _load_rows(self, path: Path | str, now: float) -> tuple[int, list[Problem]]:
        loaded = 0
        problems: list[Problem] = []
        name = str(path)
        self.purge_expired(now)
        for item in read_bindings(path, now):
            if isinstance(item, Problem):
                problems.append(item)
                continue
            line, binding = item
            try:
                self._bind_live(binding, now, allow_renewal=False)
            except BindingConflict as exc:
                problems.append(Problem(name, line, str(exc)))
            else:
                loaded += 1
        return loaded, problems
