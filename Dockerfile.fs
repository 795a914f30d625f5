# syntax=docker/dockerfile:1.7
#
# FreeSWITCH 1.10 for IIM: the SignalWire community packages on Debian 12, carrying
# exactly the configuration in freeswitch-conf/ and dialplan/ (see freeswitch-conf/README.md).
#
# Why this base: SignalWire's Debian repository is the project's own packaging of 1.10
# (the release measured in shared notes is 1.10.12); Debian itself ships no FreeSWITCH,
# and third-party images pin someone else's module set and configuration. The repository
# needs a SignalWire Personal Access Token (pat_...). It is passed as a BuildKit secret,
# never as a build argument, so it stays out of the image and its history:
#
#   DOCKER_BUILDKIT=1 docker build -f Dockerfile.fs -t iim-freeswitch \
#       --secret id=signalwire_token,env=SIGNALWIRE_TOKEN .
#
# Run it in the network namespace of IIM (host networking or one pod): IIM's Event Socket
# client reaches 127.0.0.1:8021 and the dialplan's socket application reaches IIM on
# 127.0.0.1:8084, both loopback by design:
#
#   docker run -d --network host -e IIM_FS_PASSWORD=... -e IIM_FS_IMS_PROXY=... \
#       -e IIM_FS_IMS_CORE_CIDRS=... -v /srv/iim/tls:/etc/freeswitch/tls iim-freeswitch

ARG DEBIAN_RELEASE=bookworm
FROM debian:${DEBIAN_RELEASE}-slim

# Optional exact package version for reproducible builds, e.g. 1.10.12~release~24~...;
# empty installs the newest 1.10 release in the repository.
ARG FS_PACKAGE_VERSION=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# One layer: the token-bearing apt configuration is created and deleted in the same RUN.
# Modules: one freeswitch-mod-NAME package per module loaded in autoload_configs/modules.conf.xml.
RUN --mount=type=secret,id=signalwire_token,required=true \
    set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates gnupg tini wget; \
    token="$(cat /run/secrets/signalwire_token)"; \
    . /etc/os-release; \
    wget -q --http-user=signalwire --http-password="${token}" \
        -O /usr/share/keyrings/signalwire-freeswitch-repo.gpg \
        https://freeswitch.signalwire.com/repo/deb/debian-release/signalwire-freeswitch-repo.gpg; \
    install -m 0600 /dev/null /etc/apt/auth.conf.d/signalwire.conf; \
    printf 'machine freeswitch.signalwire.com login signalwire password %s\n' "${token}" \
        > /etc/apt/auth.conf.d/signalwire.conf; \
    echo "deb [signed-by=/usr/share/keyrings/signalwire-freeswitch-repo.gpg] https://freeswitch.signalwire.com/repo/deb/debian-release/ ${VERSION_CODENAME} main" \
        > /etc/apt/sources.list.d/freeswitch.list; \
    apt-get update; \
    packages=( \
        freeswitch \
        freeswitch-mod-logfile \
        freeswitch-mod-event-socket \
        freeswitch-mod-sofia \
        freeswitch-mod-commands \
        freeswitch-mod-dptools \
        freeswitch-mod-hash \
        freeswitch-mod-dialplan-xml \
        freeswitch-mod-sndfile \
        freeswitch-mod-http-cache \
        freeswitch-mod-tone-stream \
        freeswitch-mod-opus \
        freeswitch-mod-say-en \
        freeswitch-mod-say-ru \
    ); \
    if [ -n "${FS_PACKAGE_VERSION}" ]; then packages=("${packages[@]/%/=${FS_PACKAGE_VERSION}}"); fi; \
    apt-get install -y --no-install-recommends "${packages[@]}"; \
    rm -f /etc/apt/auth.conf.d/signalwire.conf /etc/apt/sources.list.d/freeswitch.list; \
    apt-get purge -y --auto-remove gnupg wget; \
    rm -rf /var/lib/apt/lists/*

# Replace the packaged example configuration (stock users 1000-1019, demo dialplans,
# ClueCon) with ours: nothing that is not in this repository is loaded.
RUN rm -rf /etc/freeswitch && install -d -m 0750 /etc/freeswitch
COPY freeswitch-conf/freeswitch.xml freeswitch-conf/vars.xml /etc/freeswitch/
COPY freeswitch-conf/autoload_configs/ /etc/freeswitch/autoload_configs/
COPY freeswitch-conf/sip_profiles/ /etc/freeswitch/sip_profiles/
COPY freeswitch-conf/directory/ /etc/freeswitch/directory/
COPY dialplan/ /etc/freeswitch/dialplan/
COPY --chmod=0755 freeswitch-conf/docker-entrypoint.sh /usr/local/bin/iim-fs-entrypoint

# Non-root: FreeSWITCH needs no privileged port (5060/5080/7443, RTP above 16384).
# Writable: logs (and the preprocessed freeswitch.xml.fsxml), databases, run files,
# certificates (WSS and DTLS keys are generated there when none is mounted) and the
# device directory. The configuration itself stays read-only to the service.
RUN set -eux; \
    getent passwd freeswitch >/dev/null || useradd --system --user-group \
        --home-dir /var/lib/freeswitch --shell /usr/sbin/nologin freeswitch; \
    group="$(id -gn freeswitch)"; \
    install -d -o freeswitch -g "${group}" -m 0750 \
        /var/lib/freeswitch /var/lib/freeswitch/db /var/lib/freeswitch/storage \
        /var/lib/freeswitch/recordings /var/log/freeswitch /run/freeswitch /var/cache/freeswitch \
        /etc/freeswitch/tls; \
    chown -R "root:${group}" /etc/freeswitch; \
    chmod -R u=rwX,g=rX,o= /etc/freeswitch; \
    chown freeswitch /etc/freeswitch/tls /etc/freeswitch/directory/iim; \
    chmod 0750 /etc/freeswitch/tls /etc/freeswitch/directory/iim

USER freeswitch
WORKDIR /var/lib/freeswitch

# 5060 internal profile (speakers, SIP), 7443 WSS (WebRTC speakers), 5080 external
# profile (IMS core), RTP as in switch.conf.xml. The Event Socket (8021) is loopback
# only and deliberately not exposed.
EXPOSE 5060/udp 5060/tcp 7443/tcp 5080/udp 5080/tcp
EXPOSE 16384-32768/udp

# status over the Event Socket with the same password IIM uses (the password is on the
# fs_cli command line for the duration of the check, visible only inside the container).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD fs_cli -H 127.0.0.1 -P 8021 -p "${IIM_FS_PASSWORD}" -T 2000 -t 3000 -x status | grep -q '^UP' || exit 1

STOPSIGNAL SIGTERM
# tini: PID 1 that forwards signals and reaps the shells exec-set starts.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/iim-fs-entrypoint"]
# Foreground (-nf), no console (-nc, no stdin in a container), no NAT-PMP/UPnP probing,
# normal scheduling priority (no realtime privileges as non-root). Logs: /var/log/freeswitch.
CMD ["/usr/bin/freeswitch", "-nonat", "-nf", "-nc", "-np"]
