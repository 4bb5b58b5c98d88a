#!/bin/bash
# aiia-nginx-entrypoint: prepare what the rendered config needs, then exec the command.
#
# 1. Every certificate the config names under /etc/nginx/ssl/ (ssl_certificate lines in
#    /etc/aiia/nginx.conf and /etc/aiia/conf.d/*.conf) must exist: a missing one is
#    replaced by a self-signed placeholder covering every server_name of the config, so
#    HTTPS answers until the ACME certificates arrive. The placeholder's directory holds a
#    PLACEHOLDER file; whoever installs the real certificate removes the directory first.
# 2. An empty, writable /srv/status gets a placeholder index.html.
# 3. /var/log/nginx must be writable.
# Only when the command is nginx; anything else (a shell, `nginx -v`) is exec'd as is.
set -euo pipefail

CONF_DIR=${AIIA_CONF_DIR:-/etc/aiia}
SSL_DIR=${AIIA_SSL_DIR:-/etc/nginx/ssl}
STATUS_DIR=${AIIA_STATUS_DIR:-/srv/status}
LOG_DIR=${AIIA_LOG_DIR:-/var/log/nginx}
PLACEHOLDER_DAYS=${AIIA_PLACEHOLDER_DAYS:-90}

say() { echo "aiia-nginx-entrypoint: $*" >&2; }
die() { say "$*"; exit 1; }

conf_files() {
    local f
    for f in "$CONF_DIR/nginx.conf" "$CONF_DIR"/conf.d/*.conf; do
        [[ -f $f ]] && printf '%s\n' "$f"
    done
    return 0
}

# Words of one directive across the config, one per line (comments stripped).
directive_values() {
    local name=$1
    conf_files | xargs -r sed -e 's/#.*//' |
        grep -oE "(^|[[:space:]])${name}[[:space:]]+[^;]+;" |
        sed -E "s/^[[:space:]]*${name}[[:space:]]+//; s/;\$//" |
        tr -s '[:space:]' '\n' | sed '/^$/d'
}

placeholder_cert() {
    local live=$1; shift
    local names=("$@") san="" n tmp
    for n in "${names[@]}"; do san+="${san:+,}DNS:$n"; done
    mkdir -p "$live" 2>/dev/null || true
    [[ -w $live ]] || die "cannot write $live: the host directory mounted at $SSL_DIR must be writable by UID $(id -u) (chown -R $(id -u):$(id -g) it), or hold the certificate already"
    tmp=$(mktemp -d "$live/.placeholder.XXXXXX")
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days "$PLACEHOLDER_DAYS" -subj "/CN=${names[0]}" -addext "subjectAltName=$san" \
        -keyout "$tmp/privkey.pem" -out "$tmp/fullchain.pem" 2>/dev/null ||
        { rm -rf "$tmp"; die "openssl could not make a placeholder certificate in $live"; }
    chmod 0600 "$tmp/privkey.pem"
    chmod 0644 "$tmp/fullchain.pem"
    printf '%s\n' \
        "Self-signed placeholder made by aiia-nginx-entrypoint on $(date -u +%FT%TZ)" \
        "for: ${names[*]}" \
        "Replace it with the ACME certificate: remove this directory, then install the" \
        "real fullchain.pem and privkey.pem here (certbot --config-dir $SSL_DIR does)." \
        >"$tmp/PLACEHOLDER"
    mv -f "$tmp/privkey.pem" "$tmp/fullchain.pem" "$tmp/PLACEHOLDER" "$live/"
    rmdir "$tmp"
    say "no certificate in $live: made a self-signed placeholder for ${names[*]}"
}

prepare_certificates() {
    local names=() cert live
    mapfile -t names < <(directive_values server_name | grep -vE '^(_|localhost|~.*|\*.*)$' | awk '!seen[$0]++')
    while read -r cert; do
        [[ $cert == "$SSL_DIR"/* ]] || continue
        live=$(dirname "$cert")
        if [[ -s $live/fullchain.pem && -s $live/privkey.pem ]]; then
            [[ -r $live/privkey.pem ]] ||
                die "$live/privkey.pem is not readable by UID $(id -u): chown $(id -u) it (certbot makes it 0600 root)"
            continue
        fi
        if ((${#names[@]} == 0)); then
            names=("$(basename "$live")")
        fi
        placeholder_cert "$live" "${names[@]}"
    done < <(directive_values ssl_certificate | awk '!seen[$0]++')
}

prepare_status() {
    [[ -d $STATUS_DIR && -w $STATUS_DIR ]] || return 0
    if [[ -z $(ls -A "$STATUS_DIR") ]]; then
        cp /usr/share/aiia/status/index.html "$STATUS_DIR/index.html"
        say "$STATUS_DIR was empty: wrote a placeholder index.html"
    fi
}

check_logs() {
    [[ -w $LOG_DIR ]] ||
        die "cannot write $LOG_DIR: the host directory mounted there must be writable by UID $(id -u) (chown $(id -u):$(id -g) it)"
}

if [[ ${1:-} == nginx || ${1:-} == */nginx ]] && [[ " $* " != *" -v "* && " $* " != *" -V "* ]]; then
    [[ -f $CONF_DIR/nginx.conf ]] ||
        die "$CONF_DIR/nginx.conf is missing: mount the rendered nginx directory (invoke config.render) at $CONF_DIR"
    prepare_certificates
    prepare_status
    check_logs
fi
exec "$@"
