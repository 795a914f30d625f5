#!/bin/sh
# Entrypoint of the IIM FreeSWITCH image (Dockerfile.fs): check the environment that
# vars.xml reads, then exec FreeSWITCH in the foreground.
#
# Why check: FreeSWITCH's preprocessor pastes environment values into the XML text
# before parsing it, so a quote or an angle bracket in a value would break (or rewrite)
# the configuration; and an empty Event Socket password silently becomes "ClueCon".
set -eu

fail() {
    echo "iim-freeswitch: $*" >&2
    exit 64
}

# check NAME REGEX: an optional variable must match REGEX entirely when it is set.
check() {
    value=$(printenv "$1" || true)
    [ -z "$value" ] && return 0
    printf '%s' "$value" | grep -Eqx -- "$2" || fail "$1 is not acceptable (expected $2)"
}

password=$(printenv IIM_FS_PASSWORD || true)
[ -n "$password" ] || fail "IIM_FS_PASSWORD is not set: refusing to start with a guessable Event Socket password"
case "$password" in
    [Cc][Ll][Uu][Ee][Cc][Oo][Nn]) fail "IIM_FS_PASSWORD must not be FreeSWITCH's public default" ;;
esac
check IIM_FS_PASSWORD '[A-Za-z0-9._~+/=-]{16,128}'

check IIM_FS_DOMAIN '[A-Za-z0-9.-]+'
check IIM_FS_EXT_IP '[A-Za-z0-9.:_-]+'
check IIM_FS_BIND_IP '[0-9A-Fa-f.:]+'
check IIM_FS_INTERNAL_SIP_PORT '[0-9]+'
check IIM_FS_INTERNAL_WSS_PORT '[0-9]+'
check IIM_FS_EXTERNAL_SIP_PORT '[0-9]+'
check IIM_FS_ESL_PORT '[0-9]+'
check IIM_FS_IMS_PROXY '[A-Za-z0-9.:;=_-]+'
check IIM_FS_IMS_CORE_CIDRS '[0-9A-Fa-f.:/,]+'
check IIM_FS_IMS_PING '[0-9]+'
check IIM_FS_SPEAKER_CIDRS '[0-9A-Fa-f.:/,]+'
check IIM_FS_SOCKET_PRIMARY '[A-Za-z0-9.:_-]+:[0-9]+'
check IIM_FS_SOCKET_SECONDARY '[A-Za-z0-9.:_-]+:[0-9]+'
check IIM_FS_MAX_SESSIONS '[0-9]+'
check IIM_FS_SESSIONS_PER_SECOND '[0-9]+'

exec "$@"
