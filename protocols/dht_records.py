"""DHT records only swarm members can write."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct

from hivemind.dht.validation import DHTRecord, RecordValidatorBase


class SwarmKeyValidator(RecordValidatorBase):
    """Signs every DHT record this node stores with the swarm key and accepts only records
    signed with it: a process without the key can neither announce a (fake) peer nor
    overwrite a member's record. Keyed BLAKE2b over key, subkey, value and expiry, appended
    to the value; hivemind calls this in the DHT's own process (so it must pickle)."""

    SIGNATURE = 32

    def __init__(self, key: bytes):
        self.key = key

    def _mac(self, record: DHTRecord) -> bytes:
        h = hashlib.blake2b(key=self.key, digest_size=self.SIGNATURE, person=b"loco-dht")
        for part in (record.key, record.subkey, record.value[: len(record.value) - self.SIGNATURE]):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
        h.update(struct.pack("<d", record.expiration_time))
        return h.digest()

    def validate(self, record: DHTRecord) -> bool:
        if len(record.value) < self.SIGNATURE:
            return False
        return hmac.compare_digest(record.value[-self.SIGNATURE:], self._mac(record))

    def sign_value(self, record: DHTRecord) -> bytes:
        unsigned = dataclasses.replace(record, value=record.value + bytes(self.SIGNATURE))
        return record.value + self._mac(unsigned)

    def strip_value(self, record: DHTRecord) -> bytes:
        return record.value[: -self.SIGNATURE]

    @property
    def priority(self) -> int:
        return 10  # outermost: signs last, verifies first

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
