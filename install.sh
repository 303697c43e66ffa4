#!/bin/sh
# Airlock offline installer: sits at the root of every bundle.
#
#   sudo ./install.sh --trust FINGERPRINT [--prefix /opt/airlock] [--home /var/lib/airlock] [--user airlock]
#                     [--python /usr/bin/python3.11] [--units-dir DIR] [--enable-services] [--allow-downgrade]
#   ./install.sh --print-unit NAME [--prefix ..] [--home ..] [--user ..] [--gpu]   (review a unit; writes nothing)
#   ./install.sh --trust FINGERPRINT --preflight-only [--prefix ..] [--home ..]   (verify + preflight; writes nothing)
#
# Order (nothing from the bundle but this script runs before step 2 passes, and after it only the
# verified staging copy is used):
#   1. the signer key's fingerprint must equal --trust; MANIFEST.json's signature is checked with
#      the system's openssl (ECDSA P-256 / SHA-256);
#   2. every entry on the stick must be a regular file listed in the manifest, and every listed
#      file must exist with the listed size and SHA-256 (sha256sum); the first failure stops
#      everything with one line naming the file. A differential bundle (ADR 0018) leaves out the
#      files its manifest lists as held: the installed release under PREFIX must be its base, and
#      each held file is found by its SHA-256 in that release's content (PREFIX/store, or the
#      model store under --home) and checked the same way;
#   3. preflight table (free space for staging plus install on each filesystem, glibc, CPU arch,
#      Python, for a CUDA bundle the NVIDIA driver against its CUDA major and each GPU's compute
#      capability against the oldest the wheels support, existing install and its sequence); any
#      failed row stops before anything is written (--preflight-only stops here in any case);
#   4. copy to PREFIX/.staging.PID (root's, 0700), reassemble split files and check the copy again
#      (the stick may change under us); from here on only the copy is read. Create the service
#      account (--user, default airlock) when absent, PREFIX/releases/VERSION/venv at its final
#      path, pip install from the staged wheels only (--no-index --require-hashes --no-deps), byte-code
#      compiled on every core or, for a file unchanged since the current release, taken from it (ADR 0021),
#      models into the store by hash, the other files into PREFIX/store by hash (what a later
#      differential bundle takes), AIRLOCK_HOME owned by the service account (0700), smoke test
#      with `airlock doctor` as that account, then switch PREFIX/current atomically.
#   5. sandboxed systemd units run as the service account (ADR 0010), written to --units-dir, or
#      to /etc/systemd/system only for a root install into a system prefix (/opt, /usr/local, /srv).
# Every Python run is isolated (-I: no working directory or script directory on sys.path, no
# PYTHON* variables, no user site), with an empty environment, from a root-owned directory.
# No file this script writes is a shell-expanded heredoc: units and wrappers are printf'd.
# A failure at any step leaves the previous release serving; a killed install leaves a release
# marked .incomplete that the next run removes.
#
# Before running this script, verify it (a script cannot vouch for itself): see README.md.

SAFE_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

isolated() {  # [NAME=VALUE ...] PROGRAM ARGS...: empty environment, from root's own directory PYDIR
    (cd "$PYDIR" && env -i PATH="$SAFE_PATH" LC_ALL=C HOME="$PYDIR" "$@")
}

as_service() {  # PROGRAM ARGS...: as the service account, from its home, with this install's settings
    if [ "$(id -u)" -eq 0 ]; then
        (cd "$HOME_DIR" && env -i PATH="$SAFE_PATH" LC_ALL=C HOME="$HOME_DIR" AIRLOCK_HOME="$HOME_DIR" \
            AIRLOCK_PREFIX="$PREFIX" setpriv --reuid="$SVC_USER" --regid="$SVC_GROUP" --init-groups \
            --no-new-privs -- "$@")
    else
        (cd "$HOME_DIR" && env -i PATH="$SAFE_PATH" LC_ALL=C HOME="$HOME_DIR" AIRLOCK_HOME="$HOME_DIR" \
            AIRLOCK_PREFIX="$PREFIX" "$@")
    fi
}

ensure_service_user() {  # sets SVC_USER and SVC_GROUP; creates a system account when absent
    if [ "$(id -u)" -ne 0 ]; then
        # Not root: nothing can be created or handed over; everything runs as the invoking account.
        SVC_USER=$(id -un) SVC_GROUP=$(id -gn)
        return 0
    fi
    if id -u "$SVC_USER" >/dev/null 2>&1; then
        say "service account: $SVC_USER (exists; reused)"
    else
        command -v useradd >/dev/null 2>&1 || die "cannot create the service account $SVC_USER: useradd is missing; create a system account without a login shell (home $HOME_DIR) and run again"
        nologin=/usr/sbin/nologin
        [ -x "$nologin" ] || nologin=/sbin/nologin
        [ -x "$nologin" ] || nologin=/bin/false
        useradd --system --user-group --no-create-home --home-dir "$HOME_DIR" --shell "$nologin" \
            --comment "Airlock appliance services" "$SVC_USER" || die "useradd $SVC_USER failed (see above)"
        say "service account: $SVC_USER (created: system account, no login shell)"
    fi
    [ "$(id -u "$SVC_USER")" -ne 0 ] || die "--user $SVC_USER is root; the services need an unprivileged account"
    SVC_GROUP=$(id -gn "$SVC_USER")
}

write_wrapper() {  # PREFIX/bin/airlock; values are printf'd, the code is a quoted heredoc
    cat <<'EOF'
#!/bin/sh
# Written by install.sh: runs the current release, isolated (python -I), with this install's state.
# Run as root, every command but `upgrade` runs as the service account (ADR 0010), so that all it
# writes under AIRLOCK_HOME stays that account's; `upgrade` installs software and stays root.
EOF
    printf 'AIRLOCK_HOME=${AIRLOCK_HOME:-%s} AIRLOCK_PREFIX=%s SERVICE_USER=%s SERVICE_GROUP=%s\n' \
        "$HOME_DIR" "$PREFIX" "$SVC_USER" "$SVC_GROUP"
    cat <<'EOF'
export AIRLOCK_HOME AIRLOCK_PREFIX
PY=$AIRLOCK_PREFIX/current/venv/bin/python
if [ "$(id -u)" -eq 0 ] && [ "${1:-}" != upgrade ]; then
    HOME=$AIRLOCK_HOME
    export HOME
    exec setpriv --reuid="$SERVICE_USER" --regid="$SERVICE_GROUP" --init-groups --no-new-privs -- \
        "$PY" -I -m appliance.cli "$@"
fi
exec "$PY" -I -m appliance.cli "$@"
EOF
}

