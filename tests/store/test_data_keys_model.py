"""The key/value semantics against the model, with key rotations anywhere in between (hypothesis stateful).

The machine of test_store_model.py, plus data-key rotations, root key
rotations (the keyring re-wrapped under a new root key, the store unlocked
with it) and re-wrap batches of any size, also submitted in the middle of a
burst of writes that share their group commits.  Keys change nothing a
caller sees: every outcome and the whole visible state still match the plain
model, every stored value is labelled with a term the keyring holds, and a
re-wrap that has gone all the way round leaves no value below the newest term.
"""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule
from kv_model import WriteOp, settle
from test_store_model import KvMachine, write_ops

from spike.app.store.data_keys import RewrapCursor
from spike.protocol.material import RootKey
from spike.protocol.pending import PendingRotation
from spike.protocol.record import seal_key

limits = st.integers(1, 7)


class KeyringKvMachine(KvMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root_key = RootKey(bytes(range(1, 33)))  # the store helpers' ROOT_KEY
        self.keys = 1
        self.cursor: RewrapCursor | None = None  # a re-wrap pass under way

    @rule(rewrap=st.booleans())
    def rotate_data_key(self, rewrap: bool) -> None:
        term = self.store.rotate_data_key()
        assert term == self.store.keyring().active
        if rewrap:
            self.cursor = RewrapCursor()

    @rule()
    def rotate_root_key(self) -> None:
        old = self.store.load_key_record()
        self.keys += 1
        new_key = RootKey(bytes([self.keys]) * 32)
        new, _ = seal_key(new_key, epoch=old.epoch + 1, threshold=2, keeper_ids=[1, 2, 3])
        pending = PendingRotation.seal(self.root_key, old, new_key, new)
        assert self.store.persist_rotation(pending, self.store.keyring().wrap(new_key, new.epoch))
        assert self.store.commit_rotation(pending)
        self.store.unlock(new_key, new.epoch)
        self.root_key = new_key

    @rule(limit=limits)
    def rewrap_some(self, limit: int) -> None:
        if self.cursor is None:
            self.cursor = RewrapCursor()
        self.cursor = self.store.rewrap_batch(self.store.keyring().active, self.cursor, limit=limit).next

    @rule(ops=st.lists(write_ops, min_size=1, max_size=5), at=st.integers(0, 5), limit=limits)
    def rewrap_amid_writes(self, ops: list[WriteOp], at: int, limit: int) -> None:
        """A re-wrap batch amid writes submitted without waiting: some before it reads its page, the others
        after it read and before it writes (they are queued ahead of its write, and commit first)."""
        futures: list[Any] = [op.submit(self.store) for op in ops[:at]]

        def between() -> None:
            futures.extend(op.submit(self.store) for op in ops[at:])

        self.cursor = self.store.rewrap_batch(
            self.store.keyring().active, self.cursor or RewrapCursor(), limit=limit, before_write=between
        ).next
        for op, future in zip(ops, futures, strict=True):
            assert settle(future) == op.apply(self.model), (op, ops)

    @invariant()
    def every_value_is_under_a_term_the_keyring_holds(self) -> None:
        keyring = self.store.keyring()
        held = {t.term for t in keyring.terms}
        counts = self.store.values_by_term(fresh=True)
        assert set(counts) <= held, (counts, held)

    @rule()
    def finish_a_rewrap(self) -> None:
        """A pass from the start to the end leaves nothing below the newest term (no write comes in between)."""
        cursor: RewrapCursor | None = RewrapCursor()
        term = self.store.keyring().active
        while cursor is not None:
            cursor = self.store.rewrap_batch(term, cursor, limit=3).next
        assert set(self.store.values_by_term(fresh=True)) <= {term}
        self.cursor = None


KeyringKvMachine.TestCase.settings = settings(
    max_examples=120,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_semantics_match_the_model_across_key_rotations = KeyringKvMachine.TestCase


class PostgresKeyringKvMachine(KeyringKvMachine):
    backend = "postgres"


PostgresKeyringKvMachine.TestCase.settings = settings(
    max_examples=8,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_kv_semantics_match_the_model_across_key_rotations_on_postgres = PostgresKeyringKvMachine.TestCase
