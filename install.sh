#!/bin/bash
# SPDX-License-Identifier: MIT
#
# Install PAMSignal from a release:
#
#   curl -fsSL https://github.com/pamsignal/pamsignal/releases/latest/download/install.sh | sudo bash
#   curl -fsSL .../install.sh | sudo bash -s -- --version 0.2.0
#
# It downloads pamsignal.py, its man pages and SHA256SUMS (and
# SHA256SUMS.asc) into a private temporary directory, checks the
# signature and the checksums, and only then runs `python3 pamsignal.py
# install`.  Run with --help for the options.
#
# Everything is inside one function called on the last line, so a download
# cut short anywhere runs nothing at all.

pamsignal_installer() {
set -euo pipefail

# ---------------------------------------------------------------- constants

local -r project_url="https://github.com/pamsignal/pamsignal"
local -r program=/usr/bin/pamsignal
local -r config=/etc/pamsignal/pamsignal.conf
# man page name -> where it goes (files a release may list in SHA256SUMS)
local -r man_dir=/usr/share/man

say() { printf 'pamsignal-install: %s\n' "$*"; }
fail() {
    printf 'pamsignal-install: error: %s\n' "$1" >&2
    shift
    local line
    for line in "$@"; do printf '  %s\n' "$line" >&2; done
    exit 1
}

usage() {
    cat <<'EOF'
usage: install.sh [--version X.Y.Z] [--base-url URL] [--key FILE]
       install.sh --download-only DIR [--version X.Y.Z] [--base-url URL]
       install.sh --uninstall [--purge]

Installs PAMSignal as a hardened systemd service from a release:
downloads pamsignal.py, the man pages and SHA256SUMS, checks the release
signature (SHA256SUMS.asc) and every checksum, then runs
`python3 pamsignal.py install`.  Running it again upgrades and keeps
/etc/pamsignal/pamsignal.conf.

  --version X.Y.Z      that release instead of the latest
  --base-url URL       a mirror holding one directory per release
                       (URL/vX.Y.Z/, URL/latest/); also PAMSIGNAL_BASE_URL
  --key FILE           check SHA256SUMS.asc against this OpenPGP key
                       instead of the key built into this script
  --download-only DIR  download and verify into DIR, install nothing
  --uninstall          stop and remove the service, the program and the
                       man pages; keep configuration, state and logs
  --purge              with --uninstall: remove those too
EOF
}

# ---------------------------------------------------------------- the key

# The OpenPGP public key that signs SHA256SUMS.  `make dist GPG_KEY=...`
# writes it between these lines in the released copy; the copy in the
# source tree has none and checks checksums only (or the --key given).
release_key() {
    cat <<'PAMSIGNAL_RELEASE_KEY'
PAMSIGNAL_RELEASE_KEY
}

# ---------------------------------------------------------------- checks

os_name() {
    local name=""
    if [ -r /etc/os-release ]; then
        # read, not source: a value is text, never code
        name=$(sed -n 's/^PRETTY_NAME=//p' /etc/os-release | tr -d '"')
    fi
    printf '%s\n' "${name:-an unknown Linux}"
}

os_family() {
    local ids=""
    if [ -r /etc/os-release ]; then
        ids=$(sed -n 's/^ID\(_LIKE\)\{0,1\}=//p' /etc/os-release | tr -d '"')
    fi
    # shellcheck disable=SC2086 # split ID_LIKE="rhel centos fedora"
    case " $(printf '%s ' $ids) " in
        *" debian "* | *" ubuntu "*) echo apt ;;
        *" rhel "* | *" fedora "* | *" centos "*) echo dnf ;;
        *" suse "*) echo zypper ;;
        *" arch "*) echo pacman ;;
        *) echo "" ;;
    esac
}

python_hint() {
    case "$(os_family)" in
        apt) echo "apt-get install python3" ;;
        dnf) echo "dnf install python3 (yum install python3 on EL7)" ;;
        zypper) echo "zypper install python3" ;;
        pacman) echo "pacman -S python" ;;
        *) echo "install Python 3.6 or newer as python3" ;;
    esac
}

require_python() {
    local version
    command -v python3 >/dev/null 2>&1 ||
        fail "python3 is not installed; PAMSignal needs Python 3.6 or newer." \
            "Install it ($(python_hint)) and run this again."
    version=$(python3 -c \
        'import sys; print("%d.%d" % sys.version_info[:2])' </dev/null) ||
        fail "python3 does not run."
    case "$version" in
        3.[6-9] | 3.[1-9][0-9] | [4-9].*) return 0 ;;
    esac
    fail "python3 is $version; PAMSignal needs Python 3.6 or newer." \
        "Install a newer python3 ($(python_hint)) and run this again."
}

