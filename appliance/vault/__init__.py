"""The encrypted vault: everything that holds customer data is stored through it.

    keyslots  root key wrapped in key slots (passphrase / recovery key / machine key file)
    keys      KEK and DEK wrapping (root -> versioned KEKs -> per-object DEKs), core-dump guard
    stream    AIRLOCK-STREAM-1, the streaming AEAD file format (no key management, no file I/O)
    records   the vault's catalog rows (slots, KEK versions, wrapped DEKs, failed unlocks)
    lifecycle init, unlock with back-off, passwd, add-slot, rotate
    agent     the per-user key agent that holds the root key until its idle timeout
    store     encrypted objects: write, read into memory, delete (crypto-shred), verify
    cli       `airlock vault ...`

Decisions: docs/adr/0003-vault.md. Base model weights are public and stay plaintext.
"""
