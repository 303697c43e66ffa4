"""Vault cost, as ratios measured in one run (never fails on time).

    .venv/bin/python tests/bench/bench_vault.py

1. AIRLOCK-STREAM-1 encrypt and decrypt throughput vs raw AES-256-GCM over the same 1 MiB
   segments in the same process (no header, no HKDF, no look-ahead). Goal: >= 0.8x.
2. Decrypting a vault file vs plainly reading a plaintext file of the same size (page cache warm).
3. Unlock time with the default passphrase KDF parameters (Argon2id tuned to ~1 s here; scrypt).
"""

from __future__ import annotations

import io
import os
import tempfile
import time
from pathlib import Path

SIZE = 128 * 1024 * 1024
SEGMENT = 1 << 20
ROUNDS = 5


def _best(fn) -> float:
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    os.environ.pop("AIRLOCK_KDF_PROFILE", None)  # the defaults, not the test profile
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from appliance.vault.keyslots import derive_slot_key, passphrase_kdf
    from appliance.vault.stream import decrypt_stream, encrypt_stream

    data = os.urandom(SIZE)
    dek, dek_id, nonce = os.urandom(32), os.urandom(16), os.urandom(12)
    aead = AESGCM(os.urandom(32))
    # Every variant reads from the same in-memory source and writes into a sink that discards, so
    # the ratios compare the crypto and framing, not memory allocation.
    raw_sealed = b"".join(aead.encrypt(nonce, data[i:i + SEGMENT], b"") for i in range(0, SIZE, SEGMENT))
    sealed_blob = io.BytesIO()
    encrypt_stream(io.BytesIO(data), sealed_blob, dek=dek, dek_id=dek_id, object_id="bench/file",
                   segment_size=SEGMENT)
    sealed = sealed_blob.getvalue()

    def raw_encrypt() -> None:
        src, out = io.BytesIO(data), _Discard()
        while chunk := src.read(SEGMENT):
            out.write(aead.encrypt(nonce, chunk, b""))

    def raw_decrypt() -> None:
        src, out = io.BytesIO(raw_sealed), _Discard()
        while chunk := src.read(SEGMENT + 16):
            out.write(aead.decrypt(nonce, chunk, b""))

    def stream_encrypt() -> None:
        encrypt_stream(io.BytesIO(data), _Discard(), dek=dek, dek_id=dek_id, object_id="bench/file",
                       segment_size=SEGMENT)

    def stream_decrypt() -> None:
        decrypt_stream(io.BytesIO(sealed), _Discard(), dek=dek, object_id="bench/file", label="bench")

    t_raw_enc, t_stream_enc = _best(raw_encrypt), _best(stream_encrypt)
    t_raw_dec, t_stream_dec = _best(raw_decrypt), _best(stream_decrypt)
    mib = SIZE / (1024 * 1024)
    print(f"data: {mib:.0f} MiB in {SEGMENT // 1024} KiB segments, best of {ROUNDS}")
    print(f"encrypt: stream {mib / t_stream_enc:7.0f} MiB/s, raw AES-GCM {mib / t_raw_enc:7.0f} MiB/s, "
          f"ratio {t_raw_enc / t_stream_enc:.2f}x (goal >= 0.8x)")
    print(f"decrypt: stream {mib / t_stream_dec:7.0f} MiB/s, raw AES-GCM {mib / t_raw_dec:7.0f} MiB/s, "
          f"ratio {t_raw_dec / t_stream_dec:.2f}x (goal >= 0.8x)")

    with tempfile.TemporaryDirectory() as tmp:  # ciphertext and random bytes only: no plaintext in /tmp
        plain_path, sealed_path = Path(tmp) / "plain.bin", Path(tmp) / "sealed.alv"
        plain_path.write_bytes(data)
        sealed_path.write_bytes(sealed)

        def read_plain() -> None:
            with plain_path.open("rb") as src:
                while src.read(SEGMENT):
                    pass

        def read_sealed() -> None:
            with sealed_path.open("rb") as src:
                decrypt_stream(src, _Discard(), dek=dek, object_id="bench/file", label=str(sealed_path))

        t_plain, t_sealed = _best(read_plain), _best(read_sealed)
        print(f"file:    decrypt-from-disk {mib / t_sealed:7.0f} MiB/s, plain read {mib / t_plain:7.0f} MiB/s, "
              f"ratio {t_plain / t_sealed:.2f}x")

    started = time.perf_counter()
    params = passphrase_kdf()
    tuning = time.perf_counter() - started
    started = time.perf_counter()
    derive_slot_key(params, b"bench passphrase")
    unlock = time.perf_counter() - started
    print(f"unlock:  default {params.name} {params.memory_kib // 1024} MiB, {params.iterations} iterations, "
          f"{params.lanes} lanes: {unlock:.2f} s per unlock (target ~1 s; tuning at init took {tuning:.2f} s)")
    scrypt = passphrase_kdf(kdf="scrypt")
    started = time.perf_counter()
    derive_slot_key(scrypt, b"bench passphrase")
    print(f"unlock:  scrypt fallback n=2^{scrypt.n.bit_length() - 1}, r={scrypt.r}, p={scrypt.p}: "
          f"{time.perf_counter() - started:.2f} s per unlock")


class _Discard(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        return len(data)


if __name__ == "__main__":
    main()