require_systemd() {
    # what sd_booted(3) checks: systemd is PID 1 exactly when this exists
    [ -d /run/systemd/system ] && return 0
    fail "systemd is not running as PID 1 here: the service needs it." \
        "Without systemd, run the agent under your own init instead:" \
        "  curl -fsSL .../install.sh | bash -s -- --download-only DIR" \
        "  (or scp pamsignal.py to this host), then" \
        "  sudo python3 DIR/pamsignal.py run"
}

# Whether dpkg or rpm owns the program: then the package manager upgrades
# and removes it, and a second copy of the unit here would shadow its own.
installed_by_package() {
    { command -v dpkg-query >/dev/null 2>&1 &&
        dpkg-query -S "$program" >/dev/null 2>&1; } ||
        { command -v rpm >/dev/null 2>&1 &&
            rpm -qf "$program" >/dev/null 2>&1; }
}

refuse_packaged() {
    installed_by_package || return 0
    fail "$program belongs to an installed package (.deb or .rpm)." \
        "$1 it with the package manager (apt-get, dnf), not with this script."
}

require_root() {
    [ "$(id -u)" -eq 0 ] ||
        fail "this needs root: curl -fsSL .../install.sh | sudo bash"
}

# ---------------------------------------------------------------- URLs

# The host of a URL: scheme, credentials, port and path stripped.
url_host() {
    local rest=${1#*://}
    rest=${rest%%/*}
    rest=${rest##*@}
    case "$rest" in
        \[*\]*) rest=${rest%%]*}; rest=${rest#[} ;;
        *) rest=${rest%%:*} ;;
    esac
    printf '%s\n' "$rest"
}

is_loopback_url() {
    local host
    case "$1" in http://*) ;; *) return 1 ;; esac
    host=$(url_host "$1")
    # an address, not a name that merely starts like one (127.0.0.1.example)
    [[ "$host" =~ ^127(\.[0-9]{1,3}){3}$ ]] && return 0
    [ "$host" = "::1" ] || [ "$host" = localhost ]
}

release_url() {
    local base=$1 version=$2
    if [ -z "$base" ]; then
        # GitHub names the newest release differently from a tagged one
        if [ "$version" = latest ]; then
            echo "$project_url/releases/latest/download"
        else
            echo "$project_url/releases/download/v$version"
        fi
    elif [ "$version" = latest ]; then
        echo "${base%/}/latest"
    else
        echo "${base%/}/v$version"
    fi
}

# ---------------------------------------------------------------- download

# Python's urllib checks the certificate and host name (PEP 476); this
# refuses a redirect away from https, as curl --proto-redir does.
local -r python_fetch='
import sys, urllib.error, urllib.request
url, path, plain_ok = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
class HttpsOnly(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not (newurl.startswith("https://") or plain_ok):
            raise urllib.error.URLError("redirect to " + newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)
opener = urllib.request.build_opener(HttpsOnly)
try:
    with opener.open(url, timeout=60) as answer, open(path, "wb") as out:
        while True:
            chunk = answer.read(65536)
            if not chunk:
                break
            out.write(chunk)
except Exception as error:
    sys.exit("%s: %s" % (url, error))
'

pick_downloader() {
    if command -v curl >/dev/null 2>&1; then
        echo curl
    elif command -v wget >/dev/null 2>&1; then
        echo wget
    else
        echo python3
    fi
}

# fetch URL FILE: exit status 0 only for a complete download
fetch() {
    local url=$1 out=$2 plain=0
    is_loopback_url "$url" && plain=1
    case "$downloader" in
        curl)
            local protocols="=https"
            [ "$plain" -eq 1 ] && protocols="=http,https"
            curl -fsSL --proto "$protocols" --proto-redir "$protocols" \
                --connect-timeout 30 --retry 2 -o "$out" "$url" </dev/null
            ;;
        wget)
            wget -q --timeout=60 --tries=3 -O "$out" "$url" </dev/null
            ;;
        python3)
            python3 -c "$python_fetch" "$url" "$out" "$plain" </dev/null
            ;;
    esac
}

# ---------------------------------------------------------------- verify

# The key as a file: --key as given, or the one built into this script.
key_file() {
    if [ -n "$key_path" ]; then
        printf '%s\n' "$key_path"
    elif [ -n "$(release_key)" ]; then
        release_key >"$work/release-key.asc"
        printf '%s\n' "$work/release-key.asc"
    fi
}

# An armored key as the binary keyring gpgv reads.
local -r python_dearmor='
import base64, sys
text = open(sys.argv[1], "rb").read()
if text.lstrip().startswith(b"-----BEGIN"):
    lines = text.decode("ascii").splitlines()
    start = lines.index("") + 1
    body = [l for l in lines[start:] if l and not l.startswith(("=", "-"))]
    text = base64.b64decode("".join(body))
open(sys.argv[2], "wb").write(text)
'

# check_signature KEY: SHA256SUMS.asc is a good signature by KEY.
check_signature() {
    local key=$1 sig="$work/SHA256SUMS.asc" sums="$work/SHA256SUMS"
    if command -v sqv >/dev/null 2>&1; then
        sqv --keyring "$key" "$sig" "$sums" >/dev/null 2>&1
    elif command -v gpg >/dev/null 2>&1; then
        local home="$work/gnupg"
        mkdir -m 0700 "$home"
        gpg --batch --quiet --homedir "$home" --import "$key" \
            >/dev/null 2>&1 &&
            gpg --batch --quiet --homedir "$home" --verify "$sig" "$sums" \
                >/dev/null 2>&1
    else
        python3 -c "$python_dearmor" "$key" "$work/keyring.gpg" &&
            gpgv --keyring "$work/keyring.gpg" "$sig" "$sums" \
                >/dev/null 2>&1
    fi
}

have_verifier() {
    command -v sqv >/dev/null 2>&1 || command -v gpg >/dev/null 2>&1 ||
        command -v gpgv >/dev/null 2>&1
}

# The lines of SHA256SUMS for the files this installs, in sha256sum's
# format; pamsignal.py must be one.
wanted_sums() {
    local sums=$1
    grep -E '^[0-9a-f]{64} [ *](pamsignal\.py|pamsignal\.[0-9]|pamsignal\.conf\.[0-9])$' \
        "$sums" || true
}

download_release() {
    local url=$1 key name
    say "downloading from $url (with $downloader)"
    fetch "$url/SHA256SUMS" "$work/SHA256SUMS" ||
        fail "could not download $url/SHA256SUMS" \
            "Check the address and the version (--version, --base-url)."
    key=$(key_file)
    if [ -n "$key" ]; then
        have_verifier ||
            fail "no OpenPGP verifier here to check the release signature." \
                "Install one (apt-get install sqv or gpgv; dnf install gnupg2)" \
                "and run this again."
        fetch "$url/SHA256SUMS.asc" "$work/SHA256SUMS.asc" ||
            fail "could not download $url/SHA256SUMS.asc (the signature)." \
                "Nothing was installed."
        check_signature "$key" ||
            fail "SHA256SUMS.asc is not a good signature by the release key:" \
                "the release was altered or signed by someone else." \
                "Nothing was installed."
        say "signature of SHA256SUMS: good"
        signed=yes
    fi
    wanted_sums "$work/SHA256SUMS" >"$work/wanted.sums"
    grep -q ' [ *]pamsignal\.py$' "$work/wanted.sums" ||
        fail "SHA256SUMS at $url lists no pamsignal.py." \
            "Nothing was installed."
    while read -r _ name; do
        name=${name#\*}
        fetch "$url/$name" "$work/$name" ||
            fail "could not download $url/$name"
    done <"$work/wanted.sums"
    (cd "$work" && sha256sum --check --strict --quiet wanted.sums) ||
        fail "a downloaded file does not match SHA256SUMS:" \
            "the release was altered or the download is damaged." \
            "Nothing was installed."
    say "checksums: good ($(wc -l <"$work/wanted.sums") files)"
}

release_version() {
    { python3 "$1" --version </dev/null || true; } |
        sed -n 's/^pamsignal //p'
}

# ---------------------------------------------------------------- actions

install_man_pages() {
    local page section
    for page in "$work"/pamsignal.[0-9] "$work"/pamsignal.conf.[0-9]; do
        [ -f "$page" ] || continue
        section=${page##*.}
        install -d -m 0755 "$man_dir/man$section"
        install -m 0644 "$page" "$man_dir/man$section/"
        say "installed $man_dir/man$section/${page##*/}"
    done
}

uninstall() {
    local page
    require_root
    refuse_packaged "Remove"
    if [ -x "$program" ]; then
        require_python
        if [ "$purge" = yes ]; then
            python3 "$program" uninstall --purge </dev/null
        else
            python3 "$program" uninstall </dev/null
        fi
    else
        say "$program is not there: nothing to stop or remove"
    fi
    for page in "$man_dir"/man[0-9]/pamsignal.[0-9] \
        "$man_dir"/man[0-9]/pamsignal.conf.[0-9]; do
        [ -e "$page" ] || continue
        rm -f "$page"
        say "removed $page"
    done
}

install_release() {
    local url previous="" version
    [ -n "$download_dir" ] || require_root
    say "on $(os_name)"
    [ -n "$download_dir" ] || require_systemd
    require_python
    [ -n "$download_dir" ] || refuse_packaged "Upgrade"
    downloader=$(pick_downloader)
    url=$(release_url "$base_url" "$wanted_version")
    case "$url" in
        https://*) ;;
        *) is_loopback_url "$url" ||
            fail "$url: only https:// (or http:// to this host) is allowed" ;;
    esac
    work=$(mktemp -d "${TMPDIR:-/tmp}/pamsignal-install.XXXXXXXX") ||
        fail "cannot create a private directory in ${TMPDIR:-/tmp}"
    # expanded now: at exit this function's locals are gone
    local cleanup
    printf -v cleanup 'rm -rf -- %q' "$work"
    # shellcheck disable=SC2064
    trap "$cleanup" EXIT
    download_release "$url"
    [ "$signed" = yes ] ||
        say "SHA256SUMS not signature-checked: this install.sh carries" \
            "no release key (use the install.sh of a release, or --key FILE)"
    version=$(release_version "$work/pamsignal.py")
    if [ "$wanted_version" != latest ] && [ "$version" != "$wanted_version" ]
    then
        fail "asked for $wanted_version but pamsignal.py is ${version:-?}." \
            "Nothing was installed."
    fi
    if [ -n "$download_dir" ]; then
        mkdir -p "$download_dir"
        cp "$work"/pamsignal.* "$work"/SHA256SUMS* "$download_dir/"
        say "downloaded and verified PAMSignal $version into $download_dir"
        say "run it: sudo python3 $download_dir/pamsignal.py run"
        return 0
    fi
    [ -x "$program" ] && previous=$(release_version "$program" || true)
    python3 "$work/pamsignal.py" install </dev/null ||
        fail "python3 pamsignal.py install failed (see above)."
    install_man_pages
    if [ "$previous" = "$version" ]; then
        say "reinstalled PAMSignal $version; kept $config"
    elif [ -n "$previous" ]; then
        say "upgraded PAMSignal $previous -> $version; kept $config"
    else
        say "installed PAMSignal $version"
    fi
    local manuals="pamsignal(8)"
    [ -f "$work/pamsignal.conf.5" ] && manuals="pamsignal.conf(5), $manuals"
    cat <<EOF

Next:
  1. edit $config (alert channels: see $manuals)
  2. pamsignal check-config
  3. systemctl reload pamsignal
  4. pamsignal test-alert
Remove it again: curl -fsSL .../install.sh | sudo bash -s -- --uninstall
EOF
}

