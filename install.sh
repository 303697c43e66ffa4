#!/bin/sh
# Airlock offline installer.
#
# This placeholder sits where the real installer goes. The real one arrives with the signed
# bundle work: it verifies MANIFEST.json's signature with the system's own `openssl` against a
# fingerprint you pass with --trust, checks every file with `sha256sum`, runs a preflight, and
# installs into PREFIX/releases/VERSION with an atomic switch of PREFIX/current.
#
# Until then there is nothing to install from a bundle: for a development setup run `make demo`
# in a checkout of the repository.
echo "install.sh: this build has no bundle installer yet; use 'make demo' in a source checkout" >&2
exit 1