nvidia_nodes() {  # the NVIDIA device nodes a GPU unit may use (the usual set when none exist here)
    found=""
    for node in /dev/nvidiactl /dev/nvidia-uvm /dev/nvidia-uvm-tools /dev/nvidia[0-9]*; do
        [ ! -c "$node" ] || found="$found $node"
    done
    printf '%s\n' "${found:- /dev/nvidiactl /dev/nvidia-uvm /dev/nvidia-uvm-tools /dev/nvidia0}"
}

service_unit() {  # description, type, airlock arguments, restart policy, network: inet|none
    printf '%s\n' '[Unit]' "Description=$1" 'After=network.target' '' '[Service]' "Type=$2" \
        "User=$SVC_USER" \
        "Environment=AIRLOCK_HOME=$HOME_DIR" "Environment=HOME=$HOME_DIR" \
        "EnvironmentFile=-$PREFIX/etc/serve.env" \
        '# Models are encrypted: without a logged-in agent the key comes from the machine key (a file' \
        '# only the service account can read), if the site chose one at `vault init` (otherwise this' \
        '# step fails, is ignored, and the command says why).' \
        "ExecStartPre=-$PREFIX/bin/airlock vault unlock --machine-key" \
        "ExecStart=$PREFIX/bin/airlock $3" \
        "Restart=$4" 'RestartSec=30' \
        '# Sandbox (ADR 0010): the service account, no capabilities, a read-only system, its own' \
        '# /tmp and /dev, writes only to AIRLOCK_HOME. MemoryDenyWriteExecute is off: the JIT kernels' \
        '# of oneDNN (PyTorch) and TensorRT need executable memory they write.' \
        'UMask=0077' 'NoNewPrivileges=yes' 'CapabilityBoundingSet=' 'AmbientCapabilities=' \
        'ProtectSystem=strict' "ReadWritePaths=$HOME_DIR" 'PrivateTmp=yes' 'PrivateDevices=yes' \
        'DevicePolicy=closed'
    # Users' homes are hidden; a prefix or AIRLOCK_HOME the site put under one is mounted back.
    case "$HOME_DIR:$PREFIX" in
        /home/*|/root/*|/run/user/*|*:/home/*|*:/root/*|*:/run/user/*)
            printf '%s\n' 'ProtectHome=tmpfs' "BindPaths=$HOME_DIR" "BindReadOnlyPaths=$PREFIX" ;;
        *) printf '%s\n' 'ProtectHome=yes' ;;
    esac
    if [ "$GPU" -eq 1 ]; then
        printf '%s\n' '# The GPU: the NVIDIA device nodes only, into the private /dev.'
        for node in $(nvidia_nodes); do
            printf '%s\n' "DeviceAllow=$node rw" "BindPaths=-$node"
        done
    fi
    printf '%s\n' 'PrivateUsers=yes' 'ProtectKernelTunables=yes' 'ProtectKernelModules=yes' \
        'ProtectKernelLogs=yes' 'ProtectControlGroups=yes' 'ProtectClock=yes' 'ProtectHostname=yes' \
        'ProtectProc=invisible' 'RestrictNamespaces=yes' 'RestrictRealtime=yes' 'RestrictSUIDSGID=yes' \
        'LockPersonality=yes' 'RemoveIPC=yes' 'KeyringMode=private' 'SystemCallArchitectures=native' \
        'SystemCallFilter=@system-service' 'SystemCallFilter=~@privileged' 'SystemCallErrorNumber=EPERM'
    if [ "$5" = inet ]; then
        # Clients reach the server over IP; the key agent is a unix socket.
        printf '%s\n' 'RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6'
    else
        printf '%s\n' '# Retraining reads and writes local files only: no network at all.' \
            'PrivateNetwork=yes' 'IPAddressDeny=any' 'RestrictAddressFamilies=AF_UNIX'
    fi
    printf '%s\n' '' '[Install]' 'WantedBy=multi-user.target'
}

unit_text() {  # the text of one unit, on stdout
    case "$1" in
        # $AIRLOCK_SERVE_ARGS is systemd's to expand (from serve.env), never this script's.
        airlock-serve.service)
            service_unit "Airlock inference server" simple 'serve $AIRLOCK_SERVE_ARGS' on-failure inet ;;
        airlock-retrain.service)
            service_unit "Airlock scheduled retraining" oneshot 'schedule run-due --machine-key' no none ;;
        airlock-retrain.timer)
            cat <<'EOF'
[Unit]
Description=Airlock nightly incremental retrain

[Timer]
OnCalendar=*-*-* 02:00:00
Persistent=true

[Install]
WantedBy=timers.target
EOF
            ;;
        *) die "no unit '$1' (airlock-serve.service, airlock-retrain.service, airlock-retrain.timer)" ;;
    esac
}

# The whole script is one function called on the last line: the shell reads it completely before
# anything runs, so a copy rewritten while it runs (a stick, a network share) changes nothing.
main() {
set -eu
umask 022
LC_ALL=C
export LC_ALL

die() {
    printf 'install.sh: REFUSED: %s\n' "$1" >&2
    exit 1
}
say() { printf '%s\n' "$*"; }

usage() {
    sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
}

TRUST="" PREFIX="/opt/airlock" HOME_DIR="/var/lib/airlock" UNITS_DIR="" ENABLE=0 ALLOW_DOWNGRADE=0 PY=""
SVC_USER="" PRINT_UNIT="" GPU=0 PREFLIGHT_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --trust) [ $# -ge 2 ] || die "--trust needs a value"; TRUST=$2; shift 2 ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a value"; PREFIX=$2; shift 2 ;;
        --home) [ $# -ge 2 ] || die "--home needs a value"; HOME_DIR=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs a value"; PY=$2; shift 2 ;;
        --units-dir) [ $# -ge 2 ] || die "--units-dir needs a value"; UNITS_DIR=$2; shift 2 ;;
        --user) [ $# -ge 2 ] || die "--user needs a value"; SVC_USER=$2; shift 2 ;;
        --print-unit) [ $# -ge 2 ] || die "--print-unit needs a unit name"; PRINT_UNIT=$2; shift 2 ;;
        --gpu) GPU=1; shift ;;
        --preflight-only) PREFLIGHT_ONLY=1; shift ;;
        --enable-services) ENABLE=1; shift ;;
        --allow-downgrade) ALLOW_DOWNGRADE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
# Paths and the account name end up in units, env files and wrappers: a narrow alphabet means
# nothing in them can be read as a systemd specifier, a shell word or a second line.
for pair in "--prefix:$PREFIX" "--home:$HOME_DIR" "--units-dir:${UNITS_DIR:-/}"; do
    value=${pair#*:}
    printf '%s\n' "$value" | grep -Eq '^/[A-Za-z0-9._+/-]*$' \
        || die "${pair%%:*} must be an absolute path of letters, digits and ._+-/ only (got '$value')"
done
if [ -z "$SVC_USER" ]; then
    # An upgrade keeps the account the first install chose.
    SVC_USER=$(cat "$PREFIX/etc/user" 2>/dev/null || printf 'airlock')
fi
printf '%s\n' "$SVC_USER" | grep -Eq '^[a-z_][a-z0-9_-]{0,30}$' \
    || die "--user '$SVC_USER': an account name is lower-case letters, digits, _ and -, at most 31 characters"
if [ -n "$PRINT_UNIT" ]; then
    unit_text "$PRINT_UNIT"
    exit 0
fi
[ -n "$TRUST" ] || die "--trust FINGERPRINT is required: the signing key fingerprint from the site's paper record"
for tool in openssl sha256sum sed tr find sort comm wc cut df uname awk; do
    command -v "$tool" >/dev/null 2>&1 || die "the system tool '$tool' is missing; install it from the OS media"
done

BUNDLE=$(cd "$(dirname "$0")" && pwd -P)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/airlock-install.XXXXXX")
# Python runs from here until the staging copy exists: root's, 0700, empty.
PYDIR=$WORK
REL="" STAGE="" DONE=0 LOCKED=0
cleanup() {
    status=$?
    if [ "$DONE" -ne 1 ]; then
        [ -z "$STAGE" ] || rm -rf "$STAGE"
        # A release that never became current is removed: no half-release is ever selectable.
        if [ -n "$REL" ] && [ -f "$REL/.incomplete" ]; then rm -rf "$REL"; fi
        [ -z "$PREFIX" ] || rm -f "$PREFIX/.current.new" "$PREFIX/.previous.new"
    fi
    [ "$LOCKED" -ne 1 ] || rm -rf "$PREFIX/.install.lock"
    rm -rf "$WORK"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# ---------------------------------------------------------------- 1. signature against the pinned key
fingerprint_of() {  # SHA-256 of the DER SubjectPublicKeyInfo
    openssl pkey -pubin -in "$1" -outform DER 2>/dev/null | sha256sum | cut -d' ' -f1
}
EMPTY_SHA256=e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
if [ -f "$TRUST" ]; then
    WANT=$(fingerprint_of "$TRUST")
    [ "$WANT" != "$EMPTY_SHA256" ] || die "--trust: $TRUST is not a PEM public key"
else
    WANT=$(printf '%s' "$TRUST" | tr -d ':' | tr 'ABCDEF' 'abcdef')
fi
printf '%s\n' "$WANT" | grep -Eq '^[0-9a-f]{64}$' || die "--trust: '$TRUST' is not a 64-hex fingerprint or a public key file"
for name in MANIFEST.json MANIFEST.json.sig signer.pub.pem; do
    [ ! -L "$BUNDLE/$name" ] || die "$name: is a symlink; bundles hold regular files only"
    [ -f "$BUNDLE/$name" ] || die "$name: missing from $BUNDLE"
    # Work on private copies: what is verified is exactly what is read afterwards.
    cp "$BUNDLE/$name" "$WORK/$name"
done
M="$WORK/MANIFEST.json"
GOT=$(fingerprint_of "$WORK/signer.pub.pem")
[ "$GOT" = "$WANT" ] || die "signer.pub.pem: signing key $GOT is not the trusted key $WANT"
openssl dgst -sha256 -verify "$WORK/signer.pub.pem" -signature "$WORK/MANIFEST.json.sig" "$M" >/dev/null 2>&1 \
    || die "MANIFEST.json: signature does not verify with the trusted key (manifest or signature altered)"

# ---------------------------------------------------------------- 2. every file against the manifest
str_field() { sed -n "s/.*\"$1\":\"\([^\"]*\)\".*/\1/p" "$M"; }
num_field() { sed -n "s/.*\"$1\":\([0-9][0-9]*\).*/\1/p" "$M"; }
[ "$(str_field format)" = "airlock-bundle/1" ] || die "MANIFEST.json: unknown format (built by a newer airlock-bundle?)"
PRODUCT=$(str_field product) VERSION=$(str_field version) SEQUENCE=$(num_field sequence)
EXPIRES=$(str_field expires) ARCH=$(str_field arch) PYVER=$(str_field python_version)
GLIBC_MIN=$(str_field glibc_min) CUDA_MAJOR=$(num_field cuda_major) MIN_DRIVER=$(num_field min_driver)
for value in "$PRODUCT" "$VERSION" "$SEQUENCE" "$EXPIRES" "$ARCH" "$PYVER" "$GLIBC_MIN" "$CUDA_MAJOR" "$MIN_DRIVER"; do
    printf '%s\n' "$value" | grep -Eq '^[A-Za-z0-9][A-Za-z0-9._+-]*$' || die "MANIFEST.json: a required field is malformed"
done
# Optional: the oldest GPU architecture a CUDA bundle's wheels support ("7.5"); empty = not checked.
MIN_CC=$(str_field min_compute_capability)
[ -z "$MIN_CC" ] || printf '%s\n' "$MIN_CC" | grep -Eq '^[1-9][0-9]?[.][0-9]$' \
    || die "MANIFEST.json: target.min_compute_capability is malformed"

# "size sha256 path" per listed file; the manifest's path alphabet has no quotes, braces or spaces.
sed -n 's/.*"files":\[\([^]]*\)\].*/\1/p' "$M" | tr '}' '\n' \
    | sed -n 's/^,\{0,1\}{"path":"\([^"]*\)","sha256":"\([0-9a-f]\{64\}\)","size":\([0-9][0-9]*\)$/\3 \2 \1/p' \
    > "$WORK/files"
LISTED=$(sed -n 's/.*"files":\[\([^]]*\)\].*/\1/p' "$M" | tr '{' '\n' | grep -c '"path"' || true)
[ "$LISTED" -gt 0 ] && [ "$LISTED" -eq "$(wc -l < "$WORK/files")" ] || die "MANIFEST.json: file list is malformed"
cut -d' ' -f3 "$WORK/files" > "$WORK/paths"
sort "$WORK/paths" > "$WORK/paths.sorted"
BAD=$(grep -Ev '^[A-Za-z0-9_+][A-Za-z0-9._+-]*(/[A-Za-z0-9_+][A-Za-z0-9._+-]*)*$' "$WORK/paths" | head -n 1 || true)
[ -z "$BAD" ] || die "MANIFEST.json: path '$BAD' is absolute, has '..' or characters outside [A-Za-z0-9._+-/]"
BAD=$(grep -F '..' "$WORK/paths" | head -n 1 || true)
[ -z "$BAD" ] || die "MANIFEST.json: path '$BAD' contains '..'"
DUP=$(sort "$WORK/paths" | uniq -d | head -n 1)
[ -z "$DUP" ] || die "MANIFEST.json: $DUP is listed twice"

# A differential bundle: the paths of the listed files it leaves to the installed base release.
BASE_ID="" BASE_VERSION=""
: > "$WORK/held_paths"
if grep -q '"differential":' "$M"; then
    DIFF=$(sed -n 's/.*"differential":{"base_bundle_id":"\([0-9a-f]\{64\}\)","base_version":"\([A-Za-z0-9][A-Za-z0-9.+-]*\)","held":\[\([^]]*\)\]}.*/\1 \2 \3/p' "$M")
    [ -n "$DIFF" ] || die "MANIFEST.json: the differential field is malformed"
    BASE_ID=${DIFF%% *} DIFF=${DIFF#* }
    BASE_VERSION=${DIFF%% *} DIFF=${DIFF#* }
    printf '%s\n' "$DIFF" | tr ',' '\n' | sed -n 's/^"\([^"]*\)"$/\1/p' > "$WORK/held_paths"
    [ "$(wc -l < "$WORK/held_paths")" -eq "$(printf '%s\n' "$DIFF" | tr ',' '\n' | grep -c .)" ] \
        || die "MANIFEST.json: the differential field's held list is malformed"
    BAD=$(grep -Ev '^(wheels/[^/]*[.]whl|models/.*)$' "$WORK/held_paths" | head -n 1 || true)
    [ -z "$BAD" ] || die "MANIFEST.json: $BAD is held, but only wheels and model files may be"
    BAD=$(sort "$WORK/held_paths" | comm -23 - "$WORK/paths.sorted" | head -n 1)
    [ -z "$BAD" ] || die "MANIFEST.json: held file $BAD is not listed"
fi
# "size sha256 path": what the stick carries, and what the installed release must hold.
awk 'FILENAME == ARGV[1] { held[$1] = 1; next } !($3 in held)' "$WORK/held_paths" "$WORK/files" > "$WORK/shipped"
awk 'FILENAME == ARGV[1] { held[$1] = 1; next } ($3 in held)' "$WORK/held_paths" "$WORK/files" > "$WORK/held"

ODD=$(cd "$BUNDLE" && find . ! -type d ! -type f | sed 's|^\./||' | head -n 1)
[ -z "$ODD" ] || die "$ODD: is a symlink or special file; bundles hold regular files only"
(cd "$BUNDLE" && find . -type f | sed 's|^\./||') | sort > "$WORK/on_disk"
{ cut -d' ' -f3 "$WORK/shipped"; printf 'MANIFEST.json\nMANIFEST.json.sig\nsigner.pub.pem\n'; } | sort > "$WORK/expected"
HELD_ON_STICK=$(sort "$WORK/held_paths" | comm -12 "$WORK/on_disk" - | head -n 1)
[ -z "$HELD_ON_STICK" ] || die "$HELD_ON_STICK: on the stick, but the manifest says the installed release holds it (differential bundle)"
EXTRA=$(comm -23 "$WORK/on_disk" "$WORK/expected" | head -n 1)
[ -z "$EXTRA" ] || die "$EXTRA: not listed in the manifest (extra file)"
MISSING=$(comm -13 "$WORK/on_disk" "$WORK/expected" | head -n 1)
[ -z "$MISSING" ] || die "$MISSING: listed in the manifest but missing"

check_tree() {  # $1 = root, $2 = "size sha256 path" list; every file: regular, size, SHA-256
    while read -r size sha path; do
        [ ! -L "$1/$path" ] && [ -f "$1/$path" ] || die "$path: missing or not a regular file"
        actual=$(wc -c < "$1/$path" | tr -d ' ')
        [ "$actual" = "$size" ] || die "$path: size $actual bytes, manifest says $size"
        actual=$(sha256sum < "$1/$path" | cut -d' ' -f1)
        [ "$actual" = "$sha" ] || die "$path: SHA-256 does not match the manifest"
    done < "$2"
}
check_tree "$BUNDLE" "$WORK/shipped"

# A differential bundle installs only over its base: the installed release's content must hold
# every held file, byte for byte (looked up by SHA-256, checked like the stick's files).
: > "$WORK/held_from"
if [ -n "$BASE_ID" ]; then
    FULL_HINT="install the full bundle of $PRODUCT $VERSION instead"
    BASE_REL=$(readlink "$PREFIX/current" 2>/dev/null || true)
    [ -n "$BASE_REL" ] || die "this differential bundle ships only what changed since $PRODUCT $BASE_VERSION, and nothing is installed under $PREFIX; $FULL_HINT"
    INSTALLED_ID=$(sed -n 's/.*"bundle_id":"\([0-9a-f]\{64\}\)".*/\1/p' "$PREFIX/$BASE_REL/bundle/MANIFEST.json" 2>/dev/null || true)
    [ "$INSTALLED_ID" = "$BASE_ID" ] || die "this differential bundle needs $PRODUCT $BASE_VERSION (bundle $(printf '%.16s' "$BASE_ID")) installed, but $PREFIX runs ${BASE_REL#releases/} (bundle $(printf '%.16s' "${INSTALLED_ID:-unknown}")); $FULL_HINT"
    while read -r size sha path; do
        src=""
        for store in "$PREFIX/store" "$HOME_DIR/models/store"; do
            if [ -z "$src" ] && { [ -e "$store/$sha" ] || [ -L "$store/$sha" ]; }; then src="$store/$sha"; fi
        done
        [ -n "$src" ] || die "$path: the differential bundle needs it from the installed release ${BASE_REL#releases/}, which lacks it (SHA-256 $(printf '%.16s' "$sha")... in $PREFIX/store or $HOME_DIR/models/store); $FULL_HINT"
        [ ! -L "$src" ] && [ -f "$src" ] || die "$path: the installed release's copy $src is not a regular file; $FULL_HINT"
        actual=$(wc -c < "$src" | tr -d ' ')
        actual_sha=$(sha256sum < "$src" | cut -d' ' -f1)
        [ "$actual" = "$size" ] && [ "$actual_sha" = "$sha" ] \
            || die "$path: the installed release's copy $src does not match the manifest's SHA-256 (tampered with or damaged); tell your security office, then $FULL_HINT"
        printf '%s %s\n' "$path" "$src" >> "$WORK/held_from"
    done < "$WORK/held"
    say "differential over $PRODUCT $BASE_VERSION: $(wc -l < "$WORK/held" | tr -d ' ') files checked in the installed release"
fi
today=$(date -u +%Y%m%d)
[ "$today" -le "$(printf '%s' "$EXPIRES" | tr -d '-')" ] || die "MANIFEST.json: bundle expired on $EXPIRES; ask for a fresh one (or check the clock)"
say "verified: $PRODUCT $VERSION (sequence $SEQUENCE), $LISTED files, signed by $WANT"

# split files: "path sha256 size part part ..." per line
sed -n 's/.*"split_files":\[\(.*\)\],"target".*/\1/p' "$M" | tr '}' '\n' \
    | sed -n 's/^,\{0,1\}{"parts":\[\([^]]*\)\],"path":"\([^"]*\)","sha256":"\([0-9a-f]\{64\}\)","size":\([0-9]*\)$/\2 \3 \4 \1/p' \
    | tr ',"' '  ' > "$WORK/split"

# ---------------------------------------------------------------- 3. preflight
# Space: PREFIX holds the staging copy (every listed file, held ones included), the venv (wheels
# unpack to at most 4x their size: 3.5x measured for the CPU stack, 1.8x for CUDA 12) and, while a
# split file is reassembled, its parts and the whole; PREFIX/store links the staged files (no
# copy). HOME holds the model files once, by hash. One filesystem for both needs the sum.
PREFIX_NEED_KB=$(awk '{ all += $1 } $3 ~ /^wheels\/.*[.]whl/ { wheels += $1 }
    END { printf "%d", (all + 4 * wheels) / 1024 + 1 }' "$WORK/files")
SPLIT_MAX=$(awk '$3 > m { m = $3 } END { printf "%d", m / 1024 }' "$WORK/split")
PREFIX_NEED_KB=$((PREFIX_NEED_KB + SPLIT_MAX))
HOME_NEED_KB=$(awk '$3 ~ /^models\// { s += $1 } END { printf "%d", s / 1024 + 1 }' "$WORK/files")
FAILED=""
ROWS=""
row() {  # check, needed, found, status
    ROWS="$ROWS$(printf '%-16s %-28s %-40s %s' "$1" "$2" "$3" "$4")
"
    if [ "$4" = "FAIL" ] && [ -z "$FAILED" ]; then FAILED="$1: needs $2, found $3"; fi
}
free_kb() {
    probe=$1
    while [ ! -d "$probe" ]; do probe=$(dirname "$probe"); done
    df -Pk "$probe" | awk 'NR == 2 { print $4 }'
}
fs_of() {
    probe=$1
    while [ ! -d "$probe" ]; do probe=$(dirname "$probe"); done
    df -Pk "$probe" | awk 'NR == 2 { print $1 " " $6 }'
}
if [ "$(fs_of "$PREFIX")" = "$(fs_of "$HOME_DIR")" ]; then
    need=$((PREFIX_NEED_KB + HOME_NEED_KB)) free=$(free_kb "$PREFIX")
    if [ "$free" -ge "$need" ]; then s=ok; else s=FAIL; fi
    row "free space" ">= $((need / 1024)) MiB (staging+install)" "$((free / 1024)) MiB under $PREFIX and $HOME_DIR" "$s"
else
    for pair in "$PREFIX:$PREFIX_NEED_KB:staging+venv" "$HOME_DIR:$HOME_NEED_KB:models"; do
        dir=${pair%%:*} need=${pair#*:}
        what=${need#*:} need=${need%%:*}
        free=$(free_kb "$dir")
        if [ "$free" -ge "$need" ]; then s=ok; else s=FAIL; fi
        row "free space" ">= $((need / 1024)) MiB ($what)" "$((free / 1024)) MiB under $dir" "$s"
    done
fi
GLIBC=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{ print $2 }' || true)
[ -n "$GLIBC" ] || GLIBC=$(ldd --version 2>/dev/null | head -n 1 | awk '{ print $NF }' || true)
if [ -n "$GLIBC" ] && [ "${GLIBC#*.}" -ge "${GLIBC_MIN#*.}" ] 2>/dev/null; then s=ok; else s=FAIL; fi
row "glibc" ">= $GLIBC_MIN" "${GLIBC:-unknown}" "$s"
MACHINE=$(uname -m)
if [ "$MACHINE" = "$ARCH" ]; then s=ok; else s=FAIL; fi
row "cpu arch" "$ARCH" "$MACHINE" "$s"
[ -n "$PY" ] || PY=$(command -v "python$PYVER" 2>/dev/null || true)
HAVE_PY=$(isolated "${PY:-false}" -I -c 'import sys, venv, ensurepip; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || true)
if [ "$HAVE_PY" = "$PYVER" ]; then s=ok; else s=FAIL; fi
row "python" "$PYVER with venv+ensurepip" "${HAVE_PY:-none}${PY:+ ($PY)}" "$s"
if [ "$CUDA_MAJOR" -eq 0 ]; then
    row "nvidia driver" "none (CPU bundle)" "-" ok
else
    # One line per GPU: "name, driver, compute capability"; drivers before 510 cannot report the
    # capability (the query fails), then only the driver is asked for.
    # A failing nvidia-smi (no driver loaded) prints its complaint on stdout: only a clean run counts.
    if GPUS=$(nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv,noheader 2>/dev/null); then :
    elif GPUS=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null); then :
    else GPUS=""; fi
    GPUS=$(printf '%s\n' "$GPUS" | awk -F', *' 'NF >= 2 && $2 ~ /^[0-9]+([.][0-9]+)*$/')
    DRIVER=$(printf '%s\n' "$GPUS" | awk -F', *' 'NF >= 2 { print $2; exit }')
    if [ -z "$DRIVER" ]; then
        row "nvidia driver" ">= $MIN_DRIVER (CUDA $CUDA_MAJOR)" "no NVIDIA GPU/driver: runs CPU-only" notice
    elif [ "${DRIVER%%.*}" -ge "$MIN_DRIVER" ]; then
        row "nvidia driver" ">= $MIN_DRIVER (CUDA $CUDA_MAJOR)" "$DRIVER" ok
        GPU=1
    else
        row "nvidia driver" ">= $MIN_DRIVER (CUDA $CUDA_MAJOR)" "$DRIVER" FAIL
    fi
    index=0
    printf '%s\n' "$GPUS" | awk -F', *' 'NF >= 2 { print $3 "|" $1 }' > "$WORK/gpus"
    while IFS='|' read -r cc name; do
        if [ -z "$MIN_CC" ]; then
            row "gpu $index" "any compute capability" "$name (sm ${cc:-unknown})" ok
        elif ! printf '%s\n' "$cc" | grep -Eq '^[0-9]+[.][0-9]+$'; then
            row "gpu $index" "sm >= $MIN_CC (wheels, TensorRT)" "$name (driver too old to tell)" FAIL
        elif [ "$(printf '%s %s\n' "$cc" "$MIN_CC" | awk '{ split($1, a, "."); split($2, b, ".");
                print (a[1] * 100 + a[2] >= b[1] * 100 + b[2]) ? "ok" : "FAIL" }')" = ok ]; then
            row "gpu $index" "sm >= $MIN_CC (wheels, TensorRT)" "$name (sm $cc)" ok
        else
            row "gpu $index" "sm >= $MIN_CC (wheels, TensorRT)" "$name (sm $cc)" FAIL
        fi
        index=$((index + 1))
    done < "$WORK/gpus"
fi
INSTALLED_SEQ=0 INSTALLED_PRODUCT="" DOWNGRADE=0
if [ -f "$PREFIX/etc/sequence" ]; then
    INSTALLED_SEQ=$(cat "$PREFIX/etc/sequence") INSTALLED_PRODUCT=$(cat "$PREFIX/etc/product")
    if [ "$INSTALLED_PRODUCT" != "$PRODUCT" ]; then
        row "product" "$INSTALLED_PRODUCT (installed)" "$PRODUCT" FAIL
    fi
    if [ "$SEQUENCE" -gt "$INSTALLED_SEQ" ]; then s=ok
    elif [ "$ALLOW_DOWNGRADE" -eq 1 ]; then s="downgrade (allowed, audited)"; DOWNGRADE=1
    else s=FAIL; fi
    row "sequence" "> $INSTALLED_SEQ (installed)" "$SEQUENCE" "$s"
else
    row "existing install" "-" "none under $PREFIX" ok
fi
say ""
printf '%-16s %-28s %-40s %s\n' check needs found status
printf '%s' "$ROWS"
say ""
if [ -n "$FAILED" ]; then
    case "$FAILED" in
        sequence*) die "sequence $SEQUENCE is not newer than the installed $INSTALLED_SEQ (rollback protection); pass --allow-downgrade to install it anyway (audited)" ;;
        product*) die "this bundle is for product '$PRODUCT', but '$INSTALLED_PRODUCT' is installed under $PREFIX" ;;
        *) die "preflight: $FAILED" ;;
    esac
fi
if [ "$PREFLIGHT_ONLY" -eq 1 ]; then
    say "preflight passed (--preflight-only: nothing written)"
    exit 0
fi

# ---------------------------------------------------------------- 4. install
mkdir -p "$PREFIX/releases" "$PREFIX/etc" "$PREFIX/bin"
# The staging copy is only as private as PREFIX: it must be ours and writable by no one else.
[ -n "$(find "$PREFIX" -maxdepth 0 -user "$(id -u)" ! -perm /022)" ] \
    || die "$PREFIX: must be owned by $(id -un) and not group- or world-writable (the staging copy lives there)"
ensure_service_user
mkdir -p "$HOME_DIR" && chmod 700 "$HOME_DIR"
if ! mkdir "$PREFIX/.install.lock" 2>/dev/null; then
    OTHER=$(cat "$PREFIX/.install.lock/pid" 2>/dev/null || true)
    if [ -n "$OTHER" ] && kill -0 "$OTHER" 2>/dev/null; then die "another install (pid $OTHER) is running"; fi
    rm -rf "$PREFIX/.install.lock"; mkdir "$PREFIX/.install.lock"
fi
LOCKED=1
echo $$ > "$PREFIX/.install.lock/pid"

# Clean up after a killed install: staging copies and releases that never became complete.
CURRENT=$(readlink "$PREFIX/current" 2>/dev/null || true)
rm -rf "$PREFIX"/.staging.* "$PREFIX/.current.new" "$PREFIX/.previous.new"
for dir in "$PREFIX"/releases/*; do
    if [ -f "$dir/.incomplete" ] && [ "releases/${dir##*/}" != "$CURRENT" ]; then
        say "removing an incomplete release left by an interrupted install: $dir"
        rm -rf "$dir"
    fi
done
[ ! -e "$PREFIX/releases/$VERSION" ] || die "$PREFIX/releases/$VERSION already exists; a new bundle needs a new version"

STAGE="$PREFIX/.staging.$$"
mkdir -m 700 "$STAGE"
while read -r size sha path; do
    mkdir -p "$STAGE/$(dirname "$path")"
    cp "$BUNDLE/$path" "$STAGE/$path"
done < "$WORK/shipped"
while read -r path src; do
    mkdir -p "$STAGE/$(dirname "$path")"
    cp "$src" "$STAGE/$path"
done < "$WORK/held_from"
say "checking the staged copy ..."
check_tree "$STAGE" "$WORK/files"
while read -r path sha size parts; do
    [ -n "$path" ] || continue
    : > "$STAGE/$path"
    for part in $parts; do cat "$STAGE/$part" >> "$STAGE/$path"; rm -f "$STAGE/$part"; done
    [ "$(wc -c < "$STAGE/$path" | tr -d ' ')" = "$size" ] || die "$path: reassembled parts are not $size bytes"
    [ "$(sha256sum < "$STAGE/$path" | cut -d' ' -f1)" = "$sha" ] || die "$path: reassembled parts do not match the manifest's SHA-256"
done < "$WORK/split"
# From here on nothing is read from the stick: the verified copy is the bundle.
PYDIR=$STAGE

REL="$PREFIX/releases/$VERSION"
mkdir "$REL"
: > "$REL/.incomplete"
say "creating $REL/venv with $PY ..."
isolated "$PY" -I -m venv "$REL/venv" || die "$PY -m venv failed (see above)"
say "installing wheels (offline, hash-locked) ..."
# The machine's pip configuration (indexes, find-links, constraints) must not change what is installed.
isolated PIP_CONFIG_FILE=/dev/null PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    "$REL/venv/bin/python" -I -m pip install --quiet --no-index --find-links "$STAGE/wheels" --require-hashes \
    --no-deps --no-compile -r "$STAGE/wheels/requirements.lock" || die "pip install from the bundle's wheels failed (see above)"
# Byte-code (ADR 0021): on an upgrade, the current release's compiled files for every source that did not
# change; the rest compiled on every core (pip compiles on one: most of an install's time).
PREVIOUS_VENV=""
[ -z "$CURRENT" ] || [ ! -d "$PREFIX/$CURRENT/venv" ] || PREVIOUS_VENV="$PREFIX/$CURRENT/venv"
if [ -n "$(find "$REL/venv/lib" -path '*/site-packages/appliance/bytecode.py' -type f 2>/dev/null)" ]; then
    isolated "$REL/venv/bin/python" -I -m appliance.bytecode ${PREVIOUS_VENV:+--previous "$PREVIOUS_VENV"} \
        || die "compiling the release's Python files failed (see above)"
else  # a bundle without the appliance (its smoke test will say so): the standard library's compile
    isolated "$REL/venv/bin/python" -I -c \
        'import compileall, sysconfig; compileall.compile_dir(sysconfig.get_paths()["purelib"], quiet=2, workers=0)'
fi

say "installing models into $HOME_DIR/models/store ..."
STORE="$HOME_DIR/models/store"
mkdir -p "$STORE"
sed -n 's/.*"models":\[\([^]]*\)\].*/\1/p' "$M" | tr '}' '\n' \
    | sed -n 's/^,\{0,1\}{"name":"\([^"]*\)","path":"\([^"]*\)"$/\1 \2/p' > "$WORK/models"
while read -r name mpath; do
    mkdir -p "$REL/models/$name"
    for file in "$STAGE/$mpath"/*; do
        sha=$(sha256sum < "$file" | cut -d' ' -f1)
        # A copy already in the store is reused only when its bytes are right (the store is the
        # service account's: a damaged or altered copy is replaced with the verified one).
        if [ -L "$STORE/$sha" ] || [ ! -f "$STORE/$sha" ] || [ "$(sha256sum < "$STORE/$sha" | cut -d' ' -f1)" != "$sha" ]; then
            rm -f "$STORE/.$sha.tmp"
            cp "$file" "$STORE/.$sha.tmp" && chmod 444 "$STORE/.$sha.tmp" && mv -f "$STORE/.$sha.tmp" "$STORE/$sha"
        fi
        ln -s "$STORE/$sha" "$REL/models/$name/${file##*/}"
    done
    # The name operators use follows whichever release is current.
    [ -e "$HOME_DIR/models/$name" ] || [ -L "$HOME_DIR/models/$name" ] || ln -s "$PREFIX/current/models/$name" "$HOME_DIR/models/$name"
done < "$WORK/models"

# The release's other files (wheels, lock, SBOM, install.sh), whole and verified, by SHA-256 in the
# root-owned PREFIX/store: what a later differential bundle takes instead of shipping them again.
awk 'FILENAME == ARGV[1] { for (i = 4; i <= NF; i++) part[$i] = 1; next } !($3 in part)' "$WORK/split" "$WORK/files" \
    > "$WORK/whole"
awk '{ print $3, $2, $1 }' "$WORK/split" >> "$WORK/whole"
mkdir -p "$PREFIX/store"
chmod 755 "$PREFIX/store"
while read -r size sha path; do
    case "$path" in models/*) continue ;; esac
    rm -f "$PREFIX/store/.$sha.tmp"
    ln "$STAGE/$path" "$PREFIX/store/.$sha.tmp" 2>/dev/null || cp "$STAGE/$path" "$PREFIX/store/.$sha.tmp"
    chmod 444 "$PREFIX/store/.$sha.tmp" && mv -f "$PREFIX/store/.$sha.tmp" "$PREFIX/store/$sha" \
        || die "could not keep $path in $PREFIX/store"
done < "$WORK/whole"

mkdir -p "$REL/bundle"
cp "$M" "$WORK/MANIFEST.json.sig" "$WORK/signer.pub.pem" "$REL/bundle/"
# The service account reads the release's record (the audit row, `airlock doctor`), whatever the
# modes of the copy it came from.
chmod 644 "$REL/bundle/MANIFEST.json" "$REL/bundle/MANIFEST.json.sig" "$REL/bundle/signer.pub.pem"

# The home is the service account's alone (ADR 0010); -h: links are changed, never followed.
if [ "$(id -u)" -eq 0 ]; then chown -R -h "$SVC_USER:$SVC_GROUP" "$HOME_DIR"; fi
chmod 700 "$HOME_DIR"

write_wrapper > "$PREFIX/bin/.airlock.new"
chmod 755 "$PREFIX/bin/.airlock.new"
mv -f "$PREFIX/bin/.airlock.new" "$PREFIX/bin/airlock"

say "smoke test: airlock doctor (as $SVC_USER) ..."
if ! as_service "$REL/venv/bin/python" -I -m appliance.cli doctor > "$WORK/doctor.txt" 2>&1; then
    cat "$WORK/doctor.txt" >&2
    die "smoke test failed: airlock doctor of release $VERSION reports a failure (above); the previous release stays current"
fi

ACTION=release.install
[ -z "$CURRENT" ] || ACTION=release.upgrade
[ "$DOWNGRADE" -eq 0 ] || ACTION=release.downgrade
as_service "$REL/venv/bin/python" -I -m appliance.cli upgrade --record "$REL" --action "$ACTION" \
    || die "could not write the audit row for this install"

rm -f "$REL/.incomplete"
# Atomic switch: rename(2) of a new symlink over the old one; keep the old release as previous.
if [ -n "$CURRENT" ]; then
    ln -s "$CURRENT" "$PREFIX/.previous.new"
fi
ln -s "releases/$VERSION" "$PREFIX/.current.new"
isolated "$PY" -I -c 'import os, sys; os.replace(sys.argv[1], sys.argv[2])' "$PREFIX/.current.new" "$PREFIX/current"
[ -z "$CURRENT" ] || isolated "$PY" -I -c 'import os, sys; os.replace(sys.argv[1], sys.argv[2])' "$PREFIX/.previous.new" "$PREFIX/previous"
DONE=1

# Trust and rollback state: root-owned files under PREFIX. The sequence only ever goes up.
cp "$WORK/signer.pub.pem" "$PREFIX/etc/.trusted-key.pem.new" && chmod 644 "$PREFIX/etc/.trusted-key.pem.new" \
    && mv -f "$PREFIX/etc/.trusted-key.pem.new" "$PREFIX/etc/trusted-key.pem"
printf '%s\n' "$PRODUCT" > "$PREFIX/etc/.product.new" && mv -f "$PREFIX/etc/.product.new" "$PREFIX/etc/product"
HIGH=$SEQUENCE
[ "$HIGH" -gt "$INSTALLED_SEQ" ] || HIGH=$INSTALLED_SEQ
printf '%s\n' "$HIGH" > "$PREFIX/etc/.sequence.new" && mv -f "$PREFIX/etc/.sequence.new" "$PREFIX/etc/sequence"
printf '%s\n' "$SVC_USER" > "$PREFIX/etc/.user.new" && mv -f "$PREFIX/etc/.user.new" "$PREFIX/etc/user"
rm -rf "$STAGE"

if [ -z "$UNITS_DIR" ]; then
    # Only a root install into a system location touches the host's systemd; a test or staging
    # install (any other prefix) keeps its units under PREFIX.
    case "$PREFIX" in
        /opt/*|/usr/local/*|/srv/*) [ "$(id -u)" -ne 0 ] || UNITS_DIR=/etc/systemd/system ;;
    esac
    [ -n "$UNITS_DIR" ] || UNITS_DIR="$PREFIX/systemd"
fi
mkdir -p "$UNITS_DIR"
# `airlock upgrade` passes the same directory again.
printf '%s\n' "$UNITS_DIR" > "$PREFIX/etc/.units-dir.new" && mv -f "$PREFIX/etc/.units-dir.new" "$PREFIX/etc/units-dir"
for name in airlock-serve.service airlock-retrain.service airlock-retrain.timer; do
    unit_text "$name" > "$UNITS_DIR/.$name.new"
    chmod 644 "$UNITS_DIR/.$name.new"
    mv -f "$UNITS_DIR/.$name.new" "$UNITS_DIR/$name"
done
# The units run `airlock serve` and `airlock schedule run-due`; a release that lacks one of those
# commands gets its units written but never enabled.
MISSING_CMD=""
if [ "$ENABLE" -eq 1 ]; then
    for cmd in serve "schedule run-due"; do
        # Word splitting of "schedule run-due" is intended.
        as_service "$REL/venv/bin/python" -I -m appliance.cli $cmd --help >/dev/null 2>&1 \
            || MISSING_CMD="${MISSING_CMD:-airlock $cmd}"
    done
fi
if [ "$ENABLE" -eq 1 ] && [ -n "$MISSING_CMD" ]; then
    say "note: services not enabled: this release has no '$MISSING_CMD' command yet"
elif [ "$ENABLE" -eq 1 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v systemctl >/dev/null 2>&1 && [ "$UNITS_DIR" = /etc/systemd/system ]; then
        systemctl daemon-reload
        systemctl enable airlock-serve.service airlock-retrain.timer
    else
        say "note: services not enabled (needs root, systemctl and units in /etc/systemd/system)"
    fi
fi

say "installed $PRODUCT $VERSION (sequence $SEQUENCE) at $PREFIX/current; previous: ${CURRENT:-none}"
say "systemd units written to $UNITS_DIR$([ "$ENABLE" -eq 1 ] || printf ' (not enabled; pass --enable-services)')"
say "services run as the system account $SVC_USER; AIRLOCK_HOME $HOME_DIR is its own (0700)"
say "next: $PREFIX/bin/airlock doctor"
exit 0
}

main "$@"; exit