# ---------------------------------------------------------------- main

local wanted_version=latest base_url=${PAMSIGNAL_BASE_URL:-} key_path=""
local action=install purge=no download_dir="" downloader="" work=""
local signed=no
while [ $# -gt 0 ]; do
    case "$1" in
        --version)
            [ $# -ge 2 ] || fail "--version needs a value, e.g. 0.2.0"
            wanted_version=${2#v}
            shift 2
            ;;
        --base-url)
            [ $# -ge 2 ] || fail "--base-url needs a URL"
            base_url=$2
            shift 2
            ;;
        --key)
            [ $# -ge 2 ] || fail "--key needs a file"
            [ -r "$2" ] || fail "--key $2: cannot read that file"
            key_path=$(cd "$(dirname "$2")" && pwd)/$(basename "$2")
            shift 2
            ;;
        --download-only)
            [ $# -ge 2 ] || fail "--download-only needs a directory"
            download_dir=$2
            shift 2
            ;;
        --uninstall) action=uninstall; shift ;;
        --purge) purge=yes; shift ;;
        -h | --help) usage; return 0 ;;
        *) usage >&2; fail "unknown option: $1" ;;
    esac
done
case "$wanted_version" in
    latest | [0-9]*) ;;
    *) fail "--version $wanted_version: expected a version such as 0.2.0" ;;
esac
case "$wanted_version" in
    *[!0-9A-Za-z.~+-]*) fail "--version $wanted_version: not a version" ;;
esac
if [ "$purge" = yes ] && [ "$action" != uninstall ]; then
    fail "--purge goes with --uninstall"
fi
if [ "$action" = uninstall ]; then
    uninstall
else
    install_release
fi
}

pamsignal_installer "$@"
